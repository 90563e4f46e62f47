//! The `aws` backend against moto (STS and IAM, with IAM enforcement on), started by
//! `scripts/test.sh`. moto ignores conditions, session policies and expiry, and a deny on a role
//! refuses all its sessions: the statements' exact content is checked by reading the role's
//! policy back, and their effect by a call that the role's sessions can no longer make.

use std::sync::Arc;

use chrono::Utc;
use latchkey::app::Clock;
use latchkey::backend::aws::AwsBackend;
use latchkey::backend::{Backend, Upkeep};
use latchkey::kill::KillRule;
use latchkey::ledger::{CredentialRow, JobKind, NewJob};
use latchkey::policy::BackendKind;
use reqwest::StatusCode;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::support::peers::AwsPeer;
use crate::support::test_app::{Answer, TestApp, policy_head};

fn policy(role_arn: &str, agent: &str) -> String {
    format!("{}[[grant]]\nbackend = \"aws\"\nrole_arn = \"{role_arn}\"\n", policy_head(agent, "15m"))
}

async fn app(aws: &AwsPeer, policies: &[(&str, String)]) -> TestApp {
    let mut b = TestApp::builder().no_background().config(&aws.config());
    for (name, text) in policies {
        b = b.policy(&format!("{name}.toml"), text);
    }
    b.start().await
}

fn credential(a: &Answer) -> Value {
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    a.body["credentials"][0].clone()
}

/// The credential's ledger row and its unsealed handle.
async fn row_and_handle(t: &TestApp, c: &Value) -> (CredentialRow, Vec<u8>) {
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    let row = t.app.ledger.credential(id).await.unwrap().unwrap();
    let handle = t.app.sealer.open(id.as_bytes(), row.handle.as_deref().unwrap()).unwrap();
    (row, handle.to_vec())
}

/// Revokes a credential the way the kill-switch and release do: a `revoke` job, run by the worker.
async fn revoke_through_a_job(t: &TestApp, c: &Value) {
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    let job = NewJob {
        id: Uuid::now_v7(),
        kind: JobKind::Revoke,
        credential_id: id,
        backend: BackendKind::Aws,
        kill_id: None,
        run_at: t.clock.now(),
    };
    t.app.ledger.enqueue_jobs(&[job]).await.unwrap();
    latchkey::worker::run_jobs(&t.app).await.unwrap();
}

/// IAM (moto, enforcing) refused the session's call: `AccessDenied`.
fn assert_refused(r: Result<(), String>) {
    let e = r.expect_err("the session is refused");
    assert!(e.contains("AccessDenied"), "refused, but not by IAM's deny: {e}");
}

fn statements(doc: &Option<Value>) -> Vec<Value> {
    doc.as_ref().map(|d| d["Statement"].as_array().unwrap().clone()).unwrap_or_default()
}

#[tokio::test]
async fn a_session_is_assumed_with_its_identity_and_works_with_a_real_sdk() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let role = aws.create_role("deploy").await;
    let t = app(&aws, &[("deploy-staging", policy(&role, "deployer"))]).await;
    let a = t.exchange(&t.token(json!({})), "deploy-staging").await;
    let c = credential(&a);
    for field in ["access_key_id", "secret_access_key", "session_token", "expiration"] {
        assert!(c[field].as_str().is_some_and(|v| !v.is_empty()), "{field} in {c}");
    }
    assert_eq!(c["role_arn"], role.as_str());
    assert_eq!(c["region"], "us-east-1");
    assert_eq!(c["backend"], "aws");
    assert_eq!(a.body["issued_token_type"], "urn:latchkey:token-type:aws-session");
    assert_eq!(a.body["token_type"], "N_A");
    assert_eq!(a.body["access_token"], c["session_token"]);
    let expires_in = a.body["expires_in"].as_i64().unwrap();
    assert!((899..=900).contains(&expires_in), "the policy's 15m: {expires_in}");

    // A real AWS SDK client with these credentials is the role, in a session named after the credential.
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    let arn = aws.caller_arn(&c).await;
    let role_name = role.rsplit('/').next().unwrap();
    assert!(arn.ends_with(&format!("assumed-role/{role_name}/lk-{}", id.simple())), "{arn}");
    assert_eq!(aws.call_as(&c).await, Ok(()), "IAM enforcement lets the session through");

    // The secret parts are nowhere in the audit trail.
    let audit = serde_json::to_string(&t.audit().await).unwrap();
    assert!(!audit.contains(c["secret_access_key"].as_str().unwrap()));
    assert!(!audit.contains(c["session_token"].as_str().unwrap()));
}

#[tokio::test]
async fn revoking_one_session_denies_it_by_source_identity_and_spares_other_roles() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let (role, other_role) = (aws.create_role("deploy").await, aws.create_role("other").await);
    let t = app(&aws, &[("deploy-staging", policy(&role, "deployer")), ("other", policy(&other_role, "other"))]).await;
    let c = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
    let other = credential(&t.exchange(&t.token(json!({})), "other").await);
    assert_eq!(aws.call_as(&c).await, Ok(()));
    let (row, handle) = row_and_handle(&t, &c).await;

    revoke_through_a_job(&t, &c).await;
    assert_eq!(t.credential_states().await, [("active".to_owned(), 1), ("revoked".to_owned(), 1)]);

    // Exactly one statement: deny everything to this session's source identity.
    let id: Uuid = c["id"].as_str().unwrap().parse().unwrap();
    let doc = aws.revocation_policy(&role).await.expect("a revocation policy on the role");
    let s = statements(&Some(doc));
    assert_eq!(s.len(), 1, "{s:?}");
    assert!(s[0]["Sid"].as_str().unwrap().starts_with("LatchkeyRevoked"));
    assert_eq!(s[0]["Effect"], "Deny");
    assert_eq!((&s[0]["Action"], &s[0]["Resource"]), (&json!("*"), &json!("*")));
    assert_eq!(s[0]["Condition"], json!({ "StringEquals": { "aws:SourceIdentity": [format!("lk-{}", id.simple())] } }));

    // IAM now refuses the session; another role's session still works.
    assert_refused(aws.call_as(&c).await);
    assert_eq!(aws.call_as(&other).await, Ok(()));
    assert_eq!(aws.revocation_policy(&other_role).await, None);

    // The sealed handle is erased once the credential is revoked; revoking again changes nothing.
    let stored = t.app.ledger.credential(row.id).await.unwrap().unwrap();
    assert_eq!(stored.handle, None);
    let backend = t.app.backends.get(&BackendKind::Aws).unwrap();
    backend.revoke(&row, Some(&handle)).await.unwrap();
    assert_eq!(statements(&aws.revocation_policy(&role).await).len(), 1);
}

fn rule(selector: Value) -> KillRule {
    KillRule {
        id: Uuid::now_v7(),
        selector: serde_json::from_value(selector).unwrap(),
        reason: "test".into(),
        created_at: Utc::now(),
        created_by: "test".into(),
        expires_at: None,
        lifted_at: None,
    }
}

#[tokio::test]
async fn a_kill_denies_by_session_tags_is_bounded_when_lifted_and_pruned_after() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let role = aws.create_role("deploy").await;
    let t = app(&aws, &[("deploy-staging", policy(&role, "deployer"))]).await;
    let c = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
    let (row, handle) = row_and_handle(&t, &c).await;
    let backend = t.app.backends.get(&BackendKind::Aws).unwrap();

    let mut kill = rule(json!({ "agent": "deploy*", "repository": "acme/widgets" }));
    backend.revoke_for_kill(&row, Some(&handle), &kill).await.unwrap();
    let s = statements(&aws.revocation_policy(&role).await);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0]["Sid"], format!("LatchkeyKill{}", kill.id.simple()));
    assert_eq!(
        s[0]["Condition"],
        json!({ "StringLike": {
            "aws:PrincipalTag/latchkey-agent": "deploy*",
            "aws:PrincipalTag/latchkey-repository": "acme/widgets",
        }}),
        "keyed on the tags the selector names, with no time bound while the rule stands"
    );
    assert_refused(aws.call_as(&c).await);

    // A second credential of the same rule on the same role: still one statement.
    let c2 = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
    let (row2, handle2) = row_and_handle(&t, &c2).await;
    backend.revoke_for_kill(&row2, Some(&handle2), &kill).await.unwrap();
    assert_eq!(statements(&aws.revocation_policy(&role).await).len(), 1);

    // A selector that tags cannot express falls back to the one session.
    let by_claim = rule(json!({ "claims": { "actor": "octocat" } }));
    let c3 = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
    let (row3, handle3) = row_and_handle(&t, &c3).await;
    backend.revoke_for_kill(&row3, Some(&handle3), &by_claim).await.unwrap();
    let s = statements(&aws.revocation_policy(&role).await);
    assert_eq!(s.len(), 2, "{s:?}");
    assert!(s[1]["Sid"].as_str().unwrap().starts_with("LatchkeyRevoked"), "{s:?}");

    // Lifted: only sessions issued before the lift stay denied.
    let lifted_at = t.clock.now();
    kill.lifted_at = Some(lifted_at);
    let policies = t.app.policies.get();
    backend.maintain(&Upkeep { policies: &policies, rules: std::slice::from_ref(&kill) }).await.unwrap();
    let s = statements(&aws.revocation_policy(&role).await);
    assert_eq!(
        s[0]["Condition"]["DateLessThan"],
        json!({ "aws:TokenIssueTime": lifted_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true) })
    );
    // Once every such session has expired (12 h at most), the statement goes.
    t.clock.advance(chrono::Duration::hours(12) + chrono::Duration::minutes(1));
    backend.maintain(&Upkeep { policies: &policies, rules: std::slice::from_ref(&kill) }).await.unwrap();
    assert_eq!(aws.revocation_policy(&role).await, None, "an empty revocation policy is deleted");
}

#[tokio::test]
async fn concurrent_revocations_from_two_replicas_lose_no_statement_and_expired_ones_are_pruned() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let role = aws.create_role("deploy").await;
    let t = app(&aws, &[("deploy-staging", policy(&role, "deployer"))]).await;
    let mut rows = Vec::new();
    for _ in 0..12 {
        let c = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
        rows.push(row_and_handle(&t, &c).await);
    }
    // A second broker process on the same role: its own lock, its own IAM client.
    let config: latchkey::config::AwsConfig =
        toml::from_str(&format!("region = \"us-east-1\"\nendpoint_url = \"{}\"", aws.url)).unwrap();
    let other: Arc<dyn Backend> =
        Arc::new(AwsBackend::new(&config, std::time::Duration::from_secs(10), t.clock.clone()).await);
    let ours = t.app.backends.get(&BackendKind::Aws).unwrap().clone();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, (row, handle)) in rows.iter().cloned().enumerate() {
        let backend = if i % 2 == 0 { ours.clone() } else { other.clone() };
        tasks.spawn(async move { backend.revoke(&row, Some(&handle)).await });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap().unwrap();
    }
    let doc = aws.revocation_policy(&role).await.unwrap();
    let denied: Vec<String> = statements(&Some(doc.clone()))
        .iter()
        .flat_map(|s| s["Condition"]["StringEquals"]["aws:SourceIdentity"].as_array().cloned().unwrap_or_default())
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    for (row, _) in &rows {
        assert!(denied.contains(&format!("lk-{}", row.id.simple())), "{} lost from {doc}", row.id);
    }
    assert!(doc.to_string().len() < 10_240);

    // After every session has expired, the pruning pass removes them all.
    t.clock.advance(chrono::Duration::minutes(31));
    let policies = t.app.policies.get();
    ours.maintain(&Upkeep { policies: &policies, rules: &[] }).await.unwrap();
    assert_eq!(aws.revocation_policy(&role).await, None);
}

#[tokio::test]
async fn the_policy_stays_under_iams_size_limit() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let role = aws.create_role("deploy").await;
    let t = app(&aws, &[("deploy-staging", policy(&role, "deployer"))]).await;
    let c = credential(&t.exchange(&t.token(json!({})), "deploy-staging").await);
    let (row, _) = row_and_handle(&t, &c).await;
    let backend = t.app.backends.get(&BackendKind::Aws).unwrap();
    let expires_at = t.clock.now() + chrono::Duration::minutes(10);
    let mut refused = 0;
    for _ in 0..320 {
        let handle = json!({ "role_arn": role, "source_identity": format!("lk-{}", Uuid::new_v4().simple()), "expires_at": expires_at });
        if backend.revoke(&row, Some(handle.to_string().as_bytes())).await.is_err() {
            refused += 1;
        }
    }
    assert!(refused > 0, "320 identities do not fit in 10,240 characters");
    let doc = aws.revocation_policy(&role).await.unwrap();
    assert!(doc.to_string().len() <= 10_240, "{}", doc.to_string().len());
}

#[tokio::test]
async fn sts_out_of_reach_is_a_503_and_a_role_outside_the_path_does_not_load() {
    let Some(aws) = AwsPeer::from_env().await else { return };
    let role = aws.create_role("deploy").await;
    let t = TestApp::builder()
        .no_background()
        .config("[backends.aws]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n")
        .config("[limits]\noutbound_timeout = \"2s\"\n")
        .policy("deploy-staging.toml", &policy(&role, "deployer"))
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), "deploy-staging").await;
    assert_eq!(
        (a.status, a.body["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("temporarily_unavailable"))
    );
    assert_eq!(t.credential_states().await, [("failed".to_owned(), 1)]);

    let outside = "arn:aws:iam::123456789012:role/elsewhere/deploy";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.toml"), policy(outside, "x")).unwrap();
    let ctx = latchkey::policy::LoadContext {
        issuers: [(
            "github-actions".to_owned(),
            latchkey::policy::IssuerInfo { kind: latchkey::config::IssuerKind::Github, required_claims: Vec::new() },
        )]
        .into(),
        backends: vec![BackendKind::Aws],
        aws_role_path: Some("/latchkey/".into()),
        ..Default::default()
    };
    let errors = latchkey::policy::PolicySet::load_dir(dir.path(), &ctx).unwrap_err();
    assert!(format!("{errors:?}").contains("outside the IAM path /latchkey/"), "{errors:?}");
}
