//! The `vault` backend: Vault or OpenBao tokens and leased secrets.
//!
//! Token grants are minted through one token role (`auth/token/create/<token_role>`), which the
//! operator creates with `orphan = true` so that a grant does not die with the broker's own
//! token, with `allowed_policies` so that Vault itself refuses anything wider, and with
//! `token_explicit_max_ttl` as a ceiling. Secret grants read or write a path that answers with a
//! lease. latchkey keeps only what revocation needs: a token's accessor (never the token) or a
//! lease id, sealed by the broker.
//!
//! The broker's own token comes from `token_file` or from an AppRole login. It is renewed with
//! `auth/token/renew-self` once half of its TTL has passed: lazily before each call, and by a
//! keep-alive task (see [`Backend::spawn_maintenance`]) so that an idle broker does not let a
//! periodic token lapse. When renewal fails the broker logs in again (AppRole) or re-reads the
//! token file (an operator may have replaced it). A call refused with 403 whose cause is a dead
//! broker token is retried once after such a fresh login.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value, json};

use super::{Backend, BackendError, MintRequest, Minted, SecretFields, fingerprint};
use crate::app::Clock;
use crate::config::VaultConfig;
use crate::ledger::CredentialRow;
use crate::policy::{BackendKind, GrantSpec, VaultGrant, VaultMethod, VaultPolicyLimits};

pub const TOKEN_TYPE: &str = "urn:latchkey:token-type:vault-token";
pub const SECRET_TYPE: &str = "urn:latchkey:token-type:vault-secret";

/// Answers larger than this are refused: nothing latchkey asks for comes close.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// How often the keep-alive task checks whether the broker token needs renewing.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
/// Handle prefixes: what kind of thing the sealed handle names.
const TOKEN_HANDLE: &str = "token:";
const LEASE_HANDLE: &str = "lease:";

/// What went wrong talking to Vault. Messages hold paths and Vault's own error strings, never a
/// token: Vault does not echo tokens in its errors, and latchkey never puts one in a path.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    #[error("cannot reach Vault at {0}")]
    Unreachable(String),
    #[error("Vault answered {status} to {method} {path}: {errors}")]
    Status { method: Method, path: String, status: StatusCode, errors: String },
    #[error("Vault's answer to {0} is not what was expected: {1}")]
    BadAnswer(String, String),
    #[error("the broker cannot log in to Vault: {0}")]
    Login(String),
    /// latchkey refuses the grant itself, before or after asking Vault.
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Config(String),
}

impl VaultError {
    fn status(&self) -> Option<StatusCode> {
        match self {
            VaultError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Unreachable, 5xx, throttled, or a broker that cannot log in: worth a retry later. Anything
    /// else Vault refused on purpose (permissions, the role's limits).
    fn into_backend(self) -> BackendError {
        let message = self.to_string();
        let transient = match &self {
            VaultError::Status { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            VaultError::Refused(_) => false,
            VaultError::BadAnswer(..) | VaultError::Unreachable(_) | VaultError::Login(_) | VaultError::Config(_) => {
                true
            }
        };
        if transient {
            BackendError::Unavailable { backend: BackendKind::Vault, message }
        } else {
            BackendError::Refused { backend: BackendKind::Vault, message }
        }
    }
}

/// How the broker gets its own token.
#[derive(Debug, Clone)]
enum Login {
    TokenFile(PathBuf),
    AppRole { role_id: String, secret_id_file: PathBuf, mount: String },
}

/// The broker's current token and when to renew it.
struct Session {
    token: SecretString,
    /// `None`: never (a token without a TTL, or one that cannot be renewed).
    renew_at: Option<DateTime<Utc>>,
}

struct Inner {
    http: reqwest::Client,
    /// `https://vault.example.com:8200`, without a trailing slash.
    address: String,
    namespace: Option<String>,
    token_role: String,
    login: Login,
    session: tokio::sync::Mutex<Option<Session>>,
    /// Read from the token role at start-up, when the broker may read it.
    limits: std::sync::RwLock<Option<VaultPolicyLimits>>,
    clock: Arc<dyn Clock>,
}

/// Mints and revokes Vault/OpenBao tokens and leases.
#[derive(Clone)]
pub struct VaultBackend(Arc<Inner>);

impl std::fmt::Debug for VaultBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let login = match &self.0.login {
            Login::TokenFile(p) => format!("token_file {}", p.display()),
            Login::AppRole { mount, .. } => format!("approle at {mount}"),
        };
        f.debug_struct("VaultBackend")
            .field("address", &self.0.address)
            .field("namespace", &self.0.namespace)
            .field("token_role", &self.0.token_role)
            .field("login", &login)
            .finish_non_exhaustive()
    }
}

/// What start-up learnt about the token role.
#[derive(Debug, Clone)]
pub struct RoleFacts {
    pub limits: VaultPolicyLimits,
    pub orphan: bool,
}

impl VaultBackend {
    /// Builds the backend; files are checked now, Vault is not called until it is needed.
    /// `resolve` turns a path from the config file into one relative to the file's directory.
    pub fn new(
        config: &VaultConfig,
        resolve: impl Fn(&std::path::Path) -> PathBuf,
        timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<VaultBackend, VaultError> {
        let mut builder = reqwest::Client::builder()
            // A redirect could carry the broker token to another host.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(timeout)
            .timeout(timeout)
            .user_agent(concat!("latchkey/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &config.ca_file {
            let path = resolve(ca);
            let pem = std::fs::read(&path)
                .map_err(|e| VaultError::Config(format!("cannot read ca_file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| VaultError::Config(format!("ca_file {} is not a PEM bundle: {e}", path.display())))?;
            if certs.is_empty() {
                return Err(VaultError::Config(format!("ca_file {} holds no certificate", path.display())));
            }
            // The configured CA is the only one trusted for Vault, as with VAULT_CACERT.
            builder = builder.tls_certs_only(certs);
        }
        let http =
            builder.build().map_err(|e| VaultError::Config(format!("cannot build the Vault HTTP client: {e}")))?;
        let login = match (&config.token_file, &config.approle) {
            (Some(file), _) => Login::TokenFile(resolve(file)),
            (None, Some(a)) => Login::AppRole {
                role_id: a.role_id.clone(),
                secret_id_file: resolve(&a.secret_id_file),
                mount: a.mount.trim_matches('/').to_owned(),
            },
            (None, None) => return Err(VaultError::Config("token_file or approle is required".into())),
        };
        // Fail at start-up, not at the first exchange, when the secret file is missing.
        let file = match &login {
            Login::TokenFile(p) => p,
            Login::AppRole { secret_id_file, .. } => secret_id_file,
        };
        read_secret_file(file)?;
        Ok(VaultBackend(Arc::new(Inner {
            http,
            address: config.address.trim_end_matches('/').to_owned(),
            namespace: config.namespace.clone(),
            token_role: config.token_role.clone(),
            login,
            session: tokio::sync::Mutex::new(None),
            limits: std::sync::RwLock::new(None),
            clock,
        })))
    }

    /// Reads the token role (`GET auth/token/roles/<role>`), remembers its policy limits for
    /// mint-time checks, and returns them. Logs loudly when the role does not make orphans.
    pub async fn read_role(&self) -> Result<RoleFacts, VaultError> {
        let path = format!("auth/token/roles/{}", self.0.token_role);
        let answer = self.0.request(Method::GET, &path, None).await?;
        let data = &answer["data"];
        let list = |key: &str| -> Vec<String> {
            data[key].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        let limits = VaultPolicyLimits {
            allowed: list("allowed_policies"),
            allowed_glob: list("allowed_policies_glob"),
            disallowed: list("disallowed_policies"),
            disallowed_glob: list("disallowed_policies_glob"),
        };
        let orphan = data["orphan"].as_bool().unwrap_or(false);
        if !orphan {
            tracing::error!(
                vault.token_role = %self.0.token_role,
                "the Vault token role has orphan = false: every token latchkey mints is a child of the broker's \
                 own token and is revoked with it; set orphan = true on the role"
            );
        }
        if limits.allowed.is_empty() && limits.allowed_glob.is_empty() {
            tracing::warn!(
                vault.token_role = %self.0.token_role,
                "the Vault token role has no allowed_policies: tokens may carry any policy of the broker's own token"
            );
        }
        *self.0.limits.write().unwrap_or_else(|p| p.into_inner()) = Some(limits.clone());
        Ok(RoleFacts { limits, orphan })
    }

    /// Logs in (or renews) now; for start-up checks and tests.
    pub async fn ensure_session(&self) -> Result<(), VaultError> {
        self.0.token().await.map(drop)
    }
}

impl Inner {
    fn url(&self, path: &str) -> String {
        format!("{}/v1/{}", self.address, path.trim_start_matches('/'))
    }

    /// One HTTP call. `token` is the broker's token, `None` for a login.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        token: Option<&SecretString>,
    ) -> Result<Value, VaultError> {
        let mut request = self.http.request(method.clone(), self.url(path));
        if let Some(token) = token {
            request = request.header("X-Vault-Token", token.expose_secret());
        }
        if let Some(ns) = &self.namespace {
            request = request.header("X-Vault-Namespace", ns);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        // reqwest's message names the URL, which holds no secret; the headers are not in it.
        let response = request.send().await.map_err(|e| VaultError::Unreachable(format!("{}: {e}", self.address)))?;
        let status = response.status();
        if response.content_length().is_some_and(|n| n > MAX_ANSWER_BYTES as u64) {
            return Err(VaultError::BadAnswer(path.to_owned(), "the answer is too large".into()));
        }
        let bytes = response.bytes().await.map_err(|e| VaultError::Unreachable(format!("{}: {e}", self.address)))?;
        if bytes.len() > MAX_ANSWER_BYTES {
            return Err(VaultError::BadAnswer(path.to_owned(), format!("{} bytes is too large", bytes.len())));
        }
        let json: Value =
            if bytes.is_empty() { Value::Null } else { serde_json::from_slice(&bytes).unwrap_or(Value::Null) };
        if status.is_success() {
            return Ok(json);
        }
        let errors = json["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(Value::as_str).map(str::trim).collect::<Vec<_>>().join("; "))
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "no error message".to_owned());
        Err(VaultError::Status { method, path: path.to_owned(), status, errors })
    }

    /// A call with the broker's token. A 403 caused by a dead broker token (expired, revoked)
    /// is retried once after a fresh login; any other 403 is Vault refusing the request.
    async fn request(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, VaultError> {
        let token = self.token().await?;
        match self.send(method.clone(), path, body, Some(&token)).await {
            Err(e) if e.status() == Some(StatusCode::FORBIDDEN) && self.is_dead(&token).await => {
                tracing::warn!(vault.path = path, "the broker's Vault token is no longer valid; logging in again");
                self.forget(&token).await;
                let token = self.token().await?;
                self.send(method, path, body, Some(&token)).await
            }
            other => other,
        }
    }

    async fn is_dead(&self, token: &SecretString) -> bool {
        matches!(
            self.send(Method::GET, "auth/token/lookup-self", None, Some(token)).await,
            Err(e) if e.status() == Some(StatusCode::FORBIDDEN)
        )
    }

    /// Drops the session if it still holds `token`, so that the next call logs in.
    async fn forget(&self, token: &SecretString) {
        let mut session = self.session.lock().await;
        if session.as_ref().is_some_and(|s| s.token.expose_secret() == token.expose_secret()) {
            *session = None;
        }
    }

    /// The broker's token: logged in on first use, renewed past half its TTL, and logged in
    /// again when renewal fails.
    async fn token(&self) -> Result<SecretString, VaultError> {
        let mut session = self.session.lock().await;
        let now = self.clock.now();
        if let Some(s) = session.as_ref() {
            if s.renew_at.is_none_or(|at| now < at) {
                return Ok(s.token.clone());
            }
            match self.renew(&s.token, now).await {
                Ok(renewed) => {
                    let token = renewed.token.clone();
                    *session = Some(renewed);
                    return Ok(token);
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the broker's Vault token; logging in again"),
            }
        }
        let fresh = self.login(now).await?;
        let token = fresh.token.clone();
        *session = Some(fresh);
        Ok(token)
    }

    async fn renew(&self, token: &SecretString, now: DateTime<Utc>) -> Result<Session, VaultError> {
        let answer = self.send(Method::POST, "auth/token/renew-self", Some(&json!({})), Some(token)).await?;
        let auth = &answer["auth"];
        let ttl = auth["lease_duration"].as_i64().unwrap_or(0);
        let renewable = auth["renewable"].as_bool().unwrap_or(false);
        tracing::debug!(ttl, "renewed the broker's Vault token");
        Ok(Session { token: token.clone(), renew_at: renew_at(now, ttl, renewable) })
    }

    async fn login(&self, now: DateTime<Utc>) -> Result<Session, VaultError> {
        let login_error = |e: VaultError| VaultError::Login(e.to_string());
        match &self.login {
            Login::TokenFile(path) => {
                let token = read_secret_file(path)?;
                let answer =
                    self.send(Method::GET, "auth/token/lookup-self", None, Some(&token)).await.map_err(|e| match e
                        .status()
                    {
                        Some(StatusCode::FORBIDDEN) => VaultError::Login(format!(
                            "the token in {} is not valid (expired or revoked)",
                            path.display()
                        )),
                        _ => login_error(e),
                    })?;
                let data = &answer["data"];
                let ttl = data["ttl"].as_i64().unwrap_or(0);
                let renewable = data["renewable"].as_bool().unwrap_or(false);
                if ttl > 0 && data["period"].as_i64().unwrap_or(0) == 0 {
                    tracing::warn!(
                        ttl,
                        "the broker's Vault token is not periodic: it stops working at its max TTL; use a periodic \
                         token or AppRole"
                    );
                }
                Ok(Session { token, renew_at: renew_at(now, ttl, renewable) })
            }
            Login::AppRole { role_id, secret_id_file, mount } => {
                let secret_id = read_secret_file(secret_id_file)?;
                let body = json!({ "role_id": role_id, "secret_id": secret_id.expose_secret() });
                let answer = self
                    .send(Method::POST, &format!("auth/{mount}/login"), Some(&body), None)
                    .await
                    .map_err(login_error)?;
                let auth = &answer["auth"];
                let token = auth["client_token"]
                    .as_str()
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| VaultError::Login("the AppRole login answered without a token".into()))?;
                let ttl = auth["lease_duration"].as_i64().unwrap_or(0);
                let renewable = auth["renewable"].as_bool().unwrap_or(false);
                tracing::info!(vault.mount = %mount, ttl, "logged in to Vault with AppRole");
                Ok(Session { token: token.to_owned().into(), renew_at: renew_at(now, ttl, renewable) })
            }
        }
    }

    fn limits(&self) -> Option<VaultPolicyLimits> {
        self.limits.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn mint_token(
        &self,
        req: &MintRequest<'_>,
        policies: &[String],
        num_uses: Option<u32>,
    ) -> Result<Minted, VaultError> {
        if let Some(limits) = self.limits()
            && let Some(p) = policies.iter().find(|p| !limits.permits(p))
        {
            return Err(VaultError::Refused(format!(
                "policy {p:?} is not allowed by token role {} (allowed: {})",
                self.token_role,
                limits.describe()
            )));
        }
        let ttl = (req.expires_at - req.now).num_seconds().max(1);
        let mut body = json!({
            "policies": policies,
            // Exactly the policies the grant names: `default` only when it names it.
            "no_default_policy": true,
            "ttl": format!("{ttl}s"),
            "explicit_max_ttl": format!("{ttl}s"),
            "renewable": false,
            "display_name": format!("latchkey-{}", req.capability),
            // How the reconciler finds a token whose accessor was never recorded.
            "meta": {
                "agent": req.agent,
                "capability": req.capability,
                "repository": req.claims.repository.as_deref().unwrap_or_default(),
                "credential_id": req.credential_id.to_string(),
            },
        });
        if let Some(n) = num_uses {
            body["num_uses"] = json!(n);
        }
        let path = format!("auth/token/create/{}", self.token_role);
        let answer = self.request(Method::POST, &path, Some(&body)).await?;
        let auth = &answer["auth"];
        let bad = |what: &str| VaultError::BadAnswer(path.clone(), format!("no {what}"));
        let token = auth["client_token"].as_str().filter(|t| !t.is_empty()).ok_or_else(|| bad("client_token"))?;
        let accessor = auth["accessor"].as_str().filter(|a| !a.is_empty()).ok_or_else(|| bad("accessor"))?;
        let granted = auth.get("token_policies").or_else(|| auth.get("policies")).cloned().unwrap_or(json!(policies));
        let lease = auth["lease_duration"].as_i64().unwrap_or(ttl);
        // The role's token_explicit_max_ttl may cut the token short: report when it really ends.
        let expires_at = req.expires_at.min(req.now + chrono::Duration::seconds(lease.max(1)));
        let mut secret = Map::new();
        secret.insert("token".into(), json!(token));
        secret.insert("accessor".into(), json!(accessor));
        secret.insert("policies".into(), granted);
        Ok(Minted {
            secret: SecretFields(secret),
            access_token: token.to_owned().into(),
            issued_token_type: TOKEN_TYPE,
            token_type: "Bearer",
            handle: Some(secrecy::SecretBox::new(Box::new(format!("{TOKEN_HANDLE}{accessor}").into_bytes()))),
            fingerprint: fingerprint(token.as_bytes()),
            expires_at,
        })
    }

    async fn mint_secret(
        &self,
        req: &MintRequest<'_>,
        path: &str,
        method: VaultMethod,
        params: &Map<String, Value>,
        revocable: bool,
    ) -> Result<Minted, VaultError> {
        let path = path.trim_matches('/');
        let answer = match method {
            VaultMethod::Read => self.request(Method::GET, path, None).await?,
            VaultMethod::Write => self.request(Method::POST, path, Some(&Value::Object(params.clone()))).await?,
        };
        let lease_id = answer["lease_id"].as_str().unwrap_or_default().to_owned();
        let lease_duration = answer["lease_duration"].as_i64().unwrap_or(0);
        if lease_id.is_empty() && revocable {
            // Whatever Vault made stays with Vault: it never reaches the caller.
            return Err(VaultError::Refused(format!(
                "{path} answered without a lease, which latchkey could not revoke; refused (a grant for a secret \
                 without a lease needs revocable = false)"
            )));
        }
        let data = answer.get("data").cloned().unwrap_or(Value::Null);
        let expires_at = if lease_duration > 0 {
            req.expires_at.min(req.now + chrono::Duration::seconds(lease_duration))
        } else {
            req.expires_at
        };
        let fp = if lease_id.is_empty() {
            // Nothing to revoke and no lease id: the fingerprint identifies the data itself.
            fingerprint(data.to_string().as_bytes())
        } else {
            fingerprint(lease_id.as_bytes())
        };
        let mut secret = Map::new();
        secret.insert("lease_id".into(), json!(lease_id));
        secret.insert("lease_duration".into(), json!(lease_duration));
        secret.insert("renewable".into(), json!(answer["renewable"].as_bool().unwrap_or(false)));
        secret.insert("data".into(), data);
        let handle = (!lease_id.is_empty())
            .then(|| secrecy::SecretBox::new(Box::new(format!("{LEASE_HANDLE}{lease_id}").into_bytes())));
        Ok(Minted {
            secret: SecretFields(secret),
            access_token: lease_id.into(),
            issued_token_type: SECRET_TYPE,
            token_type: "N_A",
            handle,
            fingerprint: fp,
            expires_at,
        })
    }

    async fn revoke_accessor(&self, accessor: &str) -> Result<(), VaultError> {
        let body = json!({ "accessor": accessor });
        match self.request(Method::POST, "auth/token/revoke-accessor", Some(&body)).await {
            Ok(_) => Ok(()),
            // Expired or already revoked: Vault no longer knows the accessor ("invalid accessor"),
            // or knows it but not its token, which another revocation is removing ("token not
            // found": an earlier request that timed out on our side, answered late).
            Err(VaultError::Status { status: StatusCode::BAD_REQUEST, errors, .. })
                if errors.contains("invalid accessor") || errors.contains("token not found") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, lease_id: &str) -> Result<(), VaultError> {
        let body = json!({ "lease_id": lease_id });
        match self.request(Method::PUT, "sys/leases/revoke", Some(&body)).await {
            Ok(_) => Ok(()),
            Err(VaultError::Status { status: StatusCode::BAD_REQUEST, errors, .. })
                if errors.contains("invalid lease") || errors.contains("not found") =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The reconciler's path: a token minted for `credential_id` whose accessor was never
    /// recorded (a crash between mint and record). Found by its `meta.credential_id`.
    async fn find_token(&self, credential_id: &str) -> Result<Option<String>, VaultError> {
        let list = Method::from_bytes(b"LIST").expect("LIST is a valid method");
        let answer = self.request(list, "auth/token/accessors", None).await?;
        let accessors: Vec<&str> =
            answer["data"]["keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        for accessor in accessors {
            let body = json!({ "accessor": accessor });
            match self.request(Method::POST, "auth/token/lookup-accessor", Some(&body)).await {
                Ok(found) if found["data"]["meta"]["credential_id"] == credential_id => {
                    return Ok(Some(accessor.to_owned()));
                }
                Ok(_) => {}
                // Expired between the listing and the lookup.
                Err(VaultError::Status { status: StatusCode::BAD_REQUEST, .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}

/// Half-way through the TTL; never for a token without a TTL or one that cannot be renewed.
fn renew_at(now: DateTime<Utc>, ttl: i64, renewable: bool) -> Option<DateTime<Utc>> {
    (renewable && ttl > 0).then(|| now + chrono::Duration::seconds(ttl / 2))
}

fn read_secret_file(path: &std::path::Path) -> Result<SecretString, VaultError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VaultError::Config(format!("cannot read {}: {e}", path.display())))?;
    let text = text.trim();
    if text.is_empty() {
        return Err(VaultError::Config(format!("{} is empty", path.display())));
    }
    Ok(text.to_owned().into())
}

#[async_trait]
impl Backend for VaultBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Vault
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, BackendError> {
        let GrantSpec::Vault(grant) = &req.grant.spec else {
            return Err(BackendError::Refused { backend: BackendKind::Vault, message: "not a vault grant".into() });
        };
        let minted = match grant {
            VaultGrant::Token { policies, num_uses } => self.0.mint_token(&req, policies, *num_uses).await,
            VaultGrant::Secret { path, method, params, revocable } => {
                self.0.mint_secret(&req, path, *method, params, *revocable).await
            }
        };
        minted.map_err(VaultError::into_backend)
    }

    async fn revoke(&self, credential: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError> {
        let result = match handle {
            Some(raw) => {
                let text = std::str::from_utf8(raw).map_err(|_| BackendError::BadHandle {
                    backend: BackendKind::Vault,
                    message: "not UTF-8".into(),
                })?;
                if let Some(accessor) = text.strip_prefix(TOKEN_HANDLE) {
                    self.0.revoke_accessor(accessor).await
                } else if let Some(lease) = text.strip_prefix(LEASE_HANDLE) {
                    self.0.revoke_lease(lease).await
                } else {
                    return Err(BackendError::BadHandle {
                        backend: BackendKind::Vault,
                        message: "neither a token accessor nor a lease id".into(),
                    });
                }
            }
            // Only a token can be found again; a lease carries no metadata of ours.
            None => match self.0.find_token(&credential.id.to_string()).await {
                Ok(Some(accessor)) => {
                    tracing::warn!(credential_id = %credential.id, "revoking a Vault token that was never recorded");
                    self.0.revoke_accessor(&accessor).await
                }
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            },
        };
        result.map_err(VaultError::into_backend)
    }

    fn spawn_maintenance(&self) {
        let inner = self.0.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = inner.token().await {
                    tracing::warn!(error = %e, "could not keep the broker's Vault token alive");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::ManualClock;

    fn config(dir: &std::path::Path) -> VaultConfig {
        std::fs::write(dir.join("vault-token"), "s.brokersupersecret\n").unwrap();
        VaultConfig {
            address: "http://127.0.0.1:1/".into(),
            ca_file: None,
            namespace: Some("team".into()),
            token_role: "latchkey".into(),
            token_file: Some("vault-token".into()),
            approle: None,
        }
    }

    fn backend(dir: &std::path::Path) -> VaultBackend {
        VaultBackend::new(&config(dir), |p| dir.join(p), Duration::from_millis(500), ManualClock::new(Utc::now()))
            .unwrap()
    }

    #[tokio::test]
    async fn debug_output_never_shows_the_broker_token() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        *b.0.session.lock().await = Some(Session { token: "s.brokersupersecret".to_owned().into(), renew_at: None });
        let debug = format!("{b:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert!(debug.contains("latchkey") && debug.contains("127.0.0.1"), "{debug}");
        assert_eq!(b.0.address, "http://127.0.0.1:1", "the trailing slash is dropped");
    }

    #[tokio::test]
    async fn an_unreachable_vault_is_unavailable_and_the_error_holds_no_token() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        let err = b.ensure_session().await.unwrap_err();
        let mapped = err.into_backend();
        assert!(matches!(mapped, BackendError::Unavailable { .. }), "{mapped:?}");
        assert!(!mapped.to_string().contains("supersecret"), "{mapped}");
    }

    #[test]
    fn a_missing_secret_file_fails_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.token_file = Some("missing".into());
        let err = VaultBackend::new(&c, |p| dir.path().join(p), Duration::from_secs(1), ManualClock::new(Utc::now()))
            .unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn ca_file_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(dir.path());
        c.ca_file = Some("ca.pem".into());
        let build = |c: &VaultConfig| {
            VaultBackend::new(c, |p| dir.path().join(p), Duration::from_secs(1), ManualClock::new(Utc::now()))
        };
        assert!(build(&c).unwrap_err().to_string().contains("cannot read ca_file"));
        std::fs::write(dir.path().join("ca.pem"), "not a certificate").unwrap();
        assert!(build(&c).is_err());
        let made = std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
            .args(["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=vault.test"])
            .current_dir(dir.path())
            .output()
            .expect("openssl makes the test CA");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
        build(&c).expect("a PEM certificate is accepted as the only root");
    }

    #[test]
    fn refusals_and_outages_map_to_their_backend_errors() {
        let status = |s: u16| VaultError::Status {
            method: Method::POST,
            path: "auth/token/create/latchkey".into(),
            status: StatusCode::from_u16(s).unwrap(),
            errors: "x".into(),
        };
        assert!(matches!(status(503).into_backend(), BackendError::Unavailable { .. }));
        assert!(matches!(status(429).into_backend(), BackendError::Unavailable { .. }));
        assert!(matches!(status(403).into_backend(), BackendError::Refused { .. }));
        assert!(matches!(status(400).into_backend(), BackendError::Refused { .. }));
    }

    #[test]
    fn renewal_is_due_half_way_and_never_for_tokens_without_a_ttl() {
        let now = Utc::now();
        assert_eq!(renew_at(now, 3600, true), Some(now + chrono::Duration::seconds(1800)));
        assert_eq!(renew_at(now, 0, true), None, "a root-like token never expires");
        assert_eq!(renew_at(now, 3600, false), None);
    }

    #[tokio::test]
    async fn a_handle_of_another_kind_is_a_bad_handle() {
        let dir = tempfile::tempdir().unwrap();
        let b = backend(dir.path());
        let now = Utc::now();
        let row = CredentialRow {
            id: uuid::Uuid::now_v7(),
            exchange_id: uuid::Uuid::now_v7(),
            name: "vault".into(),
            backend: BackendKind::Vault,
            state: crate::ledger::CredentialState::Active,
            agent: "a".into(),
            capability: "c".into(),
            issuer: "i".into(),
            subject: "s".into(),
            repository: None,
            workflow: None,
            created_at: now,
            expires_at: now,
            fingerprint: None,
            handle: None,
            revoke_requested: false,
            revoked_at: None,
        };
        let err = b.revoke(&row, Some(b"secret:whatever")).await.unwrap_err();
        assert!(matches!(err, BackendError::BadHandle { .. }), "{err:?}");
    }
}
