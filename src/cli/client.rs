//! The HTTP client of the admin subcommands (`kill`, `kills`, `revoke`, `audit`): where the server is,
//! the admin key, and errors a person can act on.

use anyhow::{Context, anyhow};
use reqwest::StatusCode;
use serde_json::Value;

/// The environment variable that holds the admin key. Only the environment: a key on the
/// command line would show in `ps` and in shell history.
pub const ADMIN_KEY_ENV: &str = "LATCHKEY_ADMIN_KEY";

/// Options every admin subcommand takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The broker's URL.
    #[arg(long, env = "LATCHKEY_URL", global = true, default_value = "http://127.0.0.1:8443")]
    pub url: String,
    /// Print the server's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// A client for the admin API of one server.
#[derive(Debug)]
pub struct AdminClient {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    pub fn new(args: &ServerArgs) -> anyhow::Result<Self> {
        let base = args.url.trim_end_matches('/').to_owned();
        url::Url::parse(&base).with_context(|| format!("--url {base:?} is not a URL"))?;
        let key = std::env::var(ADMIN_KEY_ENV).ok().map(|k| k.trim().to_owned()).filter(|k| !k.is_empty());
        let http = reqwest::Client::builder().timeout(std::time::Duration::from_secs(30)).build()?;
        Ok(AdminClient { base, key, http })
    }

    pub async fn get(&self, path: &str) -> anyhow::Result<(StatusCode, Value)> {
        self.send(self.http.get(format!("{}{path}", self.base))).await.map(|(s, v, _)| (s, v))
    }

    /// A GET that also answers the server's `x-request-id`, so that a caller can tell its own
    /// calls apart in the audit trail.
    pub async fn get_traced(&self, path: &str) -> anyhow::Result<(Value, Option<String>)> {
        self.send(self.http.get(format!("{}{path}", self.base))).await.map(|(_, v, id)| (v, id))
    }

    pub async fn post(&self, path: &str, body: &Value) -> anyhow::Result<(StatusCode, Value)> {
        self.send(self.http.post(format!("{}{path}", self.base)).json(body)).await.map(|(s, v, _)| (s, v))
    }

    /// Sends a request; a 2xx answer comes back, anything else is an error that says what to do.
    async fn send(&self, mut request: reqwest::RequestBuilder) -> anyhow::Result<(StatusCode, Value, Option<String>)> {
        if let Some(k) = &self.key {
            request = request.bearer_auth(k);
        }
        let response = request.send().await.map_err(|e| {
            anyhow!("cannot reach latchkey at {}: {e} (is the server running? set --url or LATCHKEY_URL)", self.base)
        })?;
        let status = response.status();
        let id = response.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let text = response.text().await.unwrap_or_default();
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok((status, body, id));
        }
        let description = body["error_description"].as_str().unwrap_or(text.trim());
        let request_id = body["request_id"].as_str().map(|r| format!(" (request_id {r})")).unwrap_or_default();
        Err(match status {
            StatusCode::UNAUTHORIZED if self.key.is_none() => {
                anyhow!("no admin key: set {ADMIN_KEY_ENV} to an admin key (`latchkey admin-key new` makes one)")
            }
            StatusCode::UNAUTHORIZED => {
                anyhow!("the server does not know the admin key in {ADMIN_KEY_ENV}{request_id}")
            }
            StatusCode::FORBIDDEN => anyhow!(
                "the admin key in {ADMIN_KEY_ENV} is not allowed to do this: {description}; \
                 use a key with a higher role{request_id}"
            ),
            _ => anyhow!("the server answered {status}: {description}{request_id}"),
        })
    }
}

/// Prints rows as aligned columns, the first row being the header.
pub fn print_table(rows: &[Vec<String>]) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0))
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, value) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(value);
            } else {
                line.push_str(&format!("{value:<w$}  ", w = widths[i]));
            }
        }
        println!("{}", line.trim_end());
    }
}

/// A JSON value as a table cell.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A selector as `key=value` pairs, for tables.
pub fn selector_text(selector: &Value) -> String {
    let Some(map) = selector.as_object() else { return cell(selector) };
    let mut parts = Vec::new();
    for (k, v) in map {
        match v {
            Value::Object(claims) => {
                parts.extend(claims.iter().map(|(name, glob)| format!("claim.{name}={}", cell(glob))));
            }
            other => parts.push(format!("{k}={}", cell(other))),
        }
    }
    parts.join(" ")
}

/// A revocation report (`{backends, totals}`) as a table.
pub fn print_report(report: &Value) {
    let fields = ["matched", "revoked", "expired", "pending", "failed"];
    let mut rows = vec![std::iter::once("BACKEND").chain(fields).map(|s| s.to_uppercase()).collect::<Vec<_>>()];
    let line = |name: &str, counts: &Value| {
        std::iter::once(name.to_owned()).chain(fields.iter().map(|f| cell(&counts[*f]))).collect::<Vec<_>>()
    };
    for (backend, counts) in report["backends"].as_object().into_iter().flatten() {
        rows.push(line(backend, counts));
    }
    rows.push(line("total", &report["totals"]));
    print_table(&rows);
    for (backend, note) in report["notes"].as_object().into_iter().flatten() {
        println!("{backend}: {}", note.as_str().unwrap_or_default());
    }
}

/// Prints a value as pretty JSON.
pub fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A query string from `(name, value)` pairs, skipping absent values.
pub fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let mut q = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if let Some(v) = v {
            q.append_pair(k, v);
        }
    }
    q.finish()
}
