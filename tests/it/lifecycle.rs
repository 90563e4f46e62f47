//! All-or-nothing minting, the kill lock of step 7, the reconciler and policy reloads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use chrono::Utc;
use latchkey::app::Clock;
use latchkey::backend::{Backend, BackendError, MintRequest, Minted, SecretFields};
use latchkey::kill::{KillRule, Selector};
use latchkey::ledger::CredentialRow;
use latchkey::policy::BackendKind;
use reqwest::StatusCode;
use serde_json::json;

use crate::support::store::{Store, contains, truthy};
use crate::support::test_app::TestApp;

/// A backend double that mints (or fails) and counts revocations with the handle it was given.
/// With a `probe`, each mint first reads the store, from outside the broker, and records what
/// is durably there.
#[derive(Debug)]
struct Double {
    kind: BackendKind,
    fail: bool,
    revoked: Arc<AtomicUsize>,
    probe: Option<Probe>,
}

/// One credential row as a probe saw it: `(id, state, has a handle)`.
type SeenRow = (String, String, bool);

/// What the store held at the moment of each mint.
#[derive(Debug, Clone, Default)]
struct Probe {
    store: Arc<std::sync::Mutex<Option<Store>>>,
    seen: Arc<std::sync::Mutex<Vec<Vec<SeenRow>>>>,
}

impl Probe {
    async fn look(&self) {
        let Some(store) = self.store.lock().unwrap().clone() else { return };
        let rows = store
            .query("SELECT id, state, handle IS NOT NULL FROM credentials ORDER BY name")
            .await
            .into_iter()
            .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_str().unwrap().to_owned(), truthy(&r[2])))
            .collect();
        self.seen.lock().unwrap().push(rows);
    }
}

fn double(kind: BackendKind, fail: bool, revoked: &Arc<AtomicUsize>) -> Arc<Double> {
    Arc::new(Double { kind, fail, revoked: revoked.clone(), probe: None })
}

#[async_trait]
impl Backend for Double {
    fn kind(&self) -> BackendKind {
        self.kind
    }
    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, BackendError> {
        if let Some(p) = &self.probe {
            p.look().await;
        }
        if self.fail {
            return Err(BackendError::Unavailable { backend: self.kind, message: "connection refused".into() });
        }
        let secret = format!("secret-{}", req.credential_id);
        let mut fields = serde_json::Map::new();
        fields.insert("token".into(), json!(secret));
        Ok(Minted {
            secret: SecretFields(fields),
            access_token: secret.clone().into(),
            issued_token_type: "urn:latchkey:token-type:github-installation",
            token_type: "Bearer",
            handle: Some(secrecy::SecretBox::new(Box::new(secret.clone().into_bytes()))),
            fingerprint: latchkey::backend::fingerprint(secret.as_bytes()),
            expires_at: req.expires_at,
        })
    }
    async fn revoke(&self, c: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError> {
        assert_eq!(handle, Some(format!("secret-{}", c.id).as_bytes()), "revocation gets the unsealed handle");
        self.revoked.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const TWO_GRANTS: &str = r#"
description = "deploy with code access and a vault token"
agent = "deployer"
issuer = "github-actions"
ttl = "15m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
ref = "refs/heads/main"

[[grant]]
backend = "github"
owner = "acme"
repositories = ["widgets"]
permissions = { contents = "read" }

[[grant]]
backend = "vault"
kind = "token"
policies = ["deploy"]
"#;

const BACKENDS: &str = r#"
[[backends.github]]
id = "default"
app_id = 1
private_key_file = "unused.pem"
[backends.vault]
address = "http://127.0.0.1:1"
token_role = "latchkey"
token_file = "unused-vault-token"
"#;

#[tokio::test]
async fn when_one_grant_fails_nothing_stays_issued() {
    let revoked = Arc::new(AtomicUsize::new(0));
    let t = TestApp::builder()
        .policy("deploy.toml", TWO_GRANTS)
        .config(BACKENDS)
        .backend(double(BackendKind::Github, false, &revoked))
        .backend(double(BackendKind::Vault, true, &Arc::default()))
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), "deploy").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.body["error"], "temporarily_unavailable");
    assert!(!a.text.contains("secret-"), "a secret leaked into the error: {}", a.text);
    assert_eq!(revoked.load(Ordering::SeqCst), 1, "the minted github token was revoked");
    assert_eq!(t.credential_states().await, [("failed".to_string(), 2)]);
    let failed = t.events("exchange.failed").await;
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["reason"].as_str().unwrap().contains("vault"), "{}", failed[0]);
    assert!(!serde_json::to_string(&t.audit().await).unwrap().contains("secret-"), "a secret reached the audit trail");
}

#[tokio::test]
async fn handles_are_sealed_at_rest() {
    let revoked = Arc::new(AtomicUsize::new(0));
    let t = TestApp::builder()
        .policy("deploy.toml", TWO_GRANTS)
        .config(BACKENDS)
        .backend(double(BackendKind::Github, false, &revoked))
        .backend(double(BackendKind::Vault, false, &revoked))
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), "deploy").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["issued_token_type"], "urn:latchkey:token-type:github-installation");
    assert!(!contains(&t.store().dump().await, b"secret-"), "a handle is stored in plain text");
}

fn kill_agent(t: &TestApp, agent: &str) -> KillRule {
    KillRule {
        id: uuid::Uuid::now_v7(),
        selector: Selector { agent: Some(agent.into()), ..Default::default() },
        reason: "test".into(),
        created_at: t.clock.now(),
        created_by: "admin-key:test".into(),
        expires_at: None,
        lifted_at: None,
    }
}

/// The kill is committed to the store, but this replica's in-memory rules are stale: the
/// exchange passes step 3, mints, and must be stopped by the activation transaction (step 7).
#[tokio::test]
async fn a_kill_that_lands_during_an_exchange_is_enforced_at_activation() {
    let revoked = Arc::new(AtomicUsize::new(0));
    let t = TestApp::builder()
        .no_background()
        .policy("deploy.toml", TWO_GRANTS)
        .config(BACKENDS)
        .backend(double(BackendKind::Github, false, &revoked))
        .backend(double(BackendKind::Vault, false, &revoked))
        .start()
        .await;
    assert_eq!(t.exchange(&t.token(json!({})), "deploy").await.status, StatusCode::OK);

    let rule = kill_agent(&t, "deployer");
    let event = latchkey::audit::AuditEvent::new("kill.created", t.clock.now());
    let effect = t.app.ledger.create_kill(&rule, event).await.unwrap();
    assert_eq!(effect.jobs.len(), 2, "each active credential gets a revocation job");

    let a = t.exchange(&t.token(json!({})), "deploy").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(a.body["error"], "access_denied");
    assert_eq!(revoked.load(Ordering::SeqCst), 2, "both minted credentials were revoked");
    assert_eq!(t.credential_states().await, [("active".to_string(), 2), ("failed".to_string(), 2)]);
    let denied = t.events("exchange.denied").await;
    assert!(denied.last().unwrap()["reason"].as_str().unwrap().contains(&rule.id.to_string()));

    // Once the rules are refreshed, the kill stops the exchange before anything is written.
    latchkey::worker::refresh_kills(&t.app).await.unwrap();
    let a = t.exchange(&t.token(json!({})), "deploy").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(revoked.load(Ordering::SeqCst), 2, "nothing was minted");
    assert_eq!(t.credential_count().await, 4);
}

/// The same race for jwt grants, which are issued in one transaction: nothing is written.
#[tokio::test]
async fn a_kill_that_lands_during_a_local_exchange_leaves_nothing_active() {
    let t = TestApp::builder().no_background().start().await;
    let claims = json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" });
    assert_eq!(t.exchange(&t.token(claims.clone()), "pr-review").await.status, StatusCode::OK);
    let rule = kill_agent(&t, "pr-reviewer");
    let event = latchkey::audit::AuditEvent::new("kill.created", t.clock.now());
    t.app.ledger.create_kill(&rule, event).await.unwrap();

    let a = t.exchange(&t.token(claims), "pr-review").await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(t.credential_states().await, [("active".to_string(), 1)], "only the credential from before the kill");
    let denied = t.events("exchange.denied").await;
    assert!(denied.last().unwrap()["reason"].as_str().unwrap().contains(&rule.id.to_string()));
}

#[tokio::test]
async fn the_reconciler_fails_rows_left_pending_by_a_crash() {
    let t = TestApp::builder().no_background().start().await;
    t.record_crashed_intent(BackendKind::Jwt).await;
    assert_eq!(latchkey::worker::reconcile(&t.app).await.unwrap(), 0, "an exchange in flight is left alone");
    t.clock.advance(chrono::Duration::minutes(3));
    assert_eq!(latchkey::worker::reconcile(&t.app).await.unwrap(), 1);
    assert_eq!(t.credential_states().await, [("failed".to_string(), 1)]);
    assert_eq!(t.events("credential.reconciled").await.len(), 1);
}

#[tokio::test]
async fn a_broken_policy_set_is_refused_and_the_old_one_keeps_serving() {
    let t = TestApp::builder().no_background().start().await;
    let broken = t.policy_dir().join("broken.toml");
    std::fs::write(&broken, "agent = \"x\"\nissuer = \"github-actions\"\nttl = \"15m\"\nsurprise = 1\n").unwrap();
    assert!(!latchkey::worker::reload_policies(&t.app).await);
    let failed = t.events("policy.reload_failed").await;
    assert_eq!(failed.len(), 1);
    assert!(failed[0]["detail"]["errors"][0].as_str().unwrap().contains("broken.toml"), "{}", failed[0]);
    let claims = json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" });
    assert_eq!(t.exchange(&t.token(claims.clone()), "pr-review").await.status, StatusCode::OK);

    std::fs::remove_file(&broken).unwrap();
    std::fs::write(t.policy_dir().join("pr-review.toml"), "this is = not toml [").unwrap();
    assert!(!latchkey::worker::reload_policies(&t.app).await);
    assert_eq!(t.exchange(&t.token(claims.clone()), "pr-review").await.status, StatusCode::OK, "old set still serves");

    std::fs::copy(
        crate::support::test_app::repo_path("policies/pr-review.toml"),
        t.policy_dir().join("pr-review.toml"),
    )
    .unwrap();
    assert!(latchkey::worker::reload_policies(&t.app).await);
    assert_eq!(t.events("policy.reloaded").await.len(), 1);
    let _ = Utc::now();
}

#[tokio::test]
async fn policies_reload_when_their_files_change() {
    let t = TestApp::builder().reload_interval("100ms").start().await;
    std::fs::write(t.policy_dir().join("broken.toml"), "agent = 1\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while t.events("policy.reload_failed").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the change was not noticed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    std::fs::remove_file(t.policy_dir().join("broken.toml")).unwrap();
    while t.events("policy.reloaded").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "the fix was not noticed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// DESIGN steps 5 and 6: the intent is on disk before any backend is called, and each grant's
/// handle is on disk before the next grant is minted.
#[tokio::test]
async fn intent_is_durable_before_minting_and_handles_before_the_next_grant() {
    let revoked = Arc::new(AtomicUsize::new(0));
    let probe = Probe::default();
    let probed = |kind| Arc::new(Double { kind, fail: false, revoked: revoked.clone(), probe: Some(probe.clone()) });
    let t = TestApp::builder()
        .policy("deploy.toml", TWO_GRANTS)
        .config(BACKENDS)
        .backend(probed(BackendKind::Github))
        .backend(probed(BackendKind::Vault))
        .start()
        .await;
    *probe.store.lock().unwrap() = Some(t.store().clone());
    let a = t.exchange(&t.token(json!({})), "deploy").await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let seen = probe.seen.lock().unwrap().clone();
    let ids: Vec<&str> = a.body["credentials"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    let (github, vault) = (ids[0].to_string(), ids[1].to_string());
    // Minting the github grant: both rows pending, no handle yet.
    assert!(seen[0].contains(&(github.clone(), "pending".into(), false)), "{seen:?}");
    assert!(seen[0].contains(&(vault.clone(), "pending".into(), false)), "{seen:?}");
    // Minting the vault grant: the github handle is already recorded.
    assert!(seen[1].contains(&(github, "pending".into(), true)), "{seen:?}");
    assert!(seen[1].contains(&(vault, "pending".into(), false)), "{seen:?}");
}

/// A writer that keeps everything logged, for the test below.
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn secrets_never_reach_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let installed = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .try_init()
        .is_ok();
    if !installed {
        eprintln!("skipped: another test installed the global log subscriber first");
        return;
    }
    let revoked = Arc::new(AtomicUsize::new(0));
    let t = TestApp::builder()
        .policy("deploy.toml", TWO_GRANTS)
        .config(BACKENDS)
        .backend(double(BackendKind::Github, false, &revoked))
        .backend(double(BackendKind::Vault, true, &revoked))
        .start()
        .await;
    let subject_token = t.token(json!({}));
    assert_eq!(t.exchange(&subject_token, "deploy").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let claims = json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" });
    let ok = t.exchange(&t.token(claims), "pr-review").await;
    assert_eq!(ok.status, StatusCode::OK);
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("request_id"), "the capture works: {logs}");
    for secret in [
        subject_token.as_str(),
        ok.body["access_token"].as_str().unwrap(),
        ok.body["release_token"].as_str().unwrap(),
        "secret-",
        crate::support::test_app::ADMIN_KEY,
    ] {
        assert!(!logs.contains(secret), "a secret reached the logs: {secret}");
    }
}
