//! Admin and audit through the real interfaces: the listings, the event log's filters, signed
//! checkpoints and verification (against edited, recomputed and truncated logs), the SIEM
//! stream across log rotation, `/v1/explain` with a subject token, and the `latchkey audit` CLI.

use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::support::store::{Store, sqlite_only};
use crate::support::test_app::{ADMIN_KEY, AUDITOR_KEY, SECURITY_KEY, SERVICE_KEY, TestApp, TestIssuer};

/// Claims the example `pr-review` policy (agent `pr-reviewer`, a jwt grant) allows.
fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

/// Claims the example `deploy-staging` policy (agent `staging-deployer`) allows.
fn staging_claims() -> Value {
    json!({ "environment": "staging" })
}

/// Claims the `pr-review` policy refuses: another repository.
fn evil_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge", "repository": "acme/widgets-evil" })
}

async fn list(t: &TestApp, path: &str) -> Value {
    let a = t.get(path, Some(AUDITOR_KEY)).await;
    assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
    a.body
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn listings_say_who_got_what_and_why_and_never_a_secret() {
    let t = TestApp::start().await;
    let pr = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(pr.status, StatusCode::OK, "{}", pr.text);
    let staging = t.exchange(&t.token(staging_claims()), "deploy-staging").await;
    assert_eq!(staging.status, StatusCode::OK, "{}", staging.text);
    let denied = t.exchange(&t.token(evil_claims()), "pr-review").await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);

    // Which credentials are live now, and for whom.
    let live = list(&t, "/v1/credentials?state=live").await;
    assert_eq!(items(&live).len(), 2, "{live}");
    let mine = list(&t, "/v1/credentials?agent=pr-reviewer").await;
    let c = &items(&mine)[0];
    assert_eq!(items(&mine).len(), 1);
    assert_eq!(c["id"], pr.body["credentials"][0]["id"]);
    assert_eq!((c["state"].as_str(), c["live"].as_bool()), (Some("active"), Some(true)));
    assert_eq!(c["repository"], "acme/widgets");
    assert_eq!(c["fingerprint"], pr.body["credentials"][0]["fingerprint"]);
    assert_eq!(items(&list(&t, "/v1/credentials?backend=jwt&capability=deploy-staging").await).len(), 1);
    assert_eq!(items(&list(&t, "/v1/credentials?state=revoked").await).len(), 0);
    assert_eq!(items(&list(&t, "/v1/credentials?repository=acme/other").await).len(), 0);

    // Every denied exchange for a repository, and why.
    let d = list(&t, "/v1/exchanges?decision=denied&repository=acme/widgets-evil").await;
    assert_eq!(items(&d).len(), 1, "{d}");
    let e = &items(&d)[0];
    assert_eq!(e["decision"], "denied");
    assert_eq!(e["request_id"], denied.body["request_id"]);
    assert!(e["reason"].as_str().unwrap().starts_with("policy"), "{e}");
    assert!(!e["trace"].as_array().unwrap().is_empty(), "the full trace: {e}");
    assert!(e["policy_sha256"].as_str().is_some_and(|h| h.len() == 64), "{e}");
    assert_eq!(e["run_id"], "4242");
    let allowed = list(&t, "/v1/exchanges?decision=allowed").await;
    assert_eq!(items(&allowed).len(), 2);
    assert_eq!(items(&list(&t, "/v1/exchanges?agent=pr-reviewer&since=1h").await).len(), 1);
    assert_eq!(items(&list(&t, "/v1/exchanges?until=2000-01-01T00:00:00Z").await).len(), 0);

    // Never a secret: neither the credentials' nor the release token, not even its hash.
    for body in [live.to_string(), list(&t, "/v1/exchanges").await.to_string()] {
        for secret in [&pr.body["access_token"], &pr.body["release_token"], &staging.body["access_token"]] {
            assert!(!body.contains(secret.as_str().unwrap()), "a secret leaked into a listing");
        }
        assert!(!body.contains("release_token") && !body.contains("handle"), "{body}");
    }

    // Bad filters, roles.
    for bad in ["state=alive", "limit=5000", "limit=0", "backend=gcp", "colour=red", "cursor=nonsense", "since=soon"] {
        let a = t.get(&format!("/v1/credentials?{bad}"), Some(AUDITOR_KEY)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_request");
    }
    assert_eq!(t.get("/v1/exchanges", Some(SERVICE_KEY)).await.status, StatusCode::FORBIDDEN);
    assert_eq!(t.get("/v1/credentials", None).await.status, StatusCode::UNAUTHORIZED);

    // Every admin read is itself an audit event naming the key.
    let reads = list(&t, "/v1/audit?event=admin.call&actor=admin-key:test-auditor&limit=1000").await;
    let paths: Vec<_> = items(&reads).iter().map(|i| i["event"]["detail"]["path"].clone()).collect();
    assert!(paths.contains(&json!("/v1/credentials")) && paths.contains(&json!("/v1/exchanges")), "{paths:?}");
    let refused = list(&t, "/v1/audit?event=admin.call&actor=admin-key:test-service").await;
    assert_eq!(items(&refused)[0]["event"]["decision"], "forbidden");
}

#[tokio::test]
async fn cursors_stay_stable_while_rows_arrive_and_audit_filters_apply() {
    let t = TestApp::start().await;
    for _ in 0..3 {
        assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
        t.clock.advance(chrono::Duration::milliseconds(5));
    }
    let first = list(&t, "/v1/exchanges?limit=2").await;
    let cursor = first["next_cursor"].as_str().unwrap().to_owned();
    // New rows arrive between pages: the next page neither repeats nor loses a row.
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    let second = list(&t, &format!("/v1/exchanges?limit=2&cursor={}", urlencode(&cursor))).await;
    let ids: Vec<_> = items(&first).iter().chain(items(&second).iter()).map(|e| e["id"].clone()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    let unique: std::collections::HashSet<_> = ids.iter().map(Value::to_string).collect();
    assert_eq!(unique.len(), 3);
    assert!(second["next_cursor"].is_null());
    let newest = list(&t, "/v1/exchanges?limit=1").await;
    assert!(!ids.contains(&items(&newest)[0]["id"]), "newest first: the new row heads the listing");

    // The event log: by name (or prefix), agent, capability, time; cursors are sequence numbers.
    let allowed = list(&t, "/v1/audit?event=exchange.allowed&agent=pr-reviewer").await;
    assert_eq!(items(&allowed).len(), 4);
    assert!(items(&allowed).iter().all(|i| i["event"]["capability"] == "pr-review"));
    let all_exchange = list(&t, "/v1/audit?event=exchange.*").await;
    assert!(items(&all_exchange).iter().all(|i| i["event"]["event"].as_str().unwrap().starts_with("exchange.")));
    assert_eq!(items(&list(&t, "/v1/audit?capability=deploy-staging").await).len(), 0);
    assert_eq!(items(&list(&t, "/v1/audit?event=exchange.allowed&since=2999-01-01T00:00:00Z").await).len(), 0);
    let page = list(&t, "/v1/audit?event=exchange.allowed&limit=2").await;
    let next = page["next_cursor"].as_str().unwrap();
    let rest = list(&t, &format!("/v1/audit?event=exchange.allowed&cursor={next}")).await;
    assert_eq!(items(&rest).len(), 2);
    assert!(rest["head_seq"].as_i64().unwrap() >= items(&rest)[1]["seq"].as_i64().unwrap());
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A consistent copy of a live SQLite store, as an investigator would take one.
async fn snapshot(t: &TestApp, name: &str) -> Store {
    let to = t.dir.path().join(name);
    let Store::Sqlite { path } = t.store() else { panic!("a SQLite-only helper") };
    let path = path.clone();
    let copy = to.clone();
    tokio::task::spawn_blocking(move || {
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute("VACUUM INTO ?1", [copy.to_str().unwrap()]).unwrap();
    })
    .await
    .unwrap();
    Store::Sqlite { path: to }
}

/// The same edit of one event's body wherever it is made: `pr-reviewer` becomes `pr-helper`.
pub(crate) const EDIT: &str = "UPDATE audit_events SET body = replace(body, 'pr-reviewer', 'pr-helper')";

/// Rewrites event `seq` of a store and recomputes every later hash: what someone with write
/// access to the database, but not the checkpoint key, can do.
pub(crate) async fn rewrite_and_recompute(store: &Store, seq: i64) {
    assert_eq!(store.execute(&format!("{EDIT} WHERE seq = {seq}")).await, 1);
    let prev = store.scalar(&format!("SELECT prev_hash FROM audit_events WHERE seq = {seq}")).await;
    let mut prev = hex::decode(prev.as_str().unwrap()).unwrap();
    let rows = store.query(&format!("SELECT seq, body FROM audit_events WHERE seq >= {seq} ORDER BY seq")).await;
    for row in rows {
        let (s, body) = (row[0].as_i64().unwrap(), row[1].as_str().unwrap());
        let mut h = Sha256::new();
        h.update(&prev);
        h.update(body.as_bytes());
        let hash = h.finalize().to_vec();
        let (p, n) = (hex::encode(&prev), hex::encode(&hash));
        store.execute(&format!("UPDATE audit_events SET prev_hash = '{p}', hash = '{n}' WHERE seq = {s}")).await;
        prev = hash;
    }
}

fn latchkey(args: &[&str], cwd: &Path) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "warn")
        .env_remove("LATCHKEY_ADMIN_KEY")
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The first event of the log that mentions the `pr-reviewer` agent.
pub(crate) async fn first_pr_event(store: &Store) -> i64 {
    store.count("SELECT min(seq) FROM audit_events WHERE body LIKE '%pr-reviewer%'").await
}

fn sqlite_url(store: &Store) -> String {
    let Store::Sqlite { path } = store else { panic!("a SQLite-only helper") };
    format!("sqlite://{}", path.display())
}

/// The server verifies its live store, whichever it is: an edited event is named, and so is
/// an edit whose later hashes were all recomputed, by the checkpoint signed before it.
#[tokio::test]
async fn the_server_names_an_edit_and_a_recomputed_rewrite_of_its_live_store() {
    let t = TestApp::builder().checkpoint_key().start().await;
    for _ in 0..2 {
        assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    }
    let cp = t.post_json("/v1/audit/checkpoints", Some(ADMIN_KEY), &json!({})).await;
    assert_eq!(cp.status, StatusCode::CREATED, "{}", cp.text);
    let cp_seq = cp.body["seq"].as_i64().unwrap();
    let v = list(&t, "/v1/audit/verify").await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checkpoints_checked"].as_i64().unwrap() >= 1, "{v}");

    let target = first_pr_event(t.store()).await;
    assert!(target < cp_seq, "the edited event is under the checkpoint");
    rewrite_and_recompute(t.store(), target).await;
    let v = list(&t, "/v1/audit/verify").await;
    assert_eq!(v["ok"], false, "{v}");
    // A broker that keeps the chain head in memory (SQLite) chains its next event to the old
    // head, which breaks a link after the rewrite too; the checkpoint is what must be named.
    assert!(has_problem(&v, "rewritten", cp_seq), "{v}");

    // A plain edit on top: the chain itself now breaks at that row, and the server says where.
    let second = t.store().count("SELECT max(seq) FROM audit_events WHERE body LIKE '%pr-reviewer%'").await;
    assert_eq!(t.store().execute(&format!("{EDIT} WHERE seq = {second}")).await, 1);
    let v = list(&t, "/v1/audit/verify").await;
    assert_eq!(v["ok"], false, "{v}");
    assert!(has_problem(&v, "bad_hash", second), "{v}");
}

fn has_problem(report: &Value, kind: &str, seq: i64) -> bool {
    report["problems"].as_array().unwrap().iter().any(|p| p["kind"] == kind && p["seq"] == seq)
}

/// Offline verification of copies of the store file, as an investigator would run it.
#[tokio::test]
async fn checkpoints_catch_an_edit_a_recomputed_rewrite_and_a_cut_tail_in_a_sqlite_copy() {
    if !sqlite_only() {
        return;
    }
    let t = TestApp::builder().checkpoint_key().audit("stream = \"audit.jsonl\"").start().await;
    let dir = t.dir.path().to_owned();
    for _ in 0..2 {
        assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    }
    // On demand, role admin; an auditor may not.
    assert_eq!(t.post_json("/v1/audit/checkpoints", Some(AUDITOR_KEY), &json!({})).await.status, StatusCode::FORBIDDEN);
    let cp = t.post_json("/v1/audit/checkpoints", Some(ADMIN_KEY), &json!({})).await;
    assert_eq!(cp.status, StatusCode::CREATED, "{}", cp.text);
    let cp_seq = cp.body["seq"].as_i64().unwrap();
    assert_eq!(t.exchange(&t.token(staging_claims()), "deploy-staging").await.status, StatusCode::OK);
    let listed = list(&t, "/v1/audit/checkpoints").await;
    assert_eq!(items(&listed)[0]["signature"], cp.body["signature"]);
    let public_key = listed["signing_key"]["public_key"].as_str().unwrap().to_owned();
    let on_chain = list(&t, "/v1/audit?event=audit.checkpoint").await;
    assert_eq!(items(&on_chain)[0]["event"]["detail"]["seq"], cp_seq, "the checkpoint is on the chain too");

    // The live log verifies, on the server.
    let v = list(&t, "/v1/audit/verify").await;
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["checkpoints_checked"].as_i64().unwrap() >= 1 && v["signatures_checked"] == true, "{v}");

    // An intact copy verifies offline, with the public key alone.
    let intact = snapshot(&t, "intact.db").await;
    let store = sqlite_url(&intact);
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store, "--public-key", &public_key], &dir);
    assert!(ok, "{out}");
    assert!(out.contains("audit chain OK"), "{out}");
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store], &dir);
    assert!(!ok && out.contains("public key"), "refuses to vouch without the key: {out}");

    // 1. One edited row: the chain breaks at that row.
    let edited = snapshot(&t, "edited.db").await;
    let target = first_pr_event(&edited).await;
    assert_eq!(edited.execute(&format!("{EDIT} WHERE seq = {target}")).await, 1);
    let store = sqlite_url(&edited);
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store, "--key-file", "checkpoint.key"], &dir);
    assert!(!ok, "{out}");
    assert!(out.contains(&format!("first broken link: event {target}:")), "{out}");

    // 2. The same edit with every later hash recomputed: the chain holds, the checkpoint does not.
    let rewritten = snapshot(&t, "rewritten.db").await;
    rewrite_and_recompute(&rewritten, target).await;
    let store = sqlite_url(&rewritten);
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store, "--key-file", "checkpoint.key", "--json"], &dir);
    assert!(!ok, "{out}");
    let report: Value = serde_json::from_str(&out).unwrap();
    let first = &report["problems"][0];
    assert_eq!((first["kind"].as_str(), first["seq"].as_i64()), (Some("rewritten"), Some(cp_seq)), "{report}");
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "the chain itself is consistent: {report}");

    // 3. A cut tail: the last checkpoint names an event beyond the end.
    let cut = snapshot(&t, "cut.db").await;
    cut.execute(&format!("DELETE FROM audit_events WHERE seq >= {}", cp_seq - 1)).await;
    let store = sqlite_url(&cut);
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store, "--key-file", "checkpoint.key"], &dir);
    assert!(!ok, "{out}");
    assert!(out.contains("truncated") && out.contains(&format!("ends at event {}", cp_seq - 2)), "{out}");

    // 3b. The tail and the stored checkpoints removed together: the stream's copy still tells.
    wait_for(|| stream_seqs(&dir.join("audit.jsonl")).contains(&(cp_seq + 1)), "the stream to carry the checkpoint")
        .await;
    cut.execute("DELETE FROM audit_checkpoints").await;
    let (ok, out) = latchkey(&["audit", "verify", "--store", &store, "--key-file", "checkpoint.key"], &dir);
    assert!(ok, "without any copy of the checkpoint the cut is invisible: {out}");
    let (ok, out) = latchkey(
        &["audit", "verify", "--store", &store, "--key-file", "checkpoint.key", "--checkpoints", "audit.jsonl"],
        &dir,
    );
    assert!(!ok && out.contains("truncated"), "{out}");

    // A range check proves its range; the server names the break in the live store too.
    let (ok, out) = latchkey(
        &["audit", "verify", "--store", &sqlite_url(&edited), "--key-file", "checkpoint.key"]
            .into_iter()
            .chain(["--from", &(target + 1).to_string()])
            .collect::<Vec<_>>(),
        &dir,
    );
    assert!(ok, "{out}");
    assert_eq!(t.store().execute(&format!("{EDIT} WHERE seq = {target}")).await, 1);
    let v = list(&t, "/v1/audit/verify").await;
    assert_eq!(v["ok"], false);
    assert_eq!((v["problems"][0]["seq"].as_i64(), v["problems"][0]["kind"].as_str()), (Some(target), Some("bad_hash")));
}

fn stream_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("every stream line is one JSON object"))
        .collect()
}

fn stream_seqs(path: &Path) -> Vec<i64> {
    stream_lines(path).iter().map(|l| l["seq"].as_i64().unwrap()).collect()
}

/// Waits without blocking the runtime: the broker's stream runs on it.
async fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_stream_carries_every_event_as_the_api_shows_it_and_follows_rotation() {
    let t = TestApp::builder().audit("stream = \"audit.jsonl\"").start().await;
    let dir = t.dir.path().to_owned();
    let path = dir.join("audit.jsonl");
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    assert_eq!(t.exchange(&t.token(evil_claims()), "pr-review").await.status, StatusCode::FORBIDDEN);
    let api = list(&t, "/v1/audit?limit=1000").await;
    let last = items(&api).last().unwrap()["seq"].as_i64().unwrap();
    wait_for(|| stream_seqs(&path).contains(&last), "the stream to catch up").await;
    // Each line is exactly the API's item: one schema.
    let lines = stream_lines(&path);
    for item in items(&api) {
        let line = lines.iter().find(|l| l["seq"] == item["seq"]).unwrap();
        assert_eq!(line, &item);
    }
    let denied = lines.iter().find(|l| l["event"]["event"] == "exchange.denied").unwrap();
    for f in ["time", "request_id", "actor", "issuer", "subject", "repository", "workflow", "run_id", "reason"] {
        assert!(denied["event"].get(f).is_some(), "{f} missing from {denied}");
    }

    // Rotation: the file is moved away; the next events go to a new file at the path.
    std::fs::rename(&path, dir.join("audit.jsonl.1")).unwrap();
    assert_eq!(t.exchange(&t.token(staging_claims()), "deploy-staging").await.status, StatusCode::OK);
    let head = items(&list(&t, "/v1/audit?limit=1000").await).last().unwrap()["seq"].as_i64().unwrap();
    wait_for(|| stream_seqs(&path).contains(&head), "the stream to reopen its file").await;
    let mut all = stream_seqs(&dir.join("audit.jsonl.1"));
    all.extend(stream_seqs(&path));
    assert_eq!(all, (1..=*all.last().unwrap()).collect::<Vec<i64>>(), "every event exactly once, in order");
}

#[tokio::test]
async fn the_stream_resumes_after_a_restart_without_loss_or_repeats() {
    use latchkey::stream::{Sink, pump};
    let t = TestApp::builder().no_background().audit("stream = \"audit.jsonl\"").start().await;
    let dir = t.dir.path().to_owned();
    let open = |t: &TestApp| Sink::open("audit.jsonl", |p| t.app.config.resolve(p)).unwrap();
    assert_eq!(t.exchange(&t.token(pr_claims()), "pr-review").await.status, StatusCode::OK);
    let mut sink = open(&t);
    let n = pump(&t.app, &mut sink).await.unwrap();
    assert!(n >= 2, "{n}");
    assert_eq!(pump(&t.app, &mut sink).await.unwrap(), 0, "nothing new, nothing written");
    drop(sink);
    let t = t.restart().await;
    assert_eq!(t.exchange(&t.token(staging_claims()), "deploy-staging").await.status, StatusCode::OK);
    let mut sink = open(&t);
    assert!(pump(&t.app, &mut sink).await.unwrap() >= 1);
    let seqs = stream_seqs(&dir.join("audit.jsonl"));
    let head = items(&list(&t, "/v1/audit?limit=1000").await).iter().map(|i| i["seq"].as_i64().unwrap()).max().unwrap();
    assert_eq!(seqs, (1..=head - 1).collect::<Vec<i64>>(), "every event once, across the restart");
}

#[tokio::test]
async fn explain_verifies_a_subject_token_without_spending_it_and_names_a_kill_rule() {
    let t = TestApp::start().await;
    let token = t.token(pr_claims());
    let body = json!({ "capability": "pr-review", "subject_token": token });
    assert_eq!(t.post_json("/v1/explain", Some(SECURITY_KEY), &body).await.status, StatusCode::FORBIDDEN);
    let e = t.post_json("/v1/explain", Some(ADMIN_KEY), &body).await;
    assert_eq!(e.status, StatusCode::OK, "{}", e.text);
    assert_eq!((e.body["decision"].as_str(), e.body["token"]["outcome"].as_str()), (Some("allow"), Some("valid")));
    assert!(!e.body["trace"].as_array().unwrap().is_empty());
    assert_eq!(t.credential_count().await, 0, "explain mints nothing");
    // Not spent: the token still exchanges once, and then explain says it is replayed.
    assert_eq!(t.exchange(&token, "pr-review").await.status, StatusCode::OK);
    let e = t.post_json("/v1/explain", Some(ADMIN_KEY), &body).await;
    assert_eq!((e.body["decision"].as_str(), e.body["reason"].as_str()), (Some("deny"), Some("replayed_jti")));
    // A forged token is rejected with its reason.
    let forged = format!("{}x", &t.token(pr_claims()));
    let e = t
        .post_json("/v1/explain", Some(ADMIN_KEY), &json!({ "capability": "pr-review", "subject_token": forged }))
        .await;
    assert_eq!(e.body["token"]["outcome"], "rejected", "{}", e.text);

    // A kill rule on the agent shows in the explanation.
    let k = t
        .post_json(
            "/v1/kills",
            Some(SECURITY_KEY),
            &json!({ "selector": { "agent": "pr-reviewer" }, "reason": "test" }),
        )
        .await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let mut claims = t.issuer.claims(pr_claims());
    claims.remove("jti");
    let e = t.post_json("/v1/explain", Some(ADMIN_KEY), &json!({ "capability": "pr-review", "claims": claims })).await;
    assert_eq!((e.body["decision"].as_str(), e.body["reason"].as_str()), (Some("deny"), Some("killed")), "{}", e.text);
    assert_eq!(e.body["kill_rule"], k.body["id"]);
    // Who flipped which kill-switch: one query.
    let kills = list(&t, "/v1/audit?event=kill.*").await;
    assert_eq!(items(&kills)[0]["event"]["actor"], "admin-key:test-security");
}

async fn cli(t: &TestApp, key: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.args(args).env("LATCHKEY_URL", &t.url).env("RUST_LOG", "warn").env_remove("LATCHKEY_ADMIN_KEY");
    c.current_dir(t.dir.path());
    if let Some(k) = key {
        c.env("LATCHKEY_ADMIN_KEY", k);
    }
    let out = c.output().await.unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[tokio::test]
async fn the_cli_lists_follows_checkpoints_verifies_and_explains() {
    let t = TestApp::builder().checkpoint_key().start().await;
    let pr = t.exchange(&t.token(pr_claims()), "pr-review").await;
    assert_eq!(t.exchange(&t.token(evil_claims()), "pr-review").await.status, StatusCode::FORBIDDEN);

    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["audit", "credentials", "--state", "live"]).await;
    assert!(ok, "{out}");
    assert!(out.starts_with("ID") && out.contains("pr-reviewer") && out.contains("yes"), "{out}");
    assert!(!out.contains(pr.body["access_token"].as_str().unwrap()));
    let (ok, out) = cli(
        &t,
        Some(AUDITOR_KEY),
        &["audit", "exchanges", "--decision", "denied", "--repository", "acme/widgets-evil"],
    )
    .await;
    assert!(ok && out.contains("denied") && out.contains("policy"), "{out}");
    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["audit", "exchanges", "--json", "--limit", "1"]).await;
    assert!(ok, "{out}");
    let page: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(items(&page).len(), 1);
    assert!(page["next_cursor"].is_string());
    let (ok, out) =
        cli(&t, Some(AUDITOR_KEY), &["audit", "events", "--event", "exchange.*", "--agent", "pr-reviewer"]).await;
    assert!(ok && out.contains("exchange.allowed") && !out.contains("admin.call"), "{out}");
    let (ok, out) = cli(&t, Some(SERVICE_KEY), &["audit", "credentials"]).await;
    assert!(!ok && out.contains("role"), "{out}");

    // --follow prints new events as they come, and not its own polls.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["audit", "events", "--follow", "--json", "--interval", "100ms"])
        .env("LATCHKEY_URL", &t.url)
        .env("LATCHKEY_ADMIN_KEY", AUDITOR_KEY)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(t.exchange(&t.token(staging_claims()), "deploy-staging").await.status, StatusCode::OK);
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|e: &Value| e["event"]["capability"] == "deploy-staging") {
        let line = tokio::time::timeout_at(deadline, lines.next_line()).await.expect("follow printed the new event");
        seen.push(serde_json::from_str(&line.unwrap().unwrap()).unwrap());
    }
    child.kill().await.unwrap();
    let seqs: Vec<i64> = seen.iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, once: {seqs:?}");
    let polls =
        seen.iter().filter(|e| e["event"]["event"] == "admin.call" && e["event"]["actor"] == "admin-key:test-auditor");
    assert!(polls.count() <= 4, "the earlier CLI calls may show, its own polls do not: {seen:?}");

    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["audit", "checkpoint"]).await;
    assert!(!ok && out.contains("admin"), "{out}");
    let (ok, out) = cli(&t, Some(ADMIN_KEY), &["audit", "checkpoint"]).await;
    assert!(ok && out.contains("checkpoint signed"), "{out}");
    let (ok, out) = cli(&t, Some(AUDITOR_KEY), &["audit", "verify"]).await;
    assert!(ok && out.contains("audit chain OK") && out.contains("signatures valid"), "{out}");
    let (ok, out) = cli(&t, None, &["audit", "public-key", "--key-file", "checkpoint.key"]).await;
    assert!(ok, "{out}");
    assert_eq!(out.lines().next().unwrap().len(), 44, "32 bytes in base64: {out}");

    std::fs::write(t.dir.path().join("token"), t.token(pr_claims())).unwrap();
    let (ok, out) =
        cli(&t, Some(ADMIN_KEY), &["audit", "explain", "--capability", "pr-review", "--token-file", "token"]).await;
    assert!(ok && out.contains("decision:   allow") && out.contains("token:      valid"), "{out}");
}

#[tokio::test]
async fn admin_keys_reload_from_the_config_without_a_restart() {
    let t = TestApp::builder().no_background().start().await;
    let path = t.dir.path().join("latchkey.toml");
    let original = std::fs::read_to_string(&path).unwrap();
    let new_key = "lk_test_new_auditor";
    assert_eq!(t.get("/v1/credentials", Some(new_key)).await.status, StatusCode::UNAUTHORIZED);
    // Add a key and revoke the old auditor key (its entry now names another hash).
    let auditor_hash = crate::support::test_app::sha256_hex(AUDITOR_KEY);
    let edited = original.replace(&auditor_hash, &"0".repeat(64))
        + &format!(
            "\n[[admin_key]]\nname = \"new-auditor\"\nrole = \"auditor\"\nsha256 = \"{}\"\n",
            crate::support::test_app::sha256_hex(new_key)
        );
    std::fs::write(&path, &edited).unwrap();
    assert!(latchkey::worker::reload_admin_keys(&t.app).await);
    assert_eq!(t.get("/v1/credentials", Some(new_key)).await.status, StatusCode::OK);
    assert_eq!(t.get("/v1/credentials", Some(AUDITOR_KEY)).await.status, StatusCode::UNAUTHORIZED);
    // A file that no longer loads changes nothing, and says so in the audit trail.
    std::fs::write(&path, edited.replace("[[admin_key]]", "[[admin_keyy]]")).unwrap();
    assert!(!latchkey::worker::reload_admin_keys(&t.app).await);
    assert_eq!(t.get("/v1/credentials", Some(new_key)).await.status, StatusCode::OK);
    let events = list_as(&t, new_key, "/v1/audit?event=admin.keys_*").await;
    let names: Vec<_> = items(&events).iter().map(|i| i["event"]["event"].clone()).collect();
    assert_eq!(names, [json!("admin.keys_reloaded"), json!("admin.keys_reload_failed")]);
    assert!(!events.to_string().contains(&auditor_hash), "key hashes stay out of the trail");
}

#[tokio::test]
async fn people_sign_in_through_the_admin_identity_provider_whose_groups_map_to_roles() {
    let idp = TestIssuer::start_with_kid("idp-key").await;
    let t = TestApp::builder()
        .config(&format!(
            "[admin_oidc]\nissuer = \"{}\"\naudience = \"latchkey-admin\"\nalgorithms = [\"ES256\"]\n\
             roles = {{ \"sec-oncall\" = \"security\", \"auditors\" = \"auditor\" }}\n",
            idp.url
        ))
        .start()
        .await;
    let person = |sub: &str, groups: Value| idp.token(json!({ "aud": "latchkey-admin", "sub": sub, "groups": groups }));
    let alice = person("alice@example.com", json!(["staff", "auditors"]));
    assert_eq!(t.get("/v1/credentials", Some(&alice)).await.status, StatusCode::OK);
    let kill = json!({ "selector": { "agent": "pr-reviewer" }, "reason": "drill", "dry_run": true });
    assert_eq!(t.post_json("/v1/kills", Some(&alice), &kill).await.status, StatusCode::FORBIDDEN, "auditor only");
    let bob = person("bob@example.com", json!(["sec-oncall"]));
    let dry = t.post_json("/v1/kills", Some(&bob), &kill).await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.text);

    // No mapped group, another audience, another issuer: nothing.
    let mallory = person("mallory@example.com", json!(["staff"]));
    let wrong_aud = idp.token(json!({ "aud": "something-else", "sub": "eve", "groups": ["sec-oncall"] }));
    let ci_token = t.token(json!({ "aud": "latchkey-admin", "groups": ["sec-oncall"] }));
    for token in [&mallory, &wrong_aud, &ci_token] {
        assert_eq!(t.get("/v1/credentials", Some(token)).await.status, StatusCode::UNAUTHORIZED);
    }

    // The trail names the person, and why a token was refused.
    let calls = list(&t, "/v1/audit?event=admin.call&limit=1000").await;
    let actors: Vec<_> = items(&calls).iter().map(|i| i["event"]["actor"].clone()).collect();
    assert!(actors.contains(&json!("oidc:alice@example.com")) && actors.contains(&json!("oidc:bob@example.com")));
    let refused =
        items(&calls).into_iter().find(|i| i["event"]["reason"].as_str().is_some_and(|r| r.contains("mallory")));
    assert!(refused.unwrap()["event"]["reason"].as_str().unwrap().contains("none of its groups"));
    let dry_run = list(&t, "/v1/audit?event=kill.dry_run").await;
    assert_eq!(items(&dry_run)[0]["event"]["actor"], "oidc:bob@example.com");
}

async fn list_as(t: &TestApp, key: &str, path: &str) -> Value {
    let a = t.get(path, Some(key)).await;
    assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text);
    a.body
}

#[tokio::test]
async fn the_audit_api_is_described_in_openapi() {
    let t = TestApp::builder().no_background().start().await;
    let o = t.get("/openapi.json", None).await;
    for (path, method) in [
        ("/v1/credentials", "get"),
        ("/v1/exchanges", "get"),
        ("/v1/audit", "get"),
        ("/v1/audit/checkpoints", "get"),
        ("/v1/audit/checkpoints", "post"),
        ("/v1/audit/verify", "get"),
        ("/v1/explain", "post"),
    ] {
        assert!(o.body["paths"][path].get(method).is_some(), "{method} {path} missing from openapi.json");
    }
    for schema in
        ["CredentialPage", "ExchangePage", "AuditPage", "AuditItem", "AuditEvent", "Checkpoint", "VerifyReport"]
    {
        assert!(o.body["components"]["schemas"].get(schema).is_some(), "{schema} missing");
    }
}
