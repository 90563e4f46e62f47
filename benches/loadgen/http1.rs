//! The load's HTTP/1.1 client: one keep-alive connection per closed loop, written out by hand.
//!
//! The load generator shares the machine with the server it measures, so what it spends per
//! request is taken from the server. A general client (reqwest: a URL parsed, a pool checked out
//! and a connection task messaged for every request) took about 30 µs of CPU per exchange, a
//! tenth of the server's. This one writes the request in one `write` and reads the answer with
//! as few `read`s as it arrives in. It frames answers by `Content-Length`, as latchkey sends
//! them; any other answer (chunked, cut short, `Connection: close`) is an error, or ends the
//! connection, and the next request connects again.

use std::io::{Error, ErrorKind};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The largest response head (status line and headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The largest response body accepted.
const MAX_BODY: usize = 1024 * 1024;

/// A keep-alive connection that posts forms to one URL.
pub struct Http1 {
    /// `HOST:PORT`, as connected to and sent in `Host`.
    authority: String,
    /// The request up to the `Content-Length` value.
    head: Vec<u8>,
    stream: Option<TcpStream>,
    /// The request being sent, then the answer being read.
    buf: Vec<u8>,
}

/// Why a request failed.
#[derive(Debug)]
pub enum Http1Error {
    Connect(Error),
    Io(Error),
}

impl std::fmt::Display for Http1Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Http1Error::Connect(e) => write!(f, "connect: {e}"),
            Http1Error::Io(e) => write!(f, "{e}"),
        }
    }
}

impl Http1 {
    /// A client for `url`, `http://HOST:PORT/PATH` (no TLS: the server under load is local).
    pub fn new(url: &str) -> anyhow::Result<Self> {
        let rest = url.strip_prefix("http://").ok_or_else(|| anyhow::anyhow!("{url}: not an http:// URL"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        anyhow::ensure!(!authority.is_empty(), "{url}: no host");
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: "
        )
        .into_bytes();
        Ok(Http1 { authority: authority.to_owned(), head, stream: None, buf: Vec::with_capacity(4096) })
    }

    /// Drops the connection (after a request given up half-way): the next request connects again.
    pub fn reset(&mut self) {
        self.stream = None;
    }

    /// Posts `form` and returns the answer's status and body. After an error the connection is
    /// dropped; the next call connects again.
    pub async fn post_form(&mut self, form: &[u8]) -> Result<(u16, &[u8]), Http1Error> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.authority).await.map_err(Http1Error::Connect)?;
            stream.set_nodelay(true).map_err(Http1Error::Connect)?;
            self.stream = Some(stream);
        }
        match self.round_trip(form).await {
            Ok((status, body, keep)) => {
                if !keep {
                    self.stream = None;
                }
                Ok((status, &self.buf[body]))
            }
            Err(e) => {
                self.stream = None;
                Err(Http1Error::Io(e))
            }
        }
    }

    /// Sends the request and reads the answer into `buf`: its status, where its body is in `buf`,
    /// and whether the connection may be used again.
    async fn round_trip(&mut self, form: &[u8]) -> Result<(u16, std::ops::Range<usize>, bool), Error> {
        let stream = self.stream.as_mut().ok_or_else(|| Error::from(ErrorKind::NotConnected))?;
        self.buf.clear();
        self.buf.extend_from_slice(&self.head);
        self.buf.extend_from_slice(form.len().to_string().as_bytes());
        self.buf.extend_from_slice(b"\r\n\r\n");
        self.buf.extend_from_slice(form);
        stream.write_all(&self.buf).await?;

        self.buf.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > MAX_HEAD {
                return Err(invalid("response head too large"));
            }
            read_more(stream, &mut self.buf).await?;
        };
        let head = parse_head(&self.buf[..head_end])?;
        let body_end = head_end + head.content_length;
        while self.buf.len() < body_end {
            read_more(stream, &mut self.buf).await?;
        }
        if self.buf.len() > body_end {
            return Err(invalid("bytes after the response body"));
        }
        Ok((head.status, head_end..body_end, head.keep_alive))
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Error> {
    buf.reserve(4096);
    if stream.read_buf(buf).await? == 0 {
        return Err(Error::new(ErrorKind::UnexpectedEof, "connection closed before the response ended"));
    }
    Ok(())
}

/// What the load needs of a response head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: usize,
    keep_alive: bool,
}

fn parse_head(head: &[u8]) -> Result<Head, Error> {
    let text = std::str::from_utf8(head).map_err(|_| invalid("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.1 ")
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("bad status line {status_line:?}")))?;
    let mut content_length = None;
    let mut keep_alive = true;
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value.parse::<usize>().map_err(|_| invalid(format!("bad Content-Length {value:?}")))?;
            if n > MAX_BODY {
                return Err(invalid("response body too large"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(format!("Transfer-Encoding {value:?} is not supported")));
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep_alive = false;
        }
    }
    let content_length = content_length.ok_or_else(|| invalid("response without Content-Length"))?;
    Ok(Head { status, content_length, keep_alive })
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidData, message.into())
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn a_head_gives_its_status_length_and_connection() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), Head { status: 200, content_length: 12, keep_alive: true });
        let head = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), Head { status: 503, content_length: 0, keep_alive: false });
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err(), "no Content-Length");
        assert!(parse_head(b"HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 2x0 OK\r\ncontent-length: 1\r\n\r\n").is_err());
    }

    /// Against a server that answers in pieces, then closes: the request arrives whole, each
    /// answer is read whole across reads, and a closed connection is an error after which the
    /// client connects again.
    #[tokio::test]
    async fn requests_and_answers_cross_a_real_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..2 {
                let (mut conn, _) = listener.accept().await.unwrap();
                let mut buf = Vec::new();
                // Two requests on the first connection, one on the second.
                let wanted = if seen.is_empty() { 2 } else { 1 };
                for _ in 0..wanted {
                    let start = buf.len();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = conn.read(&mut chunk).await.unwrap();
                        buf.extend_from_slice(&chunk[..n]);
                        if buf[start..].ends_with(b"a=1&b=2") {
                            break;
                        }
                    }
                    for piece in [&b"HTTP/1.1 200 OK\r\nContent-Le"[..], b"ngth: 5\r\n\r\nhe", b"llo"] {
                        conn.write_all(piece).await.unwrap();
                        conn.flush().await.unwrap();
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                seen.push(String::from_utf8(buf).unwrap());
            }
            seen
        });

        let mut client = Http1::new(&format!("http://{addr}/v1/token")).unwrap();
        for _ in 0..2 {
            let (status, body) = client.post_form(b"a=1&b=2").await.unwrap();
            assert_eq!((status, body), (200, &b"hello"[..]));
        }
        // The server closed the first connection: this request fails, the next reconnects.
        assert!(client.post_form(b"a=1&b=2").await.is_err());
        let (status, body) = client.post_form(b"a=1&b=2").await.unwrap();
        assert_eq!((status, body), (200, &b"hello"[..]));

        let seen = server.await.unwrap();
        let request = format!(
            "POST /v1/token HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 7\r\n\r\na=1&b=2"
        );
        assert_eq!(seen[0], request.repeat(2));
        assert_eq!(seen[1], request);
    }
}
