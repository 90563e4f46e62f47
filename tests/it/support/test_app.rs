//! `TestApp`: a real broker on a loopback port with the store under test (a SQLite file in a
//! temporary folder, or a schema of its own in PostgreSQL: see [`super::store`]), and
//! `TestIssuer`: an in-process OIDC issuer (discovery + JWKS over HTTP) whose ES256 key the
//! tests hold, so they can sign good tokens and craft hostile ones.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use axum::Json;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::Utc;
use latchkey::app::{AppState, ManualClock};
use latchkey::backend::Backend;
use latchkey::config::Config;
use latchkey::seal::Sealer;
use latchkey::server::{self, Options, Running};
use reqwest::StatusCode;
use serde_json::{Map, Value, json};

use super::store::Store;

pub const AUDIENCE: &str = "https://latchkey.test";

/// An OIDC issuer on a loopback port with one ES256 key.
pub struct TestIssuer {
    pub url: String,
    pub kid: String,
    pair: Arc<EcdsaKeyPair>,
    rng: SystemRandom,
    jwks_fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestIssuer {
    pub async fn start() -> TestIssuer {
        Self::start_with_kid("test-key-1").await
    }

    pub async fn start_with_kid(kid: &str) -> TestIssuer {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = Arc::new(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let point = pair.public_key().as_ref().to_vec();
        let jwks = json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]});
        let discovery = json!({
            "issuer": url,
            "jwks_uri": format!("{url}/jwks"),
            "id_token_signing_alg_values_supported": ["ES256"],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
        });
        let fetches = Arc::new(AtomicUsize::new(0));
        let counter = fetches.clone();
        let router = axum::Router::new()
            .route("/.well-known/openid-configuration", get(move || async move { Json(discovery) }))
            .route(
                "/jwks",
                get(move || {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let jwks = jwks.clone();
                    async move { Json(jwks) }
                }),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        TestIssuer { url, kid: kid.to_owned(), pair, rng, jwks_fetches: fetches, task }
    }

    /// GitHub-Actions-style claims for `acme/widgets` on `main`, with `overrides` applied
    /// (`null` removes a claim).
    pub fn claims(&self, overrides: Value) -> Map<String, Value> {
        let now = Utc::now().timestamp();
        let mut claims = json!({
            "iss": self.url,
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": uuid::Uuid::new_v4().to_string(),
            "sub": "repo:acme/widgets:ref:refs/heads/main",
            "repository": "acme/widgets",
            "repository_owner": "acme",
            "repository_owner_id": "1234567",
            "repository_id": "7654321",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "event_name": "push",
            "actor": "octocat",
            "job_workflow_ref": "acme/widgets/.github/workflows/ci.yml@refs/heads/main",
            "workflow": "CI",
            "run_id": "4242",
            "runner_environment": "github-hosted",
        });
        let map = claims.as_object_mut().unwrap();
        for (k, v) in overrides.as_object().cloned().unwrap_or_default() {
            if v.is_null() {
                map.remove(&k);
            } else {
                map.insert(k, v);
            }
        }
        map.clone()
    }

    /// A token signed with this issuer's key.
    pub fn token(&self, overrides: Value) -> String {
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": self.kid });
        self.sign(&header, &Value::Object(self.claims(overrides)))
    }

    /// Signs any header and claims with this issuer's ES256 key.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let mut t = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let sig = self.pair.sign(&self.rng, t.as_bytes()).unwrap();
        t.push('.');
        t.push_str(&B64.encode(sig.as_ref()));
        t
    }

    /// The public key as an attacker would find it, for "HMAC with the public key" attacks.
    pub fn public_key_bytes(&self) -> Vec<u8> {
        self.pair.public_key().as_ref().to_vec()
    }

    pub fn jwks_fetches(&self) -> usize {
        self.jwks_fetches.load(Ordering::SeqCst)
    }
}

/// How to build a [`TestApp`].
pub struct Builder {
    extra_policies: Vec<(String, String)>,
    server_lines: String,
    tls: bool,
    reload_interval: String,
    config_tail: String,
    backends: Vec<Arc<dyn Backend>>,
    background: bool,
    clock: Option<Arc<ManualClock>>,
    audit_lines: String,
    checkpoint_key: bool,
    sealing_from_config: bool,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            extra_policies: Vec::new(),
            server_lines: String::new(),
            tls: false,
            reload_interval: "1h".into(),
            config_tail: String::new(),
            backends: Vec::new(),
            background: true,
            clock: None,
            audit_lines: String::new(),
            checkpoint_key: false,
            sealing_from_config: false,
        }
    }
}

impl Builder {
    /// Adds a policy file beside the example policies.
    pub fn policy(mut self, name: &str, text: &str) -> Self {
        self.extra_policies.push((name.to_owned(), text.to_owned()));
        self
    }

    /// Adds lines to the `[server]` table.
    pub fn server(mut self, lines: &str) -> Self {
        self.server_lines.push_str(lines);
        self.server_lines.push('\n');
        self
    }

    /// How often the policy directory is checked for changes (default: an hour, i.e. never).
    pub fn reload_interval(mut self, interval: &str) -> Self {
        self.reload_interval = interval.to_owned();
        self
    }

    /// Serves HTTPS with a self-signed certificate for 127.0.0.1 (made with `openssl`).
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Appends TOML to the generated config.
    pub fn config(mut self, tail: &str) -> Self {
        self.config_tail.push_str(tail);
        self
    }

    /// Adds (or replaces) a backend: for doubles of services that have no local server.
    pub fn backend(mut self, backend: Arc<dyn Backend>) -> Self {
        self.backends.push(backend);
        self
    }

    /// Uses this clock, shared with a double that must agree with the broker on the time.
    pub fn clock(mut self, clock: Arc<ManualClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Adds lines to the `[audit]` table.
    pub fn audit(mut self, lines: &str) -> Self {
        self.audit_lines.push_str(lines);
        self.audit_lines.push('\n');
        self
    }

    /// Makes `checkpoint.key` in the test folder (as `latchkey init` does) and configures it.
    pub fn checkpoint_key(mut self) -> Self {
        self.checkpoint_key = true;
        self.audit("checkpoint_key_file = \"checkpoint.key\"")
    }

    /// Seals with the key files of the config's `[sealing]` table (which the test writes, with
    /// its keys), as `serve` does, instead of a fixed in-memory key; restarts read them again.
    pub fn sealing_from_config(mut self) -> Self {
        self.sealing_from_config = true;
        self
    }

    /// Without the background loops: tests drive the workers themselves.
    pub fn no_background(mut self) -> Self {
        self.background = false;
        self
    }

    pub async fn start(self) -> TestApp {
        let issuer = TestIssuer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        copy_dir(&repo_path("policies"), &policies);
        for (name, text) in &self.extra_policies {
            std::fs::write(policies.join(name), text).unwrap();
        }
        if self.checkpoint_key {
            latchkey::checkpoint::generate_key_file(&dir.path().join("checkpoint.key")).unwrap();
        }
        let store = Store::fresh(dir.path()).await;
        let audit_table =
            if self.audit_lines.is_empty() { String::new() } else { format!("[audit]\n{}", self.audit_lines) };
        let mut server_lines = self.server_lines.clone();
        if self.tls {
            let status = std::process::Command::new("openssl")
                .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
                .args(["-keyout", "tls.key", "-out", "tls.crt", "-days", "1", "-subj", "/CN=127.0.0.1"])
                .args(["-addext", "subjectAltName=IP:127.0.0.1"])
                .current_dir(dir.path())
                .output()
                .expect("openssl makes the test certificate");
            assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
            server_lines.push_str("tls_cert_file = \"tls.crt\"\ntls_key_file = \"tls.key\"\n");
        }
        let text = format!(
            r#"
[server]
listen = "127.0.0.1:0"
audience = "{AUDIENCE}"
{server_lines}
[store]
url = "{store_url}"
[policies]
dir = "policies"
reload_interval = "{reload_interval}"
[[issuer]]
id = "github-actions"
kind = "github"
url = "{url}"
algorithms = ["ES256"]
max_token_age = "10m"
[[admin_key]]
name = "test-admin"
role = "admin"
sha256 = "{admin}"
[[admin_key]]
name = "test-service"
role = "service"
sha256 = "{service}"
[[admin_key]]
name = "test-auditor"
role = "auditor"
sha256 = "{auditor}"
[[admin_key]]
name = "test-security"
role = "security"
sha256 = "{security}"
{audit_table}
{tail}
"#,
            url = issuer.url,
            store_url = store.config_url(),
            admin = sha256_hex(ADMIN_KEY),
            service = sha256_hex(SERVICE_KEY),
            auditor = sha256_hex(AUDITOR_KEY),
            security = sha256_hex(SECURITY_KEY),
            tail = self.config_tail,
            reload_interval = self.reload_interval,
        );
        let config_path = dir.path().join("latchkey.toml");
        std::fs::write(&config_path, text).unwrap();
        let config = Config::load(&config_path).unwrap();
        let clock = self.clock.clone().unwrap_or_else(|| ManualClock::new(Utc::now()));
        let options = Options {
            clock: clock.clone(),
            migrate: true,
            dev_issuer: None,
            sealer: test_sealer(self.sealing_from_config),
            backends: Vec::new(),
        };
        let restart = Restart {
            backends: self.backends.clone(),
            background: self.background,
            tls: self.tls,
            sealing_from_config: self.sealing_from_config,
        };
        let options = Options { backends: self.backends, ..options };
        let app = server::build(config, options).await.unwrap();
        let running = server::start(app.clone(), None, self.background).await.unwrap();
        // The certificate is self-signed: these tests check that TLS is served, not PKI.
        let client = reqwest::Client::builder().tls_danger_accept_invalid_certs(self.tls).build().unwrap();
        let admin_url = running.admin_addr.map(|a| format!("http://{a}"));
        TestApp {
            url: running.url(),
            admin_url,
            client,
            issuer,
            app,
            clock,
            running: Some(running),
            dir,
            store,
            restart,
        }
    }
}

pub const ADMIN_KEY: &str = "lk_test_admin_key";
pub const SERVICE_KEY: &str = "lk_test_service_key";
pub const AUDITOR_KEY: &str = "lk_test_auditor_key";
pub const SECURITY_KEY: &str = "lk_test_security_key";

/// What [`TestApp::restart`] needs to start the same broker again.
struct Restart {
    backends: Vec<Arc<dyn Backend>>,
    background: bool,
    tls: bool,
    sealing_from_config: bool,
}

/// The fixed test sealing key, or `None`: the key files the config names.
fn test_sealer(from_config: bool) -> Option<Sealer> {
    (!from_config).then(|| Sealer::from_bytes(&[9; 32]))
}

/// A running broker and what a test needs around it.
pub struct TestApp {
    pub url: String,
    /// `/healthz`, `/readyz`, `/metrics` when `admin_listen` is configured.
    pub admin_url: Option<String>,
    pub client: reqwest::Client,
    pub issuer: TestIssuer,
    pub app: AppState,
    /// The broker's clock: tests move it instead of sleeping.
    pub clock: Arc<ManualClock>,
    running: Option<Running>,
    pub dir: tempfile::TempDir,
    /// Where the broker keeps its records, for tests that look behind the API.
    store: Store,
    restart: Restart,
}

/// An HTTP answer: status, headers and the JSON body (`null` if it was not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl TestApp {
    pub async fn start() -> TestApp {
        Builder::default().start().await
    }

    pub fn builder() -> Builder {
        Builder::default()
    }

    /// A valid subject token for `acme/widgets` on `main`, with overrides.
    /// Its times follow the broker's clock, so a test that moves the clock still gets a fresh token.
    pub fn token(&self, overrides: Value) -> String {
        let now = latchkey::app::Clock::now(&*self.clock).timestamp();
        let mut claims = json!({ "iat": now, "nbf": now, "exp": now + 300 });
        for (k, v) in overrides.as_object().cloned().unwrap_or_default() {
            claims[k] = v;
        }
        self.issuer.token(claims)
    }

    /// `POST /v1/token` with the form encoding.
    pub async fn exchange(&self, token: &str, capability: &str) -> Answer {
        self.exchange_form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("subject_token", token),
            ("scope", capability),
        ])
        .await
    }

    /// `POST /v1/token` with a `narrow` form field holding JSON.
    pub async fn exchange_narrowed(&self, token: &str, capability: &str, narrow: &str) -> Answer {
        self.exchange_form(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("subject_token", token),
            ("scope", capability),
            ("narrow", narrow),
        ])
        .await
    }

    pub async fn exchange_form(&self, form: &[(&str, &str)]) -> Answer {
        let r = self.client.post(format!("{}/v1/token", self.url)).form(form).send().await.unwrap();
        answer(r).await
    }

    pub async fn exchange_json(&self, body: &Value) -> Answer {
        let r = self.client.post(format!("{}/v1/token", self.url)).json(body).send().await.unwrap();
        answer(r).await
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let mut r = self.client.get(format!("{}{path}", self.url));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        answer(r.send().await.unwrap()).await
    }

    pub async fn post_form(&self, path: &str, key: Option<&str>, form: &[(&str, &str)]) -> Answer {
        let mut r = self.client.post(format!("{}{path}", self.url)).form(form);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        answer(r.send().await.unwrap()).await
    }

    pub async fn post_json(&self, path: &str, key: Option<&str>, body: &Value) -> Answer {
        let mut r = self.client.post(format!("{}{path}", self.url)).json(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        answer(r.send().await.unwrap()).await
    }

    /// Every audit event, oldest first, read through the API.
    pub async fn audit(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let a = self.get(&format!("/v1/audit?limit=1000&cursor={cursor}"), Some(AUDITOR_KEY)).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
            out.extend(a.body["items"].as_array().unwrap().iter().map(|i| i["event"].clone()));
            match a.body["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }

    /// Audit events of one kind.
    pub async fn events(&self, name: &str) -> Vec<Value> {
        self.audit().await.into_iter().filter(|e| e["event"] == name).collect()
    }

    /// The broker's store, to look at (or tamper with) what it holds behind the API.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// `(state, count)` of every credential row, read straight from the store.
    pub async fn credential_states(&self) -> Vec<(String, i64)> {
        self.store
            .query("SELECT state, count(*) FROM credentials GROUP BY state ORDER BY state")
            .await
            .into_iter()
            .map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_i64().unwrap()))
            .collect()
    }

    pub async fn credential_count(&self) -> i64 {
        self.credential_states().await.iter().map(|(_, n)| n).sum()
    }

    pub fn policy_dir(&self) -> PathBuf {
        self.dir.path().join("policies")
    }

    /// Stops the broker and starts it again on the same store, config, clock and backends, as a
    /// process restart would: only what the store made durable survives.
    pub async fn restart(mut self) -> TestApp {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
        let TestApp { issuer, clock, dir, store, restart, app, .. } = self;
        // The ledger's file lock is released once the last handle on the old app is gone.
        drop(app);
        let config = Config::load(&dir.path().join("latchkey.toml")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let app = loop {
            let options = Options {
                clock: clock.clone(),
                migrate: false,
                dev_issuer: None,
                sealer: test_sealer(restart.sealing_from_config),
                backends: restart.backends.clone(),
            };
            match server::build(config.clone(), options).await {
                Ok(app) => break app,
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("restart: {e:#}; retrying");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                Err(e) => panic!("the broker did not restart: {e:#}"),
            }
        };
        let running = server::start(app.clone(), None, restart.background).await.unwrap();
        let client = reqwest::Client::builder().tls_danger_accept_invalid_certs(restart.tls).build().unwrap();
        let admin_url = running.admin_addr.map(|a| format!("http://{a}"));
        TestApp {
            url: running.url(),
            admin_url,
            client,
            issuer,
            app,
            clock,
            running: Some(running),
            dir,
            store,
            restart,
        }
    }

    /// Writes what an exchange leaves behind when the broker dies between its intent (step 5)
    /// and the handle of its one grant (step 6): a pending exchange and a pending credential of
    /// `backend` without a handle. Returns the credential.
    pub async fn record_crashed_intent(
        &self,
        backend: latchkey::policy::BackendKind,
    ) -> latchkey::ledger::CredentialRow {
        let now = latchkey::app::Clock::now(&*self.clock);
        let exchange = latchkey::ledger::ExchangeRow {
            id: uuid::Uuid::now_v7(),
            request_id: "crashed".into(),
            created_at: now,
            state: latchkey::ledger::ExchangeState::Pending,
            error: None,
            reason: None,
            issuer: Some("github-actions".into()),
            subject: Some("repo:acme/widgets:ref:refs/heads/main".into()),
            repository: Some("acme/widgets".into()),
            workflow: None,
            capability: Some("pr-review".into()),
            agent: Some("pr-reviewer".into()),
            claims: json!({}),
            trace: json!([]),
            policy_sha256: None,
            release_token_sha256: None,
            expires_at: Some(now + chrono::Duration::minutes(15)),
        };
        let credential = latchkey::ledger::CredentialRow {
            id: uuid::Uuid::now_v7(),
            exchange_id: exchange.id,
            name: backend.as_str().into(),
            backend,
            state: latchkey::ledger::CredentialState::Pending,
            agent: "pr-reviewer".into(),
            capability: "pr-review".into(),
            issuer: "github-actions".into(),
            subject: "repo:acme/widgets:ref:refs/heads/main".into(),
            repository: Some("acme/widgets".into()),
            workflow: None,
            created_at: now,
            expires_at: now + chrono::Duration::minutes(15),
            fingerprint: None,
            handle: None,
            revoke_requested: false,
            revoked_at: None,
        };
        let event = latchkey::audit::AuditEvent::new("exchange.started", now);
        self.app.ledger.record_intent(&exchange, std::slice::from_ref(&credential), event).await.unwrap();
        credential
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Answer { status, headers, body, text }
}

/// The head of a policy for `agent` that admits pushes to `main` of `acme/widgets` (the test
/// issuer's default token), pinned by owner id; grants follow.
pub fn policy_head(agent: &str, ttl: &str) -> String {
    format!(
        "description = \"test policy for {agent}\"\nagent = \"{agent}\"\nissuer = \"github-actions\"\nttl = \"{ttl}\"\n\n\
         [match]\nrepository_owner_id = \"1234567\"\nrepository = \"acme/widgets\"\nref = \"refs/heads/main\"\n\n"
    )
}

pub fn sha256_hex(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(s.as_bytes()))
}

pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
}

/// Base64url without padding, for hand-made tokens.
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    B64.encode(bytes)
}
