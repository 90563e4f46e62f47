//! The `vault` backend against a real OpenBao (`bao server -dev`), through `POST /v1/token`.
//!
//! The broker always runs with the narrow policy of docs/BACKENDS.md, never with root: root is
//! only the tests' means to set up and to look at what the broker did.

use std::sync::Arc;

use chrono::Duration;
use latchkey::app::Clock;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::peers::{VaultPeer, VaultSetup};
use crate::support::store::contains;
use crate::support::test_app::{Builder, TestApp};

/// A policy admitting `acme/widgets` on `main`, with a 10 minute TTL and `grants`.
fn policy(grants: &str) -> String {
    format!(
        r#"
description = "vault test"
agent = "deployer"
issuer = "github-actions"
ttl = "10m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
ref = "refs/heads/main"

{grants}
"#
    )
}

fn token_grant(policies: &[&str]) -> String {
    format!("[[grant]]\nbackend = \"vault\"\nkind = \"token\"\npolicies = {}\nnum_uses = 5\n", json!(policies))
}

fn pki_grant(pki: &str, role: &str, extra: &str) -> String {
    format!(
        "[[grant]]\nname = \"cert\"\nbackend = \"vault\"\nkind = \"secret\"\npath = \"{pki}/issue/{role}\"\n\
         method = \"write\"\nparams = {{ common_name = \"ci.latchkey.test\", ttl = \"2h\" }}\n{extra}"
    )
}

/// Where the broker's secret files live; kept for the test's lifetime.
struct Files(tempfile::TempDir);

impl Files {
    fn new() -> Files {
        Files(tempfile::tempdir().unwrap())
    }

    /// Writes `content` to `name` and returns its absolute path, for the config.
    fn write(&self, name: &str, content: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, content).unwrap();
        path.display().to_string()
    }
}

/// `[backends.vault]` with a token file.
fn token_file_config(peer: &VaultPeer, role: &str, token_file: &str) -> String {
    format!("[backends.vault]\naddress = \"{}\"\ntoken_role = \"{role}\"\ntoken_file = \"{token_file}\"\n", peer.url())
}

/// A broker with its own periodic token holding the setup's broker policy.
async fn start(peer: &VaultPeer, s: &VaultSetup, files: &Files, builder: Builder) -> (TestApp, String) {
    let broker = peer.broker_token(&s.broker_policy, "1h").await;
    let path = files.write("vault-token", &broker);
    let t = builder.config(&token_file_config(peer, &s.role, &path)).start().await;
    (t, broker)
}

/// A subject token that is fresh at the broker's (possibly advanced) clock.
fn token_at(t: &TestApp) -> String {
    let now = t.clock.now().timestamp();
    t.token(json!({ "iat": now, "nbf": now, "exp": now + 300 }))
}

/// What the other tests rely on: leases from the `leased` PKI role only, and a broker policy that
/// reads the role but grants nothing else.
#[tokio::test]
async fn the_openbao_peer_behaves_as_the_tests_assume() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let issue = |role: &str| (format!("{}/issue/{role}", s.pki), json!({ "common_name": "a.latchkey.test" }));
    let (path, body) = issue("leased");
    let leased = peer.root("POST", &path, Some(body)).await;
    assert!(!leased["lease_id"].as_str().unwrap().is_empty(), "{leased}");
    let (path, body) = issue("unleased");
    let unleased = peer.root("POST", &path, Some(body)).await;
    assert_eq!(unleased["lease_id"], "", "{unleased}");
    let broker = peer.broker_token(&s.broker_policy, "1h").await;
    let (status, role) = peer.call(&broker, "GET", &format!("auth/token/roles/{}", s.role), None).await;
    assert_eq!(status, 200, "{role}");
    assert_eq!(role["data"]["orphan"], true);
    let (status, _) = peer.call(&broker, "GET", "sys/policies/acl", None).await;
    assert_eq!(status, 403, "the broker policy grants nothing beyond its paths");
}

#[tokio::test]
async fn a_token_grant_works_at_openbao_with_exactly_its_policies_and_is_revoked_at_ttl() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let builder =
        TestApp::builder().no_background().policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.read_policy])));
    let (t, _) = start(&peer, &s, &files, builder).await;

    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["issued_token_type"], "urn:latchkey:token-type:vault-token");
    assert_eq!(a.body["token_type"], "Bearer");
    let c = &a.body["credentials"][0];
    let token = c["token"].as_str().unwrap();
    assert_eq!(a.body["access_token"], token);
    assert_eq!(c["policies"], json!([s.read_policy]));
    assert_eq!(c["fingerprint"], latchkey::backend::fingerprint(token.as_bytes()));

    // It reads what its policy allows, and nothing more.
    peer.root("POST", &format!("secret/data/{}/app", s.prefix), Some(json!({ "data": { "k": "v" } }))).await;
    let (status, read) = peer.call(token, "GET", &format!("secret/data/{}/app", s.prefix), None).await;
    assert_eq!((status, &read["data"]["data"]["k"]), (200, &json!("v")), "{read}");
    let (status, _) =
        peer.call(token, "POST", &format!("secret/data/{}/app", s.prefix), Some(json!({"data": {}}))).await;
    assert_eq!(status, 403, "the read policy does not write");
    let looked = peer.lookup_token(token).await.expect("the minted token is known to OpenBao");
    assert_eq!(looked["policies"], json!([s.read_policy]), "exactly the policy's policies, no `default`");
    assert_eq!(looked["accessor"], c["accessor"]);
    assert_eq!(looked["meta"]["credential_id"], c["id"]);
    assert_eq!(looked["meta"]["agent"], "deployer");
    assert_eq!(looked["meta"]["capability"], cap.as_str());
    assert_eq!(looked["meta"]["repository"], "acme/widgets");
    assert_eq!(looked["orphan"], true, "it outlives the broker's token");
    assert_eq!(looked["renewable"], false);
    assert_eq!(looked["explicit_max_ttl"], 600, "the TTL is the policy's");
    assert_eq!(looked["display_name"], format!("token-latchkey-{cap}"));
    let ttl = looked["ttl"].as_i64().unwrap();
    assert!((590..=600).contains(&ttl), "ttl {ttl}");
    // Two of the five uses are spent.
    assert_eq!(looked["num_uses"], 3);

    // The ledger holds the accessor sealed, never the token nor the accessor in plain text.
    let at_rest = t.store().dump().await;
    for secret in [token, c["accessor"].as_str().unwrap()] {
        assert!(!contains(&at_rest, secret.as_bytes()), "{secret} is in the store");
    }

    // At the TTL the job revokes it through its accessor.
    t.clock.advance(Duration::minutes(11));
    assert!(latchkey::worker::run_jobs(&t.app).await.unwrap() >= 1);
    assert!(peer.lookup_token(token).await.is_none(), "the token was revoked at its TTL");
    assert_eq!(t.credential_states().await, [("expired".to_string(), 1)]);
}

#[tokio::test]
async fn narrowing_drops_policies_from_the_token() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let grant = token_grant(&[&s.read_policy, &s.write_policy]);
    let (t, _) = start(&peer, &s, &files, TestApp::builder().policy(&format!("{cap}.toml"), &policy(&grant))).await;
    let narrow = json!({ "vault": { "policies": [s.write_policy] } }).to_string();
    let a = t.exchange_narrowed(&t.token(json!({})), &cap, &narrow).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let looked = peer.lookup_token(a.body["access_token"].as_str().unwrap()).await.unwrap();
    assert_eq!(looked["policies"], json!([s.write_policy]));
}

#[tokio::test]
async fn a_leased_secret_is_returned_and_its_lease_revoked_at_the_policy_ttl() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let builder =
        TestApp::builder().no_background().policy(&format!("{cap}.toml"), &policy(&pki_grant(&s.pki, "leased", "")));
    let (t, _) = start(&peer, &s, &files, builder).await;

    let now = t.clock.now();
    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert_eq!(a.body["issued_token_type"], "urn:latchkey:token-type:vault-secret");
    assert_eq!(a.body["token_type"], "N_A");
    let c = &a.body["credentials"][0];
    let lease = c["lease_id"].as_str().unwrap();
    assert!(lease.starts_with(&format!("{}/issue/leased/", s.pki)), "{lease}");
    assert_eq!(a.body["access_token"], lease);
    assert_eq!(c["fingerprint"], latchkey::backend::fingerprint(lease.as_bytes()));
    assert!(c["lease_duration"].as_i64().unwrap() > 3600, "the lease outlives the policy TTL: {c}");
    assert!(c["data"]["certificate"].as_str().unwrap().contains("BEGIN CERTIFICATE"));
    // The credential ends at the policy TTL, not at the longer lease.
    let expires = chrono::DateTime::parse_from_rfc3339(c["expires_at"].as_str().unwrap()).unwrap();
    assert!((expires.timestamp() - (now + Duration::minutes(10)).timestamp()).abs() <= 1, "{expires}");
    assert!(peer.lookup_lease(lease).await.is_some(), "the lease exists");

    t.clock.advance(Duration::minutes(11));
    assert!(latchkey::worker::run_jobs(&t.app).await.unwrap() >= 1);
    assert!(peer.lookup_lease(lease).await.is_none(), "the lease was revoked at the policy TTL");
    assert_eq!(t.credential_states().await, [("expired".to_string(), 1)]);
}

#[tokio::test]
async fn a_secret_without_a_lease_is_refused_unless_the_grant_says_revocable_false() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let refused = format!("{}-refused", s.prefix);
    let allowed = format!("{}-allowed", s.prefix);
    let builder = TestApp::builder()
        .policy(&format!("{refused}.toml"), &policy(&pki_grant(&s.pki, "unleased", "")))
        .policy(&format!("{allowed}.toml"), &policy(&pki_grant(&s.pki, "unleased", "revocable = false\n")));
    let (t, _) = start(&peer, &s, &files, builder).await;

    let a = t.exchange(&t.token(json!({})), &refused).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(a.body["error"], "access_denied");
    assert!(!a.text.contains("BEGIN"), "the unleased secret never reaches the caller: {}", a.text);
    let failed = t.events("exchange.denied").await;
    assert!(failed[0]["reason"].as_str().unwrap().contains("without a lease"), "{}", failed[0]);

    let a = t.exchange(&t.token(json!({})), &allowed).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let c = &a.body["credentials"][0];
    assert_eq!(c["lease_id"], "");
    assert!(c["data"]["private_key"].as_str().unwrap().contains("PRIVATE KEY"));
}

#[tokio::test]
async fn a_policy_naming_a_vault_policy_outside_the_role_fails_to_load() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let (t, _) = start(&peer, &s, &files, TestApp::builder().no_background()).await;
    let bad = format!("{}.toml", s.prefix);
    std::fs::write(t.policy_dir().join(&bad), policy(&token_grant(&[&s.read_policy, &s.outside_policy]))).unwrap();
    assert!(!latchkey::worker::reload_policies(&t.app).await, "the set is refused");
    let failed = t.events("policy.reload_failed").await;
    let errors = failed[0]["detail"]["errors"].to_string();
    assert!(errors.contains(&bad) && errors.contains(&s.outside_policy), "{errors}");
    assert!(errors.contains(&s.read_policy), "the error lists what the role allows: {errors}");

    // `root` is refused whatever the role says.
    std::fs::write(t.policy_dir().join(&bad), policy(&token_grant(&["root"]))).unwrap();
    assert!(!latchkey::worker::reload_policies(&t.app).await);

    // At start-up too: a broker with this policy directory does not start.
    std::fs::write(t.policy_dir().join(&bad), policy(&token_grant(&[&s.outside_policy]))).unwrap();
    let mut config = t.app.config.clone();
    config.store.url = format!("sqlite://{}", files.0.path().join("second.db").display());
    let options = latchkey::server::Options {
        clock: t.clock.clone(),
        migrate: true,
        dev_issuer: None,
        sealer: Some(latchkey::seal::Sealer::from_bytes(&[9; 32])),
        backends: Vec::new(),
    };
    let err = latchkey::server::build(config, options).await.expect_err("the policy set does not load");
    assert!(format!("{err:#}").contains(&s.outside_policy), "{err:#}");
}

/// Without read access to the role the check moves to mint time, where Vault refuses.
#[tokio::test]
async fn without_the_role_readable_a_policy_outside_it_fails_at_mint_and_nothing_is_issued() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let narrow = format!("{}-narrow", s.prefix);
    let hcl = crate::support::peers::broker_policy(&s.role)
        .lines()
        .filter(|l| !l.contains("auth/token/roles/"))
        .collect::<Vec<_>>()
        .join("\n");
    peer.put_policy(&narrow, &hcl).await;
    let broker = peer.broker_token(&narrow, "1h").await;
    let path = files.write("vault-token", &broker);
    let t = TestApp::builder()
        .policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.outside_policy])))
        .config(&token_file_config(&peer, &s.role, &path))
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert_eq!(t.credential_states().await, [("failed".to_string(), 1)]);
    assert!(peer.tokens_with_meta("capability", &cap).await.is_empty());
}

#[tokio::test]
async fn when_openbao_is_down_the_exchange_answers_503_and_nothing_is_active() {
    let files = Files::new();
    let token = files.write("vault-token", "s.unused");
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = format!(
        "[backends.vault]\naddress = \"http://127.0.0.1:{port}\"\ntoken_role = \"latchkey\"\ntoken_file = \"{token}\"\n\
         [limits]\noutbound_timeout = \"2s\"\n"
    );
    let t = TestApp::builder().policy("down.toml", &policy(&token_grant(&["ci-read"]))).config(&config).start().await;
    let a = t.exchange(&t.token(json!({})), "down").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text);
    assert_eq!(a.body["error"], "temporarily_unavailable");
    assert_eq!(t.credential_states().await, [("failed".to_string(), 1)]);
}

/// All-or-nothing with the real server: the token minted first is revoked when the second grant
/// (a secret without a lease) is refused.
#[tokio::test]
async fn a_token_minted_before_a_failing_grant_does_not_stay_issued() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let grants = format!("{}{}", token_grant(&[&s.read_policy]), pki_grant(&s.pki, "unleased", ""));
    let (t, _) = start(&peer, &s, &files, TestApp::builder().policy(&format!("{cap}.toml"), &policy(&grants))).await;
    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.text);
    assert!(peer.tokens_with_meta("capability", &cap).await.is_empty(), "the token was revoked");
    assert_eq!(t.credential_states().await, [("failed".to_string(), 2)]);
}

#[tokio::test]
async fn the_reconciler_finds_an_unrecorded_token_by_its_credential_id() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let (t, _) = start(&peer, &s, &files, TestApp::builder().no_background()).await;

    // An exchange that crashed after Vault minted its token and before the accessor was recorded.
    let now = t.clock.now();
    let exchange_id = uuid::Uuid::now_v7();
    let credential_id = uuid::Uuid::now_v7();
    let exchange = latchkey::ledger::ExchangeRow {
        id: exchange_id,
        request_id: "crashed".into(),
        created_at: now,
        state: latchkey::ledger::ExchangeState::Pending,
        error: None,
        reason: None,
        issuer: Some("github-actions".into()),
        subject: Some("repo:acme/widgets:ref:refs/heads/main".into()),
        repository: Some("acme/widgets".into()),
        workflow: None,
        capability: Some(s.prefix.clone()),
        agent: Some("deployer".into()),
        claims: json!({}),
        trace: json!([]),
        policy_sha256: None,
        release_token_sha256: None,
        expires_at: Some(now + Duration::minutes(10)),
    };
    let credential = latchkey::ledger::CredentialRow {
        id: credential_id,
        exchange_id,
        name: "vault".into(),
        backend: latchkey::policy::BackendKind::Vault,
        state: latchkey::ledger::CredentialState::Pending,
        agent: "deployer".into(),
        capability: s.prefix.clone(),
        issuer: "github-actions".into(),
        subject: "repo:acme/widgets:ref:refs/heads/main".into(),
        repository: Some("acme/widgets".into()),
        workflow: None,
        created_at: now,
        expires_at: now + Duration::minutes(10),
        fingerprint: None,
        handle: None,
        revoke_requested: false,
        revoked_at: None,
    };
    let event = latchkey::audit::AuditEvent::new("exchange.started", now);
    t.app.ledger.record_intent(&exchange, &[credential], event).await.unwrap();
    let body = json!({
        "policies": [s.read_policy], "ttl": "600s", "no_default_policy": true,
        "meta": { "credential_id": credential_id.to_string(), "capability": s.prefix },
    });
    let minted = peer.root("POST", &format!("auth/token/create/{}", s.role), Some(body)).await;
    let token = minted["auth"]["client_token"].as_str().unwrap();
    assert!(peer.lookup_token(token).await.is_some());

    t.clock.advance(Duration::minutes(3));
    assert_eq!(latchkey::worker::reconcile(&t.app).await.unwrap(), 1);
    assert!(peer.lookup_token(token).await.is_none(), "the unrecorded token was found and revoked");
    assert_eq!(t.credential_states().await, [("failed".to_string(), 1)]);
}

#[tokio::test]
async fn approle_login_works_and_logs_in_again_when_its_token_is_revoked() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let mount = format!("{}-approle", s.prefix);
    peer.root("POST", &format!("sys/auth/{mount}"), Some(json!({ "type": "approle" }))).await;
    let role = json!({ "token_policies": [s.broker_policy], "token_ttl": "1h", "token_max_ttl": "4h", "token_no_default_policy": true });
    peer.root("POST", &format!("auth/{mount}/role/broker"), Some(role)).await;
    let role_id = peer.root("GET", &format!("auth/{mount}/role/broker/role-id"), None).await["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secret_id =
        peer.root("POST", &format!("auth/{mount}/role/broker/secret-id"), Some(json!({}))).await["data"]["secret_id"]
            .as_str()
            .unwrap()
            .to_owned();
    let secret_file = files.write("secret-id", &secret_id);
    let cap = s.prefix.clone();
    let config = format!(
        "[backends.vault]\naddress = \"{}\"\ntoken_role = \"{}\"\n[backends.vault.approle]\nrole_id = \"{role_id}\"\n\
         secret_id_file = \"{secret_file}\"\nmount = \"{mount}\"\n",
        peer.url(),
        s.role
    );
    let t = TestApp::builder()
        .policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.read_policy])))
        .config(&config)
        .start()
        .await;
    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(peer.lookup_token(a.body["access_token"].as_str().unwrap()).await.is_some());

    // Every token of the AppRole mount is revoked: the broker notices and logs in again.
    peer.root("PUT", &format!("sys/leases/revoke-prefix/auth/{mount}/login"), Some(json!({}))).await;
    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(peer.lookup_token(a.body["access_token"].as_str().unwrap()).await.is_some());
}

#[tokio::test]
async fn the_token_file_is_renewed_past_half_its_ttl_and_read_again_when_replaced() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let builder =
        TestApp::builder().no_background().policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.read_policy])));
    let (t, broker) = start(&peer, &s, &files, builder).await;
    let renewed = |v: &Value| v["last_renewal_time"].as_i64().unwrap_or(0);
    let before = renewed(&peer.lookup_token(&broker).await.unwrap());

    // Past half of the one-hour period, the next call renews first.
    t.clock.advance(Duration::minutes(31));
    assert_eq!(t.exchange(&token_at(&t), &cap).await.status, StatusCode::OK);
    let after = peer.lookup_token(&broker).await.unwrap();
    assert!(renewed(&after) > before, "renew-self was called: {after}");

    // The operator puts a new token in the file and revokes the old one.
    let replacement = peer.broker_token(&s.broker_policy, "1h").await;
    std::fs::write(files.0.path().join("vault-token"), &replacement).unwrap();
    peer.root("POST", "auth/token/revoke", Some(json!({ "token": broker }))).await;
    let a = t.exchange(&token_at(&t), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
}

#[tokio::test]
async fn everything_happens_inside_the_configured_namespace() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let name = format!("lk{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let ns = peer.new_namespace(&name).await;
    let s = ns.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let broker = ns.broker_token(&s.broker_policy, "1h").await;
    let path = files.write("vault-token", &broker);
    let config = format!("{}namespace = \"{name}\"\n", token_file_config(&peer, &s.role, &path));
    let t = TestApp::builder()
        .no_background()
        .policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.read_policy])))
        .config(&config)
        .start()
        .await;
    // The role exists only inside the namespace, so this shows it was read there: a policy
    // outside it does not load.
    std::fs::write(t.policy_dir().join("outside.toml"), policy(&token_grant(&[&s.outside_policy]))).unwrap();
    assert!(!latchkey::worker::reload_policies(&t.app).await);
    std::fs::remove_file(t.policy_dir().join("outside.toml")).unwrap();

    let a = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    let token = a.body["access_token"].as_str().unwrap();
    let looked = ns.lookup_token(token).await.expect("a token of the namespace");
    assert_eq!(looked["policies"], json!([s.read_policy]));
    t.clock.advance(Duration::minutes(11));
    latchkey::worker::run_jobs(&t.app).await.unwrap();
    assert!(ns.lookup_token(token).await.is_none(), "revoked inside the namespace");
}

/// A writer that keeps everything logged.
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
async fn no_vault_token_reaches_the_logs_or_the_audit_trail() {
    let Some(peer) = VaultPeer::from_env() else { return };
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
    let s = peer.setup().await;
    let files = Files::new();
    let cap = s.prefix.clone();
    let failing = format!("{}-failing", s.prefix);
    let builder = TestApp::builder()
        .no_background()
        .policy(&format!("{cap}.toml"), &policy(&token_grant(&[&s.read_policy])))
        .policy(
            &format!("{failing}.toml"),
            &policy(&format!("{}{}", token_grant(&[&s.read_policy]), pki_grant(&s.pki, "unleased", ""))),
        );
    let (t, broker) = start(&peer, &s, &files, builder).await;
    let ok = t.exchange(&t.token(json!({})), &cap).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);
    assert_eq!(t.exchange(&t.token(json!({})), &failing).await.status, StatusCode::FORBIDDEN);
    t.clock.advance(Duration::minutes(11));
    latchkey::worker::run_jobs(&t.app).await.unwrap();

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("request_id"), "the capture works: {logs}");
    let audit = serde_json::to_string(&t.audit().await).unwrap();
    let c = &ok.body["credentials"][0];
    for secret in [broker.as_str(), c["token"].as_str().unwrap(), c["accessor"].as_str().unwrap()] {
        assert!(!logs.contains(secret), "a Vault secret reached the logs: {secret}");
        assert!(!audit.contains(secret), "a Vault secret reached the audit trail: {secret}");
    }
    assert!(audit.contains(c["fingerprint"].as_str().unwrap()), "the fingerprint is what the audit keeps");
}

#[tokio::test]
async fn a_token_role_that_does_not_make_orphans_is_logged_as_an_error() {
    let Some(peer) = VaultPeer::from_env() else { return };
    let captured = Captured::default();
    let writer = captured.clone();
    let installed = tracing_subscriber::fmt().with_writer(move || writer.clone()).try_init().is_ok();
    if !installed {
        eprintln!("skipped: another test installed the global log subscriber first");
        return;
    }
    let s = peer.setup().await;
    peer.root("POST", &format!("auth/token/roles/{}", s.role), Some(json!({ "orphan": false }))).await;
    let files = Files::new();
    let (_t, _) = start(&peer, &s, &files, TestApp::builder().no_background()).await;
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("ERROR") && logs.contains("orphan = false"), "{logs}");
}
