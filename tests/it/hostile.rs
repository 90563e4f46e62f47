//! Hostile input: inputs built to exhaust the broker (stack, CPU, connections, memory, the
//! issuer's patience) are refused within a bound, and the broker keeps serving. Each test prints
//! what it measured (`cargo test -- --nocapture` shows it).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use latchkey::config::IssuerKind;
use latchkey::oidc::Claims;
use latchkey::policy::{IssuerInfo, LoadContext, Policy, evaluate_condition};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::test_app::{TestApp, b64};

const EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";

fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

/// The broker still answers health checks and a good exchange.
async fn still_healthy(t: &TestApp) {
    assert_eq!(t.get("/healthz", None).await.status, StatusCode::OK);
    let a = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

async fn post_raw(t: &TestApp, content_type: &str, body: Vec<u8>) -> (StatusCode, Value, Duration) {
    let started = Instant::now();
    let r = t
        .client
        .post(format!("{}/v1/token", t.url))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, body, started.elapsed())
}

#[tokio::test]
async fn deeply_nested_json_in_an_exchange_body_is_a_quick_400() {
    let t = TestApp::start().await;
    // As deep as the 64 KiB body cap allows: refused by the parser's recursion limit.
    let (status, body, took) = post_raw(&t, "application/json", vec![b'['; 60_000]).await;
    println!("60,000 `[` as a JSON body: {status} in {took:?}");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_request");
    assert!(body["error_description"].as_str().unwrap().contains("malformed JSON body"), "{body}");
    assert!(took < Duration::from_secs(2));

    // Deep nesting in the one member that holds free-form JSON.
    let deep = format!("{}{}", "[".repeat(30_000), "]".repeat(30_000));
    let json_body = format!(
        r#"{{"grant_type":"{EXCHANGE}","subject_token_type":"{JWT}","subject_token":"x","scope":"pr-review","narrow":{deep}}}"#
    );
    let (status, body, took) = post_raw(&t, "application/json", json_body.into_bytes()).await;
    println!("30,000-deep `narrow` in JSON: {status} in {took:?}");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(took < Duration::from_secs(2));

    // And in the form encoding, where `narrow` is a string holding JSON.
    let started = Instant::now();
    let a = t
        .exchange_form(&[
            ("grant_type", EXCHANGE),
            ("subject_token_type", JWT),
            ("subject_token", "x"),
            ("scope", "pr-review"),
            ("narrow", &format!("{{\"jwt\":{}", "[".repeat(20_000))),
        ])
        .await;
    println!("20,000-deep `narrow` in a form: {} in {:?}", a.status, started.elapsed());
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
    assert!(a.body["error_description"].as_str().unwrap().contains("malformed narrow"), "{}", a.text);

    // 100,000 `[` is over the body cap: refused before any parsing.
    let (status, _, took) = post_raw(&t, "application/json", vec![b'['; 100_000]).await;
    println!("100,000 `[` as a JSON body: {status} in {took:?}");
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);

    still_healthy(&t).await;
    assert_eq!(t.credential_count().await, 1, "only the good exchange issued anything");
}

#[tokio::test]
async fn deeply_nested_claims_in_a_token_are_refused_or_evaluated_safely() {
    let t = TestApp::start().await;
    // Deeper than the JSON parser's recursion limit, as deep as a 16 KiB token allows.
    let deep: Value = serde_json::from_str(&format!("{}{}", "[".repeat(100), "]".repeat(100))).unwrap();
    let mut claims = t.issuer.claims(pr_claims());
    let header = json!({ "alg": "ES256", "typ": "JWT", "kid": t.issuer.kid });
    let payload = serde_json::to_string(&claims).unwrap();
    let too_deep = format!("{},\"deep\":{}{}}}", &payload[..payload.len() - 1], "[".repeat(5_000), "]".repeat(5_000));
    let token = {
        let input = format!("{}.{}", b64(header.to_string()), b64(&too_deep));
        // Signed properly: the nesting, not the signature, must be what refuses it.
        let signed = t.issuer.sign(&header, &Value::Object(claims.clone()));
        let sig = signed.rsplit('.').next().unwrap().to_owned();
        format!("{input}.{sig}")
    };
    assert!(token.len() <= 16 * 1024, "{} bytes", token.len());
    let started = Instant::now();
    let a = t.exchange(&token, "pr-review").await;
    println!("5,000-deep claim: {} in {:?}", a.status, started.elapsed());
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{}", a.text);
    assert_eq!(a.body["error"], "invalid_grant");

    // Within the limit: the claims reach the policy (and its CEL condition) and are handled.
    claims.insert("deep".into(), deep);
    claims.insert("wide".into(), Value::Array((0..2_000).map(Value::from).collect()));
    let token = t.issuer.token(Value::Object(claims));
    let started = Instant::now();
    let a = t.exchange(&token, "pr-review").await;
    println!("100-deep, 2,000-wide claims through the CEL condition: {} in {:?}", a.status, started.elapsed());
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    still_healthy(&t).await;
}

fn cel_context() -> LoadContext {
    LoadContext {
        issuers: [("github-actions".to_owned(), IssuerInfo { kind: IssuerKind::Github, required_claims: vec![] })]
            .into_iter()
            .collect(),
        backends: vec![latchkey::policy::BackendKind::Jwt],
        github_apps: vec![],
        aws_role_path: None,
        vault_policies: None,
    }
}

fn policy_with_condition(condition: &str) -> String {
    format!(
        r#"agent = "a"
issuer = "github-actions"
ttl = "15m"
condition = '''{condition}'''
[match]
repository_owner_id = "1234567"
[[grant]]
backend = "jwt"
audience = "https://x.example"
"#
    )
}

/// The largest claims a 16 KiB token can carry, as lists a condition can walk.
fn big_claims() -> Claims {
    let mut map = Map::new();
    map.insert("list".into(), Value::Array((0..4_000).map(Value::from).collect()));
    map.insert("s".into(), Value::String("x".repeat(8_000)));
    map.insert("repository_owner_id".into(), "1234567".into());
    Claims::from_map("github-actions", IssuerKind::Github, map)
}

#[test]
fn hostile_cel_conditions_are_refused_at_load() {
    let ctx = cel_context();
    let dir = std::path::Path::new(".");
    let nested_loops = "claims.list.all(x, [1, 2, 3].all(y, [4, 5].all(z, x + y + z >= 0)))";
    let deep = format!("{}true{} != []", "[".repeat(80), "]".repeat(80));
    let long_chain = format!("claims.s.size() {} > 0", "+ claims.s.size() ".repeat(120));
    let many_loops = (0..9).map(|_| "claims.list.exists(x, x == 1)").collect::<Vec<_>>().join(" || ");
    let too_long = format!("true {}", "|| true ".repeat(600));
    let cases: [(&str, &str, &str); 8] = [
        ("nested comprehensions", nested_loops, "inside another's body"),
        ("claims in a body", "claims.list.all(x, claims.list + claims.list != [])", "not `claims`"),
        ("map", "claims.list.map(x, [x, x, x, x]).size() > 0", "`map()` is not allowed"),
        ("map with a filter", "claims.list.map(x, x > 1, [x, x]).size() > 0", "`map()` is not allowed"),
        ("80 nested lists", &deep, "condition"),
        ("120-term chain", &long_chain, "levels deep"),
        ("nine comprehensions", &many_loops, "comprehensions"),
        ("over 4096 characters", &too_long, "characters long"),
    ];
    for (name, condition, expected) in cases {
        let started = Instant::now();
        let errors = Policy::parse("hostile", &policy_with_condition(condition), dir, &ctx)
            .expect_err(&format!("{name} must be refused"));
        println!("{name}: refused in {:?}: {errors:?}", started.elapsed());
        assert!(errors.iter().any(|e| e.contains(expected)), "{name}: {errors:?}");
    }
    // The same shapes within the caps load.
    let ok = "claims.list.all(x, x >= 0) && claims.list.filter(x, x > 2).exists(y, y == 8)";
    Policy::parse("fine", &policy_with_condition(ok), dir, &ctx).expect("a flat condition loads");
}

#[test]
fn the_costliest_conditions_the_loader_accepts_evaluate_within_a_bound() {
    let claims = big_claims();
    // Each is within every cap, and each is as costly as the caps let one shape be: eight
    // comprehensions over the largest list, bodies doing list and string work, a long chain.
    // Balanced, so that the chain fits the depth cap: five groups of ten.
    let balanced = |term: &str| {
        let group = format!("({})", [term; 10].join(" + "));
        vec![group; 5].join(" + ")
    };
    let sum = balanced("claims.s");
    let list_sum = balanced("claims.list");
    let body = (0..30).map(|_| "[x]").collect::<Vec<_>>().join(" + ");
    let cases = [
        (0..8).map(|_| format!("claims.list.all(x, {body} != [])")).collect::<Vec<_>>().join(" && "),
        (0..8).map(|_| "claims.list.filter(x, x >= 0).size() > 0").collect::<Vec<_>>().join(" && "),
        "claims.list.filter(x, true).filter(x, true).filter(x, true).filter(x, true).filter(x, true)\
         .filter(x, true).filter(x, true).exists(x, x < 0) || true"
            .to_owned(),
        format!("size({sum}) > 0"),
        format!("size({list_sum}) > 0"),
    ];
    for condition in &cases {
        assert!(condition.len() <= 4096, "{} characters", condition.len());
        let started = Instant::now();
        let result = evaluate_condition(condition, &claims);
        let took = started.elapsed();
        println!("{took:?} for {}…: {result:?}", &condition[..condition.len().min(60)]);
        assert!(result.is_ok(), "{condition}: {result:?}");
        assert!(took < Duration::from_secs(3), "{condition} took {took:?}");
    }
}

/// Sends a request head one byte at a time, `gap` apart, and returns how long the broker kept
/// the connection open (it closes it, or the whole head was sent).
async fn slow_client(addr: std::net::SocketAddr, gap: Duration) -> (Duration, bool) {
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\n\r\n", "a".repeat(200));
    for byte in head.as_bytes() {
        if socket.write_all(&[*byte]).await.is_err() {
            return (started.elapsed(), true);
        }
        // A closed connection shows as EOF or an error on read.
        let mut buf = [0u8; 512];
        match tokio::time::timeout(gap, socket.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), true),
            Ok(Ok(_)) => {
                // A 408 or similar before closing: read on until the close.
                let _ = tokio::time::timeout(Duration::from_secs(2), socket.read_to_end(&mut Vec::new())).await;
                return (started.elapsed(), true);
            }
            Err(_) => {}
        }
    }
    (started.elapsed(), false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_clients_are_disconnected_after_the_header_read_timeout() {
    let t = TestApp::builder().server("header_read_timeout = \"500ms\"").start().await;
    let addr: std::net::SocketAddr = t.url.trim_start_matches("http://").parse().unwrap();
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..50 {
        clients.spawn(slow_client(addr, Duration::from_millis(50)));
    }
    // Meanwhile, normal requests are served at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    still_healthy(&t).await;
    println!("a normal exchange during the slow-loris: {:?}", started.elapsed());
    let mut longest = Duration::ZERO;
    while let Some(r) = clients.join_next().await {
        let (held, dropped) = r.unwrap();
        assert!(dropped, "a slow client sent its whole head over {held:?} and was never dropped");
        longest = longest.max(held);
    }
    println!("50 slow-loris clients: all dropped, the last after {longest:?} (timeout 500ms)");
    assert!(longest < Duration::from_secs(3), "{longest:?}");

    // Clients that connect and send nothing, or trickle the HTTP/2 preface, are dropped too.
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    let mut preface = tokio::net::TcpStream::connect(addr).await.unwrap();
    preface.write_all(b"PRI * HT").await.unwrap();
    let started = Instant::now();
    for mut socket in idle.into_iter().chain([preface]) {
        let closed = tokio::time::timeout(Duration::from_secs(3), socket.read(&mut [0u8; 64])).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "an idle connection stayed open: {closed:?}");
    }
    println!("20 silent clients and a trickled HTTP/2 preface: all dropped within {:?}", started.elapsed());
    still_healthy(&t).await;
}

/// An issuer whose discovery answers at once and whose JWKS answers `jwks`.
async fn odd_issuer(
    jwks: fn(tokio::net::TcpStream, Arc<AtomicUsize>) -> tokio::task::JoinHandle<()>,
) -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let sent = Arc::new(AtomicUsize::new(0));
    let (u, counter) = (url.clone(), sent.clone());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = vec![0u8; 4096];
            let n = socket.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            if request.starts_with("GET /.well-known/openid-configuration") {
                let body = json!({ "issuer": u, "jwks_uri": format!("{u}/jwks") }).to_string();
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            } else {
                jwks(socket, counter.clone());
            }
        }
    });
    (url, sent)
}

fn trickle(mut socket: tokio::net::TcpStream, sent: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if socket.write_all(b" ").await.is_err() {
                return;
            }
            sent.fetch_add(1, Ordering::Relaxed);
        }
    })
}

fn fifty_megabytes(mut socket: tokio::net::TcpStream, sent: Arc<AtomicUsize>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Chunked, so no Content-Length gives it away: only the incremental read can stop it.
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        if socket.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let chunk = format!("{:x}\r\n{}\r\n", 64 * 1024, " ".repeat(64 * 1024));
        for _ in 0..(50 * 1024 * 1024 / (64 * 1024)) {
            if socket.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
            sent.fetch_add(64 * 1024, Ordering::Relaxed);
        }
        let _ = socket.write_all(b"0\r\n\r\n").await;
    })
}

/// A broker with a second issuer at `url`, and outbound calls bounded at one second.
async fn with_issuer(url: &str) -> TestApp {
    TestApp::builder()
        .config(&format!(
            "[limits]\noutbound_timeout = \"1s\"\n[[issuer]]\nid = \"odd\"\nkind = \"generic\"\nurl = \"{url}\"\nalgorithms = [\"ES256\"]\n"
        ))
        .start()
        .await
}

/// A token for the odd issuer (signed with the test issuer's key, which the odd one never
/// publishes: what matters is the key fetch it causes).
fn odd_token(t: &TestApp, iss: &str, kid: &str) -> String {
    let claims = Value::Object(t.issuer.claims(json!({ "iss": iss })));
    t.issuer.sign(&json!({ "alg": "ES256", "kid": kid }), &claims)
}

#[tokio::test]
async fn a_trickling_jwks_is_bounded_by_the_outbound_timeout() {
    let (url, sent) = odd_issuer(trickle).await;
    let started = Instant::now();
    let t = with_issuer(&url).await;
    println!("start-up with a trickling JWKS: {:?}", started.elapsed());
    // One miss refresh per 30 s: the first unknown kid waits for the fetch, the next do not.
    let started = Instant::now();
    let a = t.exchange(&odd_token(&t, &url, "k1"), "pr-review").await;
    let first = started.elapsed();
    let started = Instant::now();
    for i in 0..20 {
        assert_eq!(
            t.exchange(&odd_token(&t, &url, &format!("k{i}")), "pr-review").await.status,
            StatusCode::BAD_REQUEST
        );
    }
    let next = started.elapsed();
    println!(
        "trickling JWKS: first exchange {} after {first:?}; 20 more in {next:?}; {} bytes trickled",
        a.status,
        sent.load(Ordering::Relaxed)
    );
    assert!(a.status.is_client_error() || a.status.is_server_error(), "{}", a.text);
    assert!(first < Duration::from_secs(3), "{first:?}");
    assert!(next < Duration::from_secs(3), "{next:?}");
    still_healthy(&t).await;
}

#[tokio::test]
async fn a_fifty_megabyte_jwks_is_refused_at_the_size_cap() {
    let (url, sent) = odd_issuer(fifty_megabytes).await;
    let t = with_issuer(&url).await;
    let started = Instant::now();
    let a = t.exchange(&odd_token(&t, &url, "k1"), "pr-review").await;
    let took = started.elapsed();
    // Give the server a moment to notice the closed connection.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sent = sent.load(Ordering::Relaxed);
    println!("50 MB JWKS: {} after {took:?}; the issuer got {sent} bytes out before the broker hung up", a.status);
    assert!(a.status.is_client_error() || a.status.is_server_error(), "{}", a.text);
    assert!(took < Duration::from_secs(3), "{took:?}");
    // Start-up and the miss each read at most the 1 MiB cap (plus what sat in socket buffers).
    assert!(sent < 2 * (latchkey::oidc::MAX_JWKS_BYTES + 8 * 1024 * 1024), "{sent} bytes");
    let health = t.app.verifier.health();
    let odd = health.iter().find(|h| h.id == "odd").unwrap();
    assert!(odd.last_error.as_deref().is_some_and(|e| e.contains("larger")), "{:?}", odd.last_error);
    still_healthy(&t).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_unknown_kids_cost_the_issuer_one_fetch() {
    let t = TestApp::start().await;
    let claims = Value::Object(t.issuer.claims(json!({})));
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    let before = t.issuer.jwks_fetches();
    // Over HTTP, the whole path (audit included), 32 at a time.
    let started = Instant::now();
    let signed = t.issuer.sign(&json!({ "alg": "ES256", "kid": "x" }), &claims);
    let rest = signed.split_once('.').unwrap().1.to_owned();
    let t = Arc::new(t);
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    const N: usize = 10_000;
    for _ in 0..32 {
        let (t, next, rest) = (t.clone(), next.clone(), rest.clone());
        workers.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= N {
                    return;
                }
                let token =
                    format!("{}.{rest}", b64(json!({ "alg": "ES256", "kid": format!("flood-{i}") }).to_string()));
                assert_eq!(t.exchange(&token, "pr-review").await.status, StatusCode::BAD_REQUEST);
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let fetches = t.issuer.jwks_fetches() - before;
    println!("{N} unknown kids over HTTP in {:?}: {fetches} JWKS fetch(es)", started.elapsed());
    assert!(fetches <= 1, "{fetches} JWKS fetches");
    still_healthy(&t).await;
}
