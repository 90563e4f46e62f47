//! Faults around a single broker, driven through its real interface: the `latchkey serve`
//! process SIGKILLed under load on SQLite, its SQLite disk full, and its OIDC issuer down.
//! (Several replicas and PostgreSQL faults: `tests/it/postgres_replicas.rs`.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::peers::{OidcPeer, Outage};
use crate::support::replicas::{Fleet, RATED, Seen, assert_acknowledged_are_recorded, collect, load};
use crate::support::store::sqlite_only;
use crate::support::test_app::{AUDIENCE, TestApp};

/// The SQLite broker SIGKILLed while four clients exchange: each client got a 200 or no answer;
/// the file as the kill left it (its WAL not checkpointed) verifies offline; a new process on
/// it is ready and issues at once; and every exchange answered 200 has its row, its credential
/// and its `exchange.allowed` event, and no active credential lacks them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sqlite_broker_killed_under_load_loses_no_acknowledged_exchange() {
    if !sqlite_only() {
        return;
    }
    let fleet = Arc::new(Fleet::sqlite().await);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, &[0], 4, &stop);
    tokio::time::sleep(Duration::from_millis(800)).await;
    fleet.replicas[0].sigkill();
    let killed = Instant::now();
    // Long enough for every client to find the process gone.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = collect(workers).await;
    let mut fleet = Arc::try_unwrap(fleet).unwrap_or_else(|_| panic!("the load workers are done"));

    for s in &seen {
        assert!(s.status == StatusCode::OK || s.status.as_u16() == 599, "around the kill: {s:?}");
    }
    let ok: Vec<&Seen> = seen.iter().filter(|s| s.status == StatusCode::OK).collect();
    assert!(ok.len() >= 4, "too little load to mean anything: {} exchanges answered 200", ok.len());
    let unanswered = seen.iter().filter(|s| s.status.as_u16() == 599 && s.sent <= killed).count();

    // The store as the kill left it, offline, through the CLI.
    let (verified, out) = fleet.audit_verify_offline();
    assert!(verified, "audit verify of the killed store: {out}");

    // A new process on the same file: ready at its first probe, issuing at its first exchange.
    let listening = fleet.respawn(0).await;
    let (status, body) = fleet.readyz(0).await;
    assert_eq!(status, StatusCode::OK, "the restarted broker is not ready at once: {body}");
    let first = fleet.exchange_pr(0).await;
    assert_eq!(first.status, StatusCode::OK, "the restarted broker's first exchange: {}", first.text);

    let active = assert_acknowledged_are_recorded(&fleet, &seen, 0).await;
    // pr-review's one grant is local: an exchange commits whole or not at all, so the kill can
    // leave nothing pending. Besides the acknowledged exchanges and the one after the restart,
    // only an exchange in flight may be active: committed, its answer cut by the kill.
    assert!(
        ok.iter().all(|s| active.contains(s.credential_id.as_deref().unwrap())),
        "an acknowledged credential is not active"
    );
    let extra = active.len().checked_sub(ok.len() + 1).expect("fewer active credentials than acknowledged exchanges");
    assert!(extra <= unanswered, "{extra} active credentials beyond the acknowledged ones and those in flight");
    let pending = fleet.store.count("SELECT count(*) FROM credentials WHERE state = 'pending'").await;
    assert_eq!(pending, 0, "the kill left pending credentials");
    let (verified, out) = fleet.audit_verify(0);
    assert!(verified, "audit verify after the restart: {out}");
    println!(
        "fault: SQLite broker SIGKILLed under load; {} exchanges answered 200, {unanswered} in flight got no \
         answer ({extra} of them committed); the new process listened after {} ms",
        ok.len(),
        listening.as_millis()
    );
}

/// The disk under the SQLite store fills up while clients exchange (the process's file size
/// limit drops to 0, so every write fails, as on a disk without a free block): exchanges fail
/// closed with 503 `temporarily_unavailable` and no token, nothing is left issued without its
/// record, and once there is space again the same process issues again, without a restart, on
/// a chain that verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_sqlite_disk_fails_exchanges_closed_and_the_broker_recovers_without_a_restart() {
    if !sqlite_only() {
        return;
    }
    let fleet = Arc::new(Fleet::sqlite().await);
    // The first exchange also makes the jwt signing key; the rest only append.
    assert_eq!(fleet.exchange_pr(0).await.status, StatusCode::OK);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, &[0], 3, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    fleet.replicas[0].limit_file_size(Some(0));
    let full = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;

    // While the disk is full: what a client and an operator see.
    let refused = fleet.exchange_pr(0).await;
    // A rated capability writes its bucket first: that write fails before anything of the
    // exchange is on record, and is refused and counted all the same.
    let rated = fleet.exchange(0, &fleet.pr_token(), RATED).await;
    let (ready, readyz) = fleet.readyz(0).await;
    let metrics = fleet.get(0, "/metrics", "").await.text;
    // An exchange answered before the limit starts to lift met a full disk; one sent after it
    // has lifted meets free space; one in between may meet either.
    let lifting = Instant::now();
    fleet.replicas[0].limit_file_size(None);
    let freed = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = collect(workers).await;

    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE, "with the disk full: {}", refused.text);
    assert_eq!(refused.body["error"], "temporarily_unavailable", "{}", refused.text);
    assert!(refused.body.get("access_token").is_none() && refused.body.get("credentials").is_none());
    let said = refused.body["error_description"].as_str().unwrap().to_lowercase();
    assert!(!said.contains("latchkey.db") && !said.contains("sqlite"), "store detail reached the client: {said}");
    assert_eq!(ready, StatusCode::OK, "{readyz}");
    let failed = metric(&metrics, r#"latchkey_exchanges_total{capability="pr-review",decision="failed"}"#);
    assert!(failed > 0.0, "the refusals are not counted as failed exchanges:\n{metrics}");
    assert_eq!(rated.status, StatusCode::SERVICE_UNAVAILABLE, "with the disk full: {}", rated.text);
    assert_eq!(rated.body["error"], "temporarily_unavailable", "{}", rated.text);
    let failed = metric(&metrics, &format!(r#"latchkey_exchanges_total{{capability="{RATED}",decision="failed"}}"#));
    assert_eq!(failed, 1.0, "the refused exchange of {RATED} is not counted as failed:\n{metrics}");

    // Each exchange was issued with its record, or refused without a token; nothing else.
    for s in &seen {
        match s.status {
            StatusCode::OK => assert!(s.has_token, "{s:?}"),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(s.error.as_deref(), Some("temporarily_unavailable"), "{s:?}");
                assert!(!s.has_token, "a refusal carried a token: {s:?}");
            }
            other => panic!("around the full disk: {other} {s:?}"),
        }
    }
    // Give the batch in flight when the limit fell 200 ms to meet it.
    let settled = full + Duration::from_millis(200);
    let during: Vec<&Seen> = seen.iter().filter(|s| s.sent > settled && s.answered < lifting).collect();
    assert!(!during.is_empty(), "no exchange was sent while the disk was full");
    let allowed: Vec<&&Seen> = during.iter().filter(|s| s.status == StatusCode::OK).collect();
    assert!(allowed.is_empty(), "issued with the disk full: {allowed:?}");
    let after = seen.iter().filter(|s| s.sent > freed && s.status == StatusCode::OK).count();
    assert!(after > 0, "nothing was issued once the disk had space again:\n{}", fleet.replicas[0].log_tail(30));
    let again = fleet.exchange_pr(0).await;
    assert_eq!(again.status, StatusCode::OK, "after the disk was freed: {}", again.text);

    let ok = seen.iter().filter(|s| s.status == StatusCode::OK).count();
    let active = assert_acknowledged_are_recorded(&fleet, &seen, 0).await;
    let mut acknowledged = seen.iter().filter_map(|s| s.credential_id.as_deref());
    assert!(acknowledged.all(|id| active.contains(id)), "an acknowledged credential is not active");
    // The acknowledged ones, the exchange before the load and the one after it: no more.
    assert_eq!(active.len(), ok + 2, "active credentials besides the acknowledged ones");
    let (verified, out) = fleet.audit_verify(0);
    assert!(verified, "audit verify after the full disk: {out}");
    let (verified, out) = fleet.audit_verify_offline();
    assert!(verified, "offline audit verify after the full disk: {out}");
    println!(
        "fault: SQLite disk full for {} ms under load; {} exchanges refused with 503, {} answered 200 ({after} after \
         the space came back)",
        (freed - full).as_millis(),
        seen.iter().filter(|s| s.status == StatusCode::SERVICE_UNAVAILABLE).count(),
        ok,
    );
}

/// The value of one sample of an OpenMetrics text, 0 when it is absent.
fn metric(text: &str, sample: &str) -> f64 {
    text.lines().find_map(|line| line.strip_prefix(sample).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// The outbound timeout of the broker in the issuer test: how long one key fetch may take.
const OUTBOUND_TIMEOUT: Duration = Duration::from_secs(2);

/// The issuer goes down after latchkey fetched its keys, first refusing connections, then
/// accepting them and never answering. Tokens signed with a cached key keep being exchanged,
/// promptly even while a key fetch hangs; a token naming a key latchkey has not seen (the
/// issuer rotated) is refused with `invalid_grant`, within the outbound timeout; `/readyz` stays
/// ready and shows the issuer's error, and `latchkey_issuer_up` drops to 0 for that issuer
/// only. Once the issuer is back, the next key miss fetches the new key and health recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_its_issuer_down_the_broker_keeps_cached_keys_and_refuses_unknown_ones_promptly() {
    let Some(shared) = OidcPeer::from_env() else { return };
    let peer = shared.new_issuer("ES256").await;
    let t = TestApp::builder()
        .policy("peer-review.toml", crate::peer_exchange::PEER_POLICY)
        .config(&format!(
            "[[issuer]]\nid = \"peer-actions\"\nkind = \"github\"\nurl = \"{}\"\nalgorithms = [\"ES256\"]\n\
             max_token_age = \"10m\"\n\n[limits]\noutbound_timeout = \"{}s\"\n",
            peer.url(),
            OUTBOUND_TIMEOUT.as_secs()
        ))
        .start()
        .await;
    let exchange = |token: String| {
        let t = &t;
        async move {
            let started = Instant::now();
            let a = t.exchange(&token, "peer-review").await;
            (a, started.elapsed())
        }
    };
    let (a, _) = exchange(peer.token(AUDIENCE, json!({})).await).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let healthy = issuer_health(&t, "peer-actions").await;
    assert!(healthy["last_error"].is_null() && healthy["keys"] == 1, "{healthy}");

    // Tokens made while the issuer is up: under the key latchkey holds, and under a key it has
    // not fetched (the issuer rotates; its old key stays published).
    let mut cached = Vec::new();
    for _ in 0..3 {
        cached.push(peer.token(AUDIENCE, json!({})).await);
    }
    peer.rotate().await;
    let rotated = peer.token(AUDIENCE, json!({})).await;

    // 1. Connections refused.
    peer.outage(Outage::Refused).await;
    let (a, took) = exchange(cached.pop().unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "a cached key with the issuer down: {}", a.text);
    assert!(took < Duration::from_secs(1), "a cached key took {took:?}");
    let (a, took) = exchange(rotated.clone()).await;
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{}", a.text);
    assert!(took < OUTBOUND_TIMEOUT, "an unknown key with the issuer refusing connections took {took:?}");
    let down = assert_issuer_down(&t, &healthy).await;

    // 2. Connections accepted, never answered: the key fetch waits for the outbound timeout,
    // and only the exchange that caused it waits with it. (Another key miss may fetch 30 s after
    // the last one: the broker's clock moves instead of the test sleeping.)
    peer.outage(Outage::Hanging).await;
    t.clock.advance(chrono::Duration::seconds(31));
    let missing = tokio::spawn({
        let (client, url, token) = (t.client.clone(), t.url.clone(), rotated.clone());
        async move {
            let started = Instant::now();
            let form = [
                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                ("subject_token", token.as_str()),
                ("scope", "peer-review"),
            ];
            let r = client.post(format!("{url}/v1/token")).form(&form).send().await.unwrap();
            (crate::support::test_app::answer(r).await, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (a, took) = exchange(cached.pop().unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "a cached key while a key fetch hangs: {}", a.text);
    assert!(took < Duration::from_secs(1), "a cached key waited {took:?} behind the hanging fetch");
    let (ready, _) = readyz(&t).await;
    assert_eq!(ready, StatusCode::OK, "/readyz while a key fetch hangs");
    let (a, took) = missing.await.unwrap();
    assert_eq!((a.status, a.body["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_grant")), "{}", a.text);
    assert!(took < OUTBOUND_TIMEOUT + Duration::from_secs(2), "an unknown key with the issuer hanging took {took:?}");
    let hung = assert_issuer_down(&t, &healthy).await;
    let failures = |entry: &Value| entry["refresh_failures"].as_f64().unwrap();
    assert!(failures(&hung) > failures(&down), "the hanging fetch is not counted: {hung}");

    // 3. Back up: the next key miss fetches the rotated key; health recovers.
    peer.outage(Outage::Up).await;
    t.clock.advance(chrono::Duration::seconds(31));
    let (a, _) = exchange(rotated).await;
    assert_eq!(a.status, StatusCode::OK, "the rotated key once the issuer is back: {}", a.text);
    let (a, _) = exchange(cached.pop().unwrap()).await;
    assert_eq!(a.status, StatusCode::OK, "the old key, still published: {}", a.text);
    let back = issuer_health(&t, "peer-actions").await;
    assert!(back["last_error"].is_null(), "{back}");
    assert_eq!(back["keys"], 2, "{back}");
    assert_ne!(back["last_refresh_ok"], healthy["last_refresh_ok"], "{back}");
    let m = t.get("/metrics", None).await.text;
    assert_eq!(metric(&m, r#"latchkey_issuer_up{issuer="peer-actions"}"#), 1.0, "{m}");
}

/// `/readyz`: its status and body.
async fn readyz(t: &TestApp) -> (StatusCode, Value) {
    let a = t.get("/readyz", None).await;
    (a.status, a.body)
}

/// The `/readyz` entry of one issuer, and `/readyz` still says ready.
async fn issuer_health(t: &TestApp, id: &str) -> Value {
    let (status, body) = readyz(t).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["ready"], true, "{body}");
    let issuers = body["issuers"].as_array().unwrap();
    let mut entry = issuers.iter().find(|i| i["id"] == id).unwrap_or_else(|| panic!("{id} not in {body}")).clone();
    let m = t.get("/metrics", None).await.text;
    entry["refresh_failures"] = json!(metric(&m, &format!(r#"latchkey_jwks_refresh_failures{{issuer="{id}"}}"#)));
    entry
}

/// What an operator sees of `peer-actions` being down, compared with when it was `healthy`: the
/// replica stays ready, the issuer keeps its cached key and shows its error, its
/// `latchkey_issuer_up` is 0, the other issuer's 1. Returns the issuer's `/readyz` entry.
async fn assert_issuer_down(t: &TestApp, healthy: &Value) -> Value {
    let entry = issuer_health(t, "peer-actions").await;
    assert!(entry["last_error"].is_string(), "the outage is not shown: {entry}");
    assert_eq!(entry["keys"], 1, "the cached key is kept: {entry}");
    assert_eq!(entry["last_refresh_ok"], healthy["last_refresh_ok"], "{entry}");
    let other = issuer_health(t, "github-actions").await;
    assert!(other["last_error"].is_null(), "{other}");
    let m = t.get("/metrics", None).await.text;
    assert_eq!(metric(&m, r#"latchkey_issuer_up{issuer="peer-actions"}"#), 0.0, "{m}");
    assert_eq!(metric(&m, r#"latchkey_issuer_up{issuer="github-actions"}"#), 1.0, "{m}");
    assert!(entry["refresh_failures"].as_f64().unwrap() >= 1.0, "{entry}");
    entry
}
