//! The kill-switch through its HTTP API: kills, dry runs, the race with exchanges in flight,
//! lifts and lapses, single revocations, a failing backend and a restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use async_trait::async_trait;
use latchkey::backend::{Backend, BackendError, MintRequest, Minted, SecretFields};
use latchkey::ledger::CredentialRow;
use latchkey::policy::BackendKind;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::store::truthy;
use crate::support::test_app::{AUDITOR_KEY, Answer, SECURITY_KEY, SERVICE_KEY, TestApp};

/// Claims the example `pr-review` policy (agent `pr-reviewer`, a jwt grant) allows.
fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

/// Claims the example `deploy-staging` policy (agent `staging-deployer`) allows.
fn staging_claims() -> Value {
    json!({ "environment": "staging" })
}

async fn exchange_pr(t: &TestApp) -> Answer {
    t.exchange(&t.token(pr_claims()), "pr-review").await
}

async fn kill(t: &TestApp, body: Value) -> Answer {
    t.post_json("/v1/kills", Some(SECURITY_KEY), &body).await
}

async fn show(t: &TestApp, id: &str) -> Value {
    let a = t.get(&format!("/v1/kills/{id}"), Some(AUDITOR_KEY)).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body
}

async fn introspect_active(t: &TestApp, token: &str) -> bool {
    let a = t.post_form("/v1/introspect", Some(SERVICE_KEY), &[("token", token)]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["active"].as_bool().unwrap()
}

async fn run_jobs(t: &TestApp) -> usize {
    latchkey::worker::run_jobs(&t.app).await.unwrap()
}

async fn count(t: &TestApp, sql: &str) -> i64 {
    t.store().count(sql).await
}

async fn credential_state(t: &TestApp, id: &str) -> String {
    let state = t.store().scalar(&format!("SELECT state FROM credentials WHERE id = '{id}'")).await;
    state.as_str().unwrap_or_else(|| panic!("no credential {id}")).to_owned()
}

async fn has_handle(t: &TestApp, id: &str) -> bool {
    truthy(&t.store().scalar(&format!("SELECT handle IS NOT NULL FROM credentials WHERE id = '{id}'")).await)
}

fn credential_id(a: &Answer) -> String {
    a.body["credentials"][0]["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_kill_by_agent_refuses_at_once_and_revokes_what_the_agent_holds() {
    let t = TestApp::builder().no_background().start().await;
    let pr = exchange_pr(&t).await;
    assert_eq!(pr.status, StatusCode::OK, "{}", pr.text);
    let staging = t.exchange(&t.token(staging_claims()), "deploy-staging").await;
    assert_eq!(staging.status, StatusCode::OK, "{}", staging.text);
    let (pr_token, staging_token) =
        (pr.body["access_token"].as_str().unwrap(), staging.body["access_token"].as_str().unwrap());

    let k = kill(&t, json!({ "selector": { "agent": "pr-reviewer" }, "reason": "leaked token in a PR log" })).await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    assert_eq!(k.body["state"], "active");
    assert_eq!(k.body["created_by"], "test-security");
    assert_eq!(k.body["selector"], json!({ "agent": "pr-reviewer" }));
    assert_eq!(k.body["expires_at"], Value::Null);
    assert_eq!(k.body["report"]["totals"]["matched"], 1, "{}", k.text);
    assert_eq!(k.body["report"]["backends"]["jwt"]["matched"], 1);
    assert_eq!(k.body["report"]["backends"]["jwt"]["pending"], 1);

    // No refresher runs in this test: only the kill call itself can have updated the rules.
    let again = exchange_pr(&t).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN, "{}", again.text);
    assert_eq!(again.body["error"], "access_denied");
    // Refused by the in-memory check of step 3, before anything was minted, not only by the
    // store at activation (step 7), which says "landed during the exchange".
    let id = k.body["id"].as_str().unwrap();
    let denied = t.events("exchange.denied").await;
    assert_eq!(denied.last().unwrap()["reason"], format!("kill rule {id}"), "{denied:?}");

    assert!(introspect_active(&t, pr_token).await, "revocation waits for its job");
    assert_eq!(run_jobs(&t).await, 1, "one revocation job, for the one matching credential");
    assert!(!introspect_active(&t, pr_token).await, "the agent's JWT is inactive once the job ran");
    assert!(introspect_active(&t, staging_token).await, "another agent's credential stays active");
    assert!(t.exchange(&t.token(staging_claims()), "deploy-staging").await.status.is_success());

    let status = show(&t, id).await;
    assert_eq!(
        status["report"]["totals"],
        json!({ "matched": 1, "revoked": 1, "expired": 0, "pending": 0, "failed": 0 }),
        "{status}"
    );
    let created = t.events("kill.created").await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0]["actor"], "admin-key:test-security");
    assert_eq!(created[0]["detail"]["kill_id"], id);
    let revoked = t.events("credential.revoked").await;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["detail"]["kill_id"], id, "{}", revoked[0]);
    assert_eq!(revoked[0]["credential_id"], pr.body["credentials"][0]["id"]);
}

/// Everything a refused kill request could have written: rules, jobs, marks and non-call events.
async fn footprint(t: &TestApp) -> (i64, i64, i64, i64) {
    (
        count(t, "SELECT count(*) FROM kill_rules").await,
        count(t, "SELECT count(*) FROM jobs").await,
        count(t, "SELECT count(*) FROM credentials WHERE revoke_requested OR state <> 'active'").await,
        count(t, "SELECT count(*) FROM audit_events WHERE body NOT LIKE '%\"event\":\"admin.call\"%'").await,
    )
}

#[tokio::test]
async fn dry_runs_and_refused_kills_change_nothing() {
    let t = TestApp::builder().no_background().start().await;
    assert_eq!(exchange_pr(&t).await.status, StatusCode::OK);
    let before = footprint(&t).await;

    let dry =
        kill(&t, json!({ "selector": { "agent": "pr-*" }, "reason": "how far would this reach", "dry_run": true }))
            .await;
    assert_eq!(dry.status, StatusCode::OK, "{}", dry.text);
    assert_eq!(dry.body["dry_run"], true);
    assert_eq!(dry.body["would_match"]["totals"], json!({ "matched": 1, "active": 1, "pending": 0 }));
    assert_eq!(dry.body["would_match"]["backends"]["jwt"]["active"], 1);
    let (rules, jobs, ended, events) = footprint(&t).await;
    assert_eq!((rules, jobs, ended, events), (before.0, before.1, before.2, before.3 + 1), "only kill.dry_run");
    assert_eq!(t.events("kill.dry_run").await.len(), 1);

    let unknown_credential = uuid::Uuid::now_v7().to_string();
    let refused = [
        (json!({ "selector": {}, "reason": "x" }), "at least one field"),
        (json!({ "selector": { "agent": "a" }, "reason": "x", "force": true }), "force"),
        (json!({ "selector": { "agnt": "a" }, "reason": "x" }), "agnt"),
        (json!({ "selector": { "agent": "a" } }), "reason"),
        (json!({ "selector": { "agent": "a" }, "reason": "  " }), "reason"),
        (json!({ "selector": { "agent": "re:(" }, "reason": "x" }), "agent"),
        (json!({ "selector": { "credential": unknown_credential }, "reason": "x" }), "no credential"),
        (json!({ "selector": { "agent": "a" }, "reason": "x", "expires_in": "soon" }), "expires_in"),
    ];
    for (body, says) in refused {
        let a = kill(&t, body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.text);
        assert_eq!(a.body["error"], "invalid_request");
        assert!(a.body["error_description"].as_str().unwrap().contains(says), "{body}: {}", a.text);
        assert!(a.body["request_id"].as_str().is_some_and(|r| !r.is_empty()));
    }
    let body = json!({ "selector": { "agent": "pr-reviewer" }, "reason": "x" });
    let low = t.post_json("/v1/kills", Some(AUDITOR_KEY), &body).await;
    assert_eq!(low.status, StatusCode::FORBIDDEN, "{}", low.text);
    assert!(low.body["error_description"].as_str().unwrap().contains("security"), "{}", low.text);
    let none = t.post_json("/v1/kills", None, &body).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{}", none.text);

    assert_eq!(footprint(&t).await, (rules, jobs, ended, events), "a refused kill wrote something");
    assert_eq!(exchange_pr(&t).await.status, StatusCode::OK, "nothing blocks the agent");
}

/// Exchanges in flight while the kill lands: whatever order they commit in, none of the agent's
/// credentials is left active once the jobs ran, and every exchange that was answered 200 has
/// its credential revoked.
#[tokio::test]
async fn no_credential_survives_a_kill_that_races_exchanges() {
    const ROUNDS: usize = 20;
    const EXCHANGES: usize = 50;
    let t = Arc::new(TestApp::builder().no_background().start().await);
    let (mut allowed, mut denied) = (0, 0);
    for round in 0..ROUNDS {
        // The exchanges start over ~15 ms, one every 300 µs; the kill starts somewhere in that
        // window, later each round, so that it lands before, among and after them.
        let started = tokio::time::Instant::now();
        let mut tasks = Vec::new();
        for i in 0..EXCHANGES {
            let t = t.clone();
            let token = t.token(pr_claims());
            let at = started + std::time::Duration::from_micros(300 * i as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at).await;
                t.exchange(&token, "pr-review").await
            }));
        }
        tokio::time::sleep_until(started + std::time::Duration::from_micros(750 * (round % 20) as u64)).await;
        let k = kill(&t, json!({ "selector": { "agent": "pr-reviewer" }, "reason": format!("round {round}") })).await;
        assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
        let mut ids = Vec::new();
        for task in tasks {
            let a = task.await.unwrap();
            match a.status {
                StatusCode::OK => ids.push(credential_id(&a)),
                StatusCode::FORBIDDEN => denied += 1,
                other => panic!("round {round}: unexpected {other}: {}", a.text),
            }
        }
        allowed += ids.len();
        run_jobs(&t).await;
        let active =
            count(&t, "SELECT count(*) FROM credentials WHERE agent = 'pr-reviewer' AND state = 'active'").await;
        assert_eq!(active, 0, "round {round}: a credential of the killed agent is still active");
        for id in &ids {
            assert_eq!(
                credential_state(&t, id).await,
                "revoked",
                "round {round}: an answered credential was not revoked"
            );
        }
        let report = show(&t, k.body["id"].as_str().unwrap()).await["report"]["totals"].clone();
        assert_eq!(report["pending"], 0, "round {round}: {report}");
        assert!(report["matched"].as_u64().unwrap() >= ids.len() as u64, "round {round}: {report}");

        let lift = t
            .post_json(
                &format!("/v1/kills/{}/lift", k.body["id"].as_str().unwrap()),
                Some(SECURITY_KEY),
                &json!({ "reason": "next round" }),
            )
            .await;
        assert_eq!(lift.status, StatusCode::OK, "{}", lift.text);
    }
    assert_eq!(allowed + denied, ROUNDS * EXCHANGES);
    eprintln!("{allowed} exchanges answered before the kill, {denied} refused");
}

#[tokio::test]
async fn a_lift_lets_exchanges_through_and_revives_nothing_and_a_rule_lapses_once() {
    let t = TestApp::builder().no_background().start().await;
    let before = exchange_pr(&t).await;
    let token = before.body["access_token"].as_str().unwrap().to_owned();
    let k = kill(&t, json!({ "selector": { "agent": "pr-reviewer" }, "reason": "suspicious" })).await;
    let id = k.body["id"].as_str().unwrap().to_owned();
    run_jobs(&t).await;
    assert_eq!(exchange_pr(&t).await.status, StatusCode::FORBIDDEN);

    let lift = format!("/v1/kills/{id}/lift");
    let no_reason = t.post_json(&lift, Some(SECURITY_KEY), &json!({})).await;
    assert_eq!(no_reason.status, StatusCode::BAD_REQUEST, "{}", no_reason.text);
    let low = t.post_json(&lift, Some(AUDITOR_KEY), &json!({ "reason": "x" })).await;
    assert_eq!(low.status, StatusCode::FORBIDDEN);
    let lifted = t.post_json(&lift, Some(SECURITY_KEY), &json!({ "reason": "false alarm" })).await;
    assert_eq!(lifted.status, StatusCode::OK, "{}", lifted.text);
    assert_eq!(lifted.body["state"], "lifted");
    assert_eq!(lifted.body["lifted_by"], "test-security");
    assert_eq!(lifted.body["lift_reason"], "false alarm");
    assert_eq!(exchange_pr(&t).await.status, StatusCode::OK, "a lifted rule blocks nothing");
    assert!(!introspect_active(&t, &token).await, "what was revoked stays revoked");
    assert_eq!(credential_state(&t, &credential_id(&before)).await, "revoked");

    let twice = t.post_json(&lift, Some(SECURITY_KEY), &json!({ "reason": "again" })).await;
    assert_eq!(twice.status, StatusCode::CONFLICT, "{}", twice.text);
    assert!(twice.body["error_description"].as_str().unwrap().contains("already lifted"), "{}", twice.text);
    let unknown = t
        .post_json(&format!("/v1/kills/{}/lift", uuid::Uuid::now_v7()), Some(SECURITY_KEY), &json!({ "reason": "x" }))
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND, "{}", unknown.text);
    assert_eq!(t.events("kill.lifted").await.len(), 1);

    // A rule with an expiry blocks until it lapses, then lets exchanges through by itself.
    let k = kill(&t, json!({ "selector": { "agent": "pr-reviewer" }, "reason": "cool-off", "expires_in": "1m" })).await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let id = k.body["id"].as_str().unwrap().to_owned();
    assert!(k.body["expires_at"].is_string());
    assert_eq!(exchange_pr(&t).await.status, StatusCode::FORBIDDEN);
    t.clock.advance(chrono::Duration::seconds(61));
    latchkey::worker::refresh_kills(&t.app).await.unwrap();
    assert_eq!(exchange_pr(&t).await.status, StatusCode::OK, "a lapsed rule blocks nothing");
    assert_eq!(show(&t, &id).await["state"], "lapsed");
    latchkey::worker::refresh_kills(&t.app).await.unwrap();
    latchkey::worker::record_lapses(&t.app).await.unwrap();
    let lapsed = t.events("kill.lapsed").await;
    assert_eq!(lapsed.len(), 1, "{lapsed:?}");
    assert_eq!(lapsed[0]["detail"]["kill_id"], id.as_str());
    let late = t.post_json(&format!("/v1/kills/{id}/lift"), Some(SECURITY_KEY), &json!({ "reason": "x" })).await;
    assert_eq!(late.status, StatusCode::CONFLICT, "{}", late.text);

    // A restart does not record the lapse again.
    let t = t.restart().await;
    latchkey::worker::record_lapses(&t.app).await.unwrap();
    assert_eq!(t.events("kill.lapsed").await.len(), 1);

    let list = t.get("/v1/kills?limit=1", Some(AUDITOR_KEY)).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    assert_eq!(list.body["items"].as_array().unwrap().len(), 1);
    assert_eq!(list.body["items"][0]["state"], "lifted", "oldest first");
    let cursor = list.body["next_cursor"].as_str().unwrap();
    let next = t.get(&format!("/v1/kills?limit=1&cursor={}", urlencode(cursor)), Some(AUDITOR_KEY)).await;
    assert_eq!(next.body["items"][0]["id"], id.as_str(), "{}", next.text);
    let all = t.get("/v1/kills", Some(AUDITOR_KEY)).await;
    assert_eq!(all.body["items"].as_array().unwrap().len(), 2);
    assert_eq!(all.body["next_cursor"], Value::Null);
    let future = t.get("/v1/kills?since=2999-01-01T00:00:00Z", Some(AUDITOR_KEY)).await;
    assert_eq!(future.body["items"], json!([]));
    assert_eq!(t.get("/v1/kills?cursor=bogus", Some(AUDITOR_KEY)).await.status, StatusCode::BAD_REQUEST);
    assert_eq!(t.get("/v1/kills", Some(SERVICE_KEY)).await.status, StatusCode::FORBIDDEN);
}

fn urlencode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn one_credential_is_revoked_on_request() {
    let t = TestApp::builder().no_background().start().await;
    let a = exchange_pr(&t).await;
    let id = credential_id(&a);
    let token = a.body["access_token"].as_str().unwrap();
    let path = format!("/v1/credentials/{id}/revoke");

    assert_eq!(t.post_json(&path, Some(AUDITOR_KEY), &json!({})).await.status, StatusCode::FORBIDDEN);
    let first = t.post_json(&path, Some(SECURITY_KEY), &json!({ "reason": "left in a log" })).await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert_eq!(first.body["revocation"], "queued");
    assert_eq!(first.body["state"], "active");
    let second = t.post_json(&path, Some(SECURITY_KEY), &json!({})).await;
    assert_eq!(second.status, StatusCode::ACCEPTED, "{}", second.text);
    assert_eq!(second.body["revocation"], "already_queued");
    assert_eq!(count(&t, "SELECT count(*) FROM jobs WHERE kind = 'revoke'").await, 1);

    assert_eq!(run_jobs(&t).await, 1);
    assert!(!introspect_active(&t, token).await);
    let done = t.post_json(&path, Some(SECURITY_KEY), &json!({})).await;
    assert_eq!(done.status, StatusCode::OK, "{}", done.text);
    assert_eq!(done.body["state"], "revoked");
    assert!(done.body["message"].as_str().unwrap().contains("already revoked"), "{}", done.text);

    let unknown = format!("/v1/credentials/{}/revoke", uuid::Uuid::now_v7());
    assert_eq!(t.post_json(&unknown, Some(SECURITY_KEY), &json!({})).await.status, StatusCode::NOT_FOUND);
    let bad = t.post_json("/v1/credentials/nope/revoke", Some(SECURITY_KEY), &json!({})).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);

    let requested = t.events("credential.revoke_requested").await;
    assert_eq!(requested.len(), 1, "only the request that changed something: {requested:?}");
    assert_eq!(requested[0]["actor"], "admin-key:test-security");
    assert_eq!(requested[0]["reason"], "left in a log");
    assert_eq!(requested[0]["credential_id"], id.as_str());
    let revoked = t.events("credential.revoked").await;
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["detail"]["kill_id"], Value::Null);
}

/// A Vault-kind backend double that keeps a handle and whose revocations fail while `down`,
/// and wait while `held`.
#[derive(Debug, Default)]
struct FlakyVault {
    down: AtomicBool,
    held: AtomicBool,
    revoked: AtomicUsize,
}

#[async_trait]
impl Backend for FlakyVault {
    fn kind(&self) -> BackendKind {
        BackendKind::Vault
    }
    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, BackendError> {
        let secret = format!("hvs.secret-{}", req.credential_id);
        let mut fields = serde_json::Map::new();
        fields.insert("token".into(), json!(secret));
        Ok(Minted {
            secret: SecretFields(fields),
            access_token: secret.clone().into(),
            issued_token_type: "urn:latchkey:token-type:vault-token",
            token_type: "Bearer",
            handle: Some(secrecy::SecretBox::new(Box::new(format!("accessor-{}", req.credential_id).into_bytes()))),
            fingerprint: latchkey::backend::fingerprint(secret.as_bytes()),
            expires_at: req.expires_at,
        })
    }
    async fn revoke(&self, c: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError> {
        assert_eq!(handle, Some(format!("accessor-{}", c.id).as_bytes()), "revocation gets the unsealed handle");
        while self.held.load(Ordering::SeqCst) {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(BackendError::Unavailable {
                backend: BackendKind::Vault,
                message: "connection refused".into(),
            });
        }
        self.revoked.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const VAULT_POLICY: &str = r#"
description = "deploy with a vault token"
agent = "vault-deployer"
issuer = "github-actions"
ttl = "15m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
ref = "refs/heads/main"

[[grant]]
backend = "vault"
kind = "token"
policies = ["deploy"]
"#;

/// A broker with the `vault-deploy` capability on a [`FlakyVault`], and the double.
async fn with_flaky_vault() -> (TestApp, Arc<FlakyVault>) {
    let vault = Arc::new(FlakyVault::default());
    let t = TestApp::builder()
        .no_background()
        .policy("vault-deploy.toml", VAULT_POLICY)
        .config(
            "[backends.vault]\naddress = \"http://127.0.0.1:1\"\ntoken_role = \"latchkey\"\ntoken_file = \"unused\"\n",
        )
        .backend(vault.clone())
        .start()
        .await;
    (t, vault)
}

#[tokio::test]
async fn a_failing_backend_holds_up_only_its_own_revocations_which_survive_a_restart() {
    let (t, vault) = with_flaky_vault().await;
    let pr = exchange_pr(&t).await;
    assert_eq!(pr.status, StatusCode::OK, "{}", pr.text);
    let v = t.exchange(&t.token(json!({})), "vault-deploy").await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.text);
    let vault_id = credential_id(&v);
    assert!(has_handle(&t, &vault_id).await, "an active credential keeps its sealed handle");

    vault.down.store(true, Ordering::SeqCst);
    let k = kill(&t, json!({ "selector": { "repository": "acme/widgets" }, "reason": "repository compromised" })).await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let id = k.body["id"].as_str().unwrap().to_owned();
    assert_eq!(k.body["report"]["totals"]["matched"], 2, "{}", k.text);
    run_jobs(&t).await;
    let report = show(&t, &id).await["report"].clone();
    assert_eq!(report["backends"]["jwt"]["revoked"], 1, "{report}");
    assert_eq!(report["backends"]["vault"]["pending"], 1, "{report}");
    assert_eq!(report["totals"]["pending"], 1, "{report}");
    assert_eq!(credential_state(&t, &vault_id).await, "active");
    assert!(has_handle(&t, &vault_id).await, "the handle is kept until revocation succeeds");

    // The job is durable: a restart finds it.
    let t = t.restart().await;
    assert_eq!(show(&t, &id).await["report"]["backends"]["vault"]["pending"], 1);
    vault.down.store(false, Ordering::SeqCst);
    t.clock.advance(chrono::Duration::minutes(1)); // past the retry's back-off
    run_jobs(&t).await;
    let report = show(&t, &id).await["report"].clone();
    assert_eq!(report["totals"], json!({ "matched": 2, "revoked": 2, "expired": 0, "pending": 0, "failed": 0 }));
    assert_eq!(vault.revoked.load(Ordering::SeqCst), 1);
    assert_eq!(credential_state(&t, &vault_id).await, "revoked");
    assert!(!has_handle(&t, &vault_id).await, "a revoked credential's sealed handle is erased");
    let revoked = t.events("credential.revoked").await;
    assert_eq!(revoked.len(), 2);
    assert!(revoked.iter().all(|e| e["detail"]["kill_id"] == id.as_str()), "{revoked:?}");
}

/// During a long pass of the worker (one backend slow to revoke), `latchkey_job_queue_depth`
/// follows the jobs that finish, not only the pass's end: an operator watching a kill drain sees
/// it drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_depth_follows_a_long_pass() {
    let (t, vault) = with_flaky_vault().await;
    for _ in 0..5 {
        assert_eq!(exchange_pr(&t).await.status, StatusCode::OK);
    }
    let v = t.exchange(&t.token(json!({})), "vault-deploy").await;
    assert_eq!(v.status, StatusCode::OK, "{}", v.text);
    let depth = async || {
        let m = t.get("/metrics", None).await;
        let line = m.text.lines().find(|l| l.starts_with("latchkey_job_queue_depth ")).map(str::to_owned);
        line.and_then(|l| l.rsplit(' ').next().and_then(|n| n.parse::<i64>().ok())).unwrap_or(-1)
    };
    let waiting = || count(&t, "SELECT COUNT(*) FROM jobs WHERE done_at IS NULL");

    vault.held.store(true, Ordering::SeqCst);
    let k = kill(&t, json!({ "selector": { "all": true }, "reason": "incident" })).await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let before = waiting().await;
    let app = t.app.clone();
    let pass = tokio::spawn(async move { latchkey::worker::run_jobs(&app).await.unwrap() });
    // The five jwt revocations finish at once; the vault one waits, and so does the pass.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count(&t, "SELECT COUNT(*) FROM credentials WHERE state = 'revoked'").await != 5 {
        assert!(std::time::Instant::now() < deadline, "the jwt revocations did not run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!pass.is_finished(), "the pass waits for the held revocation");
    let during = waiting().await;
    assert!(during < before, "{during} of {before} jobs still waiting");
    assert_eq!(depth().await, during, "the gauge during the pass");

    vault.held.store(false, Ordering::SeqCst);
    assert_eq!(pass.await.unwrap(), 6);
    let after = waiting().await;
    assert!(after < during);
    assert_eq!(depth().await, after, "the gauge after the pass");
}

/// With the background worker running, a kill's revocations start without waiting for a test
/// (or the worker's tick) to drive them.
#[tokio::test]
async fn the_worker_drains_a_kill_by_itself() {
    let t = TestApp::start().await;
    let pr = exchange_pr(&t).await;
    let token = pr.body["access_token"].as_str().unwrap();
    let k = kill(&t, json!({ "selector": { "all": true }, "reason": "incident" })).await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let id = k.body["id"].as_str().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while show(&t, id).await["report"]["totals"]["revoked"] != 1 {
        assert!(std::time::Instant::now() < deadline, "the kill's job did not run");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!introspect_active(&t, token).await);
}

/// Runs the real binary against a test server. Asynchronously: the server runs on this runtime.
async fn cli(t: &TestApp, key: Option<&str>, args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_latchkey"));
    c.args(args).env("LATCHKEY_URL", &t.url).env("RUST_LOG", "warn").env_remove("LATCHKEY_ADMIN_KEY");
    if let Some(k) = key {
        c.env("LATCHKEY_ADMIN_KEY", k);
    }
    let out = c.output().await.unwrap();
    (out.status, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn the_cli_kills_waits_lists_shows_lifts_and_revokes() {
    let t = TestApp::start().await;
    let pr = exchange_pr(&t).await;
    let token = pr.body["access_token"].as_str().unwrap().to_owned();

    let (status, out, err) =
        cli(&t, Some(SECURITY_KEY), &["kill", "--agent", "pr-*", "--reason", "check", "--dry-run", "--json"]).await;
    assert!(status.success(), "{out}{err}");
    let dry: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dry["would_match"]["totals"]["active"], 1, "{out}");
    assert_eq!(count(&t, "SELECT count(*) FROM kill_rules").await, 0, "a dry run writes no rule");

    let (status, out, err) = cli(
        &t,
        Some(SECURITY_KEY),
        &[
            "kill",
            "--agent",
            "pr-reviewer",
            "--claim",
            "actor=octo*",
            "--reason",
            "leaked",
            "--wait",
            "--timeout",
            "20s",
        ],
    )
    .await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("is in force"), "{out}");
    let total = out.lines().find(|l| l.starts_with("total")).unwrap_or_default();
    assert_eq!(total.split_whitespace().collect::<Vec<_>>(), ["total", "1", "1", "0", "0", "0"], "{out}");
    assert!(!introspect_active(&t, &token).await, "--wait returned before the revocation was done");
    assert_eq!(exchange_pr(&t).await.status, StatusCode::FORBIDDEN);

    let (status, out, err) = cli(&t, Some(AUDITOR_KEY), &["kills"]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.starts_with("ID"), "{out}");
    assert!(out.contains("agent=pr-reviewer claim.actor=octo*") && out.contains("leaked"), "{out}");
    let (status, out, _) = cli(&t, Some(AUDITOR_KEY), &["kills", "--json"]).await;
    assert!(status.success());
    let id = serde_json::from_str::<Value>(&out).unwrap()["items"][0]["id"].as_str().unwrap().to_owned();

    let (status, out, err) = cli(&t, Some(AUDITOR_KEY), &["kills", "show", &id]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("state:") && out.contains("active") && out.contains("test-security"), "{out}");

    let (status, out, err) = cli(&t, Some(AUDITOR_KEY), &["kills", "lift", &id, "--reason", "x"]).await;
    assert!(!status.success());
    assert!(err.contains("not allowed") && err.contains("security"), "{out}{err}");
    let (status, out, err) = cli(&t, Some(SECURITY_KEY), &["kills", "lift", &id, "--reason", "false alarm"]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("lifted"), "{out}");
    let (status, _, err) = cli(&t, Some(SECURITY_KEY), &["kills", "lift", &id, "--reason", "again"]).await;
    assert!(!status.success());
    assert!(err.contains("already lifted"), "{err}");

    let fresh = exchange_pr(&t).await;
    assert_eq!(fresh.status, StatusCode::OK, "{}", fresh.text);
    let cid = credential_id(&fresh);
    let (status, out, err) = cli(&t, Some(SECURITY_KEY), &["revoke", &cid, "--reason", "rotate"]).await;
    assert!(status.success(), "{out}{err}");
    assert!(out.contains("revocation queued"), "{out}");
    let (status, out, _) = cli(&t, Some(SECURITY_KEY), &["revoke", &cid, "--json"]).await;
    assert!(status.success());
    assert!(serde_json::from_str::<Value>(&out).unwrap()["revocation"].is_string(), "{out}");
}

#[tokio::test]
async fn the_cli_explains_keys_servers_and_claims_it_cannot_use() {
    let t = TestApp::builder().no_background().start().await;
    let (status, _, err) = cli(&t, None, &["kills"]).await;
    assert!(!status.success());
    assert!(err.contains("LATCHKEY_ADMIN_KEY"), "{err}");
    let (status, _, err) = cli(&t, Some("lk_not_a_key"), &["kills"]).await;
    assert!(!status.success());
    assert!(err.contains("does not know the admin key"), "{err}");
    let (status, _, err) = cli(&t, Some(AUDITOR_KEY), &["kill", "--all", "--reason", "x"]).await;
    assert!(!status.success());
    assert!(err.contains("not allowed") && err.contains("security"), "{err}");
    let (status, _, err) = cli(&t, Some(SECURITY_KEY), &["kill", "--claim", "actor", "--reason", "x"]).await;
    assert!(!status.success());
    assert!(err.contains("NAME=GLOB"), "{err}");
    let (status, _, err) = cli(&t, Some(SECURITY_KEY), &["kill", "--reason", "x"]).await;
    assert!(!status.success());
    assert!(err.contains("name what to kill"), "{err}");
    let (status, _, err) = cli(&t, Some(SECURITY_KEY), &["kills", "--url", "http://127.0.0.1:1"]).await;
    assert!(!status.success());
    assert!(err.contains("cannot reach latchkey at http://127.0.0.1:1"), "{err}");
    assert_eq!(count(&t, "SELECT count(*) FROM kill_rules").await, 0);
}

#[tokio::test]
async fn the_kill_switch_is_described_in_openapi() {
    let t = TestApp::builder().no_background().start().await;
    let o = t.get("/openapi.json", None).await;
    for (path, method) in [
        ("/v1/kills", "post"),
        ("/v1/kills", "get"),
        ("/v1/kills/{id}", "get"),
        ("/v1/kills/{id}/lift", "post"),
        ("/v1/credentials/{id}/revoke", "post"),
    ] {
        assert!(o.body["paths"][path].get(method).is_some(), "{method} {path} missing from openapi.json");
    }
    for schema in ["Selector", "KillRequest", "KillRule", "KillPage", "RevocationReport", "KillDryRun", "RevokeAnswer"]
    {
        assert!(o.body["components"]["schemas"].get(schema).is_some(), "{schema} missing");
    }
}
