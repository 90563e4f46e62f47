//! `latchkey.toml`: the typed configuration.
//!
//! Every table uses `deny_unknown_fields`, so that a misspelt key is a load error rather than a
//! silently ignored setting. Secrets are never inline: they are read from files (or the
//! environment) and held as [`SecretString`] so that they cannot reach `Debug` output.
//!
//! Loading order: the TOML file, then `LATCHKEY_*` environment overrides for the scalar
//! settings an operator commonly changes per deployment (see [`Config::apply_env`]).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors found while reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub sealing: SealingConfig,
    #[serde(default)]
    pub policies: PoliciesConfig,
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    #[serde(default)]
    pub backends: BackendsConfig,
    #[serde(default, rename = "admin_key")]
    pub admin_keys: Vec<AdminKeyConfig>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// An optional corporate identity provider whose tokens are admin credentials too.
    pub admin_oidc: Option<AdminOidcConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Set by `latchkey dev` only: the built-in development issuer. Not accepted from a file.
    #[serde(skip)]
    pub dev_mode: bool,
    /// Directory the config file lives in; relative paths in it resolve against this.
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was loaded from (`None` for `latchkey dev`): SIGHUP re-reads its admin keys.
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// `/metrics`, `/healthz`, `/readyz`; when unset they are served on `listen`.
    pub admin_listen: Option<SocketAddr>,
    /// Required in every subject token's `aud`.
    pub audience: String,
    /// Public URL of this broker; the `iss` of latchkey-signed JWTs. Defaults to `audience`.
    pub public_url: Option<String>,
    /// A client that has not sent a whole request head within this time is disconnected, so
    /// that slow clients (slow-loris) cannot hold connections open.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde_compat")]
    pub header_read_timeout: Duration,
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `sqlite://PATH` (one node) or `postgres://…` (several replicas). A PostgreSQL URL can
    /// hold a password: prefer `LATCHKEY_STORE_URL` from a secret to writing it here.
    pub url: String,
    /// PostgreSQL: connections in each replica's pool, beside its writer's own connection.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// PostgreSQL: a statement running longer is cancelled (the exchange answers 503), and so
    /// is a transaction left idle that long.
    #[serde(default = "default_statement_timeout", with = "humantime_serde_compat")]
    pub statement_timeout: Duration,
    /// PostgreSQL: how long to wait for a connection, new or from the pool; while the store is
    /// down, exchanges and `/readyz` answer 503 after this long.
    #[serde(default = "default_connect_timeout", with = "humantime_serde_compat")]
    pub connect_timeout: Duration,
}

fn default_max_connections() -> u32 {
    10
}

fn default_statement_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://latchkey.db".into(),
            max_connections: default_max_connections(),
            statement_timeout: default_statement_timeout(),
            connect_timeout: default_connect_timeout(),
        }
    }
}

/// The URL can carry the database password: `Debug` (panics, error chains, a config printed
/// while debugging) shows it masked.
impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let url = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("REDACTED"));
                u.to_string()
            }
            Ok(_) => self.url.clone(),
            // Not a URL: nothing can be told apart from a password, so nothing is shown.
            Err(_) => "(unparsable)".to_owned(),
        };
        f.debug_struct("StoreConfig")
            .field("url", &url)
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl StoreConfig {
    /// What the PostgreSQL store takes from this table.
    pub fn postgres(&self) -> crate::ledger::postgres::Settings {
        crate::ledger::postgres::Settings {
            max_connections: self.max_connections,
            statement_timeout: self.statement_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SealingConfig {
    pub key_file: PathBuf,
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
}

impl Default for SealingConfig {
    fn default() -> Self {
        Self { key_file: "latchkey.key".into(), previous_key_files: Vec::new() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoliciesConfig {
    pub dir: PathBuf,
    /// How often the policy directory is checked for changes. SIGHUP reloads at once.
    #[serde(default = "default_reload_interval", with = "humantime_serde_compat")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(2)
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        Self { dir: "policies".into(), reload_interval: default_reload_interval() }
    }
}

/// The kind of an issuer decides how the canonical `repository` and `workflow` fields are
/// derived from its claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum IssuerKind {
    /// GitHub Actions (github.com or GitHub Enterprise Server).
    Github,
    /// GitLab CI (gitlab.com or self-managed).
    Gitlab,
    /// Any other OIDC issuer (CircleCI, Buildkite, ...): no canonical mapping beyond `sub`.
    Generic,
}

/// One trusted OIDC issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    pub id: String,
    pub kind: IssuerKind,
    /// Compared as an exact string with the token's `iss` and the discovered `issuer`.
    pub url: String,
    /// Allowed signing algorithms; defaults to RS256 only.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Tokens whose `iat` is older than this are refused.
    #[serde(default, with = "humantime_serde_compat::option")]
    pub max_token_age: Option<Duration>,
    /// A `jti` is required and may be exchanged once per capability.
    #[serde(default = "default_true")]
    pub single_use: bool,
    /// Claims every token of this issuer must carry, with one of the listed values, before any
    /// policy is looked at.
    #[serde(default)]
    pub required_claims: BTreeMap<String, Vec<String>>,
    /// Overrides the discovered `jwks_uri`; otherwise it must be on the issuer's host.
    pub jwks_uri: Option<String>,
    /// The audience tokens of this issuer must carry; defaults to `server.audience`.
    pub audience: Option<String>,
    /// Canonical-field overrides for `generic` issuers, e.g. `repository_claim = "project"`.
    pub repository_claim: Option<String>,
    pub workflow_claim: Option<String>,
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into()]
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendsConfig {
    #[serde(default)]
    pub github: Vec<GithubAppConfig>,
    pub aws: Option<AwsConfig>,
    pub vault: Option<VaultConfig>,
    #[serde(default)]
    pub jwt: JwtBackendConfig,
}

/// `[backends.aws]`. The broker's own credentials come from the standard AWS chain
/// (environment, profile, web identity/IRSA, instance metadata), never from this file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsConfig {
    pub region: String,
    /// Another STS/IAM endpoint (a VPC endpoint, or a local emulator in tests).
    pub endpoint_url: Option<String>,
    /// When set, every `role_arn` in the policies must live under this IAM path (`/latchkey/`):
    /// the path the broker's own IAM permissions are limited to.
    pub role_path: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GithubAppConfig {
    pub id: String,
    pub app_id: u64,
    /// The app's private key (PEM): it signs the app JWT.
    pub private_key_file: PathBuf,
    /// Keys of the same app still accepted during a key rotation: when GitHub refuses the app
    /// JWT signed with `private_key_file` (401), each of these is tried in turn.
    #[serde(default)]
    pub previous_private_key_files: Vec<PathBuf>,
    #[serde(default = "default_github_api")]
    pub api_url: String,
}

fn default_github_api() -> String {
    "https://api.github.com".into()
}

/// `[backends.vault]`: one Vault or OpenBao server (or cluster address).
///
/// The broker authenticates with exactly one of `token_file` (a periodic token) or `[approle]`;
/// `validate` refuses both or neither. Neither secret is inline: both are read from files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// `https://vault.example.com:8200`; plain http only for loopback addresses.
    pub address: String,
    /// A PEM bundle: when set, the only roots trusted for `address`.
    pub ca_file: Option<PathBuf>,
    /// Vault Enterprise / OpenBao namespace, sent as `X-Vault-Namespace` on every call.
    pub namespace: Option<String>,
    /// Every token grant is minted through `auth/token/create/<token_role>`.
    pub token_role: String,
    /// A file holding the broker's own (periodic) token.
    pub token_file: Option<PathBuf>,
    /// AppRole login for the broker, instead of `token_file`.
    pub approle: Option<VaultAppRoleConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultAppRoleConfig {
    pub role_id: String,
    /// A file holding the secret id.
    pub secret_id_file: PathBuf,
    /// Where the AppRole auth method is mounted.
    #[serde(default = "default_approle_mount")]
    pub mount: String,
}

fn default_approle_mount() -> String {
    "approle".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtBackendConfig {
    /// Whether policies may use `backend = "jwt"`.
    #[serde(default = "default_true")]
    pub enabled: bool,
}

impl Default for JwtBackendConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Roles are ordered: each includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Service,
    Auditor,
    Security,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Service => "service",
            Role::Auditor => "auditor",
            Role::Security => "security",
            Role::Admin => "admin",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminKeyConfig {
    pub name: String,
    pub role: Role,
    /// Lowercase hex SHA-256 of the key. The key itself is never stored.
    pub sha256: String,
}

/// `[admin_oidc]`: people sign in to the admin API with their corporate IdP's ID tokens, beside
/// the admin keys. The token's groups claim maps to a role; a token none of whose groups is
/// mapped gets nothing. Verified like any issuer: keys only from its discovery/JWKS, the
/// algorithm allow-list, `aud`, `exp`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminOidcConfig {
    /// The IdP's issuer URL, compared exactly with `iss` and the discovered `issuer`.
    pub issuer: String,
    /// Required in the token's `aud` (the client id latchkey is registered as).
    pub audience: String,
    /// The claim holding the user's groups (a list of strings, or one string).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Group → role, e.g. `{ "sec-oncall" = "security", "auditors" = "auditor" }`; the highest
    /// role of the user's mapped groups applies.
    pub roles: BTreeMap<String, Role>,
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    pub jwks_uri: Option<String>,
}

fn default_groups_claim() -> String {
    "groups".into()
}

impl AdminOidcConfig {
    /// As an issuer of the OIDC verifier: never single-use (a person reuses a token until it
    /// expires), no canonical repository mapping.
    pub fn issuer_config(&self) -> IssuerConfig {
        IssuerConfig {
            id: "admin-oidc".into(),
            kind: IssuerKind::Generic,
            url: self.issuer.clone(),
            algorithms: self.algorithms.clone(),
            max_token_age: None,
            single_use: false,
            required_claims: BTreeMap::new(),
            jwks_uri: self.jwks_uri.clone(),
            audience: Some(self.audience.clone()),
            repository_claim: None,
            workflow_claim: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `"stdout"`, or a file path that JSON lines are appended to (reopened when rotated).
    pub stream: Option<String>,
    /// The Ed25519 key (PKCS#8 PEM) that signs checkpoints of the audit chain. Kept outside the
    /// database, so that whoever can write the store cannot forge a checkpoint. Made by
    /// `latchkey init` and `latchkey dev`; without it no checkpoints are taken.
    pub checkpoint_key_file: Option<PathBuf>,
    /// How often a checkpoint of the chain head is signed (when anything was appended since).
    #[serde(default = "default_checkpoint_interval", with = "humantime_serde_compat")]
    pub checkpoint_interval: Duration,
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(300)
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { stream: None, checkpoint_key_file: None, checkpoint_interval: default_checkpoint_interval() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Concurrent revocation jobs per backend: a backend that is slow or down holds up only its
    /// own revocations.
    #[serde(default = "default_job_concurrency")]
    pub job_concurrency: usize,
    /// Exchanges per source address (`"600/minute"`), counted by each replica in memory; none
    /// by default.
    #[serde(default, deserialize_with = "rate_opt")]
    pub per_ip: Option<crate::policy::Rate>,
    /// How many of `per_ip` may come at once (default: all of it).
    pub per_ip_burst: Option<u32>,
    /// Mint calls in flight per backend; an exchange waits for a place up to `outbound_timeout`,
    /// then answers 503.
    #[serde(default = "default_backend_concurrency")]
    pub backend_concurrency: usize,
    /// Timeout of every outbound call (issuer discovery, JWKS, backends).
    #[serde(default = "default_outbound_timeout", with = "humantime_serde_compat")]
    pub outbound_timeout: Duration,
}

fn default_job_concurrency() -> usize {
    16
}

fn default_backend_concurrency() -> usize {
    64
}

fn rate_opt<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<crate::policy::Rate>, D::Error> {
    let text = String::deserialize(d)?;
    crate::policy::Rate::parse(&text).map(Some).map_err(serde::de::Error::custom)
}

fn default_outbound_timeout() -> Duration {
    Duration::from_secs(10)
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            job_concurrency: default_job_concurrency(),
            per_ip: None,
            per_ip_burst: None,
            backend_concurrency: default_backend_concurrency(),
            outbound_timeout: default_outbound_timeout(),
        }
    }
}

impl Config {
    /// Reads, parses, applies `LATCHKEY_*` overrides and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Self::parse(&text, path)?;
        config.base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        config.path = Some(path.to_owned());
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate()?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// `LATCHKEY_LISTEN`, `LATCHKEY_ADMIN_LISTEN`, `LATCHKEY_STORE_URL`, `LATCHKEY_AUDIENCE`,
    /// `LATCHKEY_SEALING_KEY_FILE`, `LATCHKEY_POLICIES_DIR`, `LATCHKEY_AUDIT_STREAM`.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let bad = |name: &str, e: &dyn std::fmt::Display| ConfigError::Invalid(format!("{name}: {e}"));
        if let Some(v) = var("LATCHKEY_LISTEN") {
            self.server.listen = v.parse().map_err(|e| bad("LATCHKEY_LISTEN", &e))?;
        }
        if let Some(v) = var("LATCHKEY_ADMIN_LISTEN") {
            self.server.admin_listen = Some(v.parse().map_err(|e| bad("LATCHKEY_ADMIN_LISTEN", &e))?);
        }
        if let Some(v) = var("LATCHKEY_STORE_URL") {
            self.store.url = v;
        }
        if let Some(v) = var("LATCHKEY_AUDIENCE") {
            self.server.audience = v;
        }
        if let Some(v) = var("LATCHKEY_SEALING_KEY_FILE") {
            self.sealing.key_file = v.into();
        }
        if let Some(v) = var("LATCHKEY_POLICIES_DIR") {
            self.policies.dir = v.into();
        }
        if let Some(v) = var("LATCHKEY_AUDIT_STREAM") {
            self.audit.stream = Some(v);
        }
        Ok(())
    }

    /// Checks what serde cannot: uniqueness, URL schemes, algorithm names, key formats.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.server.audience.trim().is_empty() {
            return invalid("server.audience must not be empty".into());
        }
        if self.limits.per_ip_burst == Some(0) || self.limits.backend_concurrency == 0 {
            return invalid("limits.per_ip_burst and limits.backend_concurrency must be at least 1".into());
        }
        if self.limits.per_ip_burst.is_some() && self.limits.per_ip.is_none() {
            return invalid("limits.per_ip_burst needs limits.per_ip".into());
        }
        if self.server.header_read_timeout.is_zero() {
            return invalid("server.header_read_timeout must be more than zero".into());
        }
        if self.server.tls_cert_file.is_some() != self.server.tls_key_file.is_some() {
            return invalid("server.tls_cert_file and server.tls_key_file go together".into());
        }
        let mut ids = std::collections::HashSet::new();
        for issuer in &self.issuers {
            if !ids.insert(issuer.id.as_str()) {
                return invalid(format!("issuer id {:?} is configured twice", issuer.id));
            }
            check_issuer_url(&issuer.url).map_err(|m| ConfigError::Invalid(format!("issuer {}: {m}", issuer.id)))?;
            if let Some(jwks) = &issuer.jwks_uri {
                check_issuer_url(jwks)
                    .map_err(|m| ConfigError::Invalid(format!("issuer {} jwks_uri: {m}", issuer.id)))?;
            }
            if issuer.algorithms.is_empty() {
                return invalid(format!("issuer {}: algorithms must not be empty", issuer.id));
            }
            for alg in &issuer.algorithms {
                if !ALLOWED_ALGORITHMS.contains(&alg.as_str()) {
                    return invalid(format!(
                        "issuer {}: algorithm {alg:?} is not allowed (allowed: {})",
                        issuer.id,
                        ALLOWED_ALGORITHMS.join(", ")
                    ));
                }
            }
        }
        let mut names = std::collections::HashSet::new();
        for key in &self.admin_keys {
            if !names.insert(key.name.as_str()) {
                return invalid(format!("admin_key name {:?} is configured twice", key.name));
            }
            if key.sha256.len() != 64 || !key.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                return invalid(format!("admin_key {}: sha256 must be 64 lowercase hex digits", key.name));
            }
        }
        if let Some(aws) = &self.backends.aws {
            if aws.region.is_empty() {
                return invalid("backends.aws: region must not be empty".into());
            }
            if let Some(url) = &aws.endpoint_url
                && let Err(e) = check_issuer_url(url)
            {
                return invalid(format!("backends.aws: endpoint_url {e}"));
            }
            if let Some(path) = &aws.role_path
                && (!path.starts_with('/') || !path.ends_with('/'))
            {
                return invalid(format!("backends.aws: role_path {path:?} must start and end with /"));
            }
        }
        let mut apps = std::collections::HashSet::new();
        for app in &self.backends.github {
            if !apps.insert(app.id.as_str()) {
                return invalid(format!("backends.github id {:?} is configured twice", app.id));
            }
            // The app JWT and installation tokens travel to this URL.
            if let Err(e) = check_issuer_url(&app.api_url) {
                return invalid(format!("backends.github {}: api_url {e}", app.id));
            }
        }
        if let Some(admin) = &self.admin_oidc {
            let bad = |m: String| ConfigError::Invalid(format!("admin_oidc: {m}"));
            check_issuer_url(&admin.issuer).map_err(|m| bad(format!("issuer {m}")))?;
            if let Some(jwks) = &admin.jwks_uri {
                check_issuer_url(jwks).map_err(|m| bad(format!("jwks_uri {m}")))?;
            }
            if admin.audience.trim().is_empty() {
                return Err(bad("audience must not be empty".into()));
            }
            if admin.roles.is_empty() {
                return Err(bad("roles must map at least one group to a role".into()));
            }
            if admin.algorithms.is_empty() || admin.algorithms.iter().any(|a| !ALLOWED_ALGORITHMS.contains(&a.as_str()))
            {
                return Err(bad(format!("algorithms must be among {}", ALLOWED_ALGORITHMS.join(", "))));
            }
        }
        if self.audit.checkpoint_interval < Duration::from_secs(1) {
            return invalid("audit.checkpoint_interval must be at least 1s".into());
        }
        if let Some(vault) = &self.backends.vault {
            vault.validate().map_err(|m| ConfigError::Invalid(format!("backends.vault: {m}")))?;
        }
        Ok(())
    }

    /// Resolves a path from the config file against the file's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() { path.to_owned() } else { self.base_dir.join(path) }
    }

    /// The `iss` of latchkey-signed JWTs.
    pub fn public_url(&self) -> &str {
        self.server.public_url.as_deref().unwrap_or(&self.server.audience)
    }
}

impl VaultConfig {
    fn validate(&self) -> Result<(), String> {
        // The broker's own token travels with every call: the same rule as for issuer URLs.
        check_issuer_url(&self.address).map_err(|m| format!("address {m}"))?;
        if self.token_role.is_empty() || self.token_role.contains(['/', '?', '#']) || self.token_role.contains("..") {
            return Err(format!("token_role {:?} is not a role name", self.token_role));
        }
        match (&self.token_file, &self.approle) {
            (Some(_), Some(_)) => return Err("give token_file or [backends.vault.approle], not both".into()),
            (None, None) => return Err("token_file or [backends.vault.approle] is required".into()),
            _ => {}
        }
        if let Some(approle) = &self.approle {
            if approle.role_id.trim().is_empty() {
                return Err("approle.role_id must not be empty".into());
            }
            let mount = approle.mount.trim_matches('/');
            if mount.is_empty() || mount.contains(['?', '#']) || mount.contains("..") {
                return Err(format!("approle.mount {:?} is not a mount path", approle.mount));
            }
        }
        if let Some(ns) = &self.namespace
            && ns.trim().is_empty()
        {
            return Err("namespace must not be empty when given".into());
        }
        Ok(())
    }
}

/// Asymmetric algorithms only: `none` and every HMAC algorithm are refused by construction.
pub const ALLOWED_ALGORITHMS: &[&str] =
    &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

/// Issuer and JWKS URLs are https; plain http only for loopback addresses (tests, `dev`).
pub fn check_issuer_url(raw: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback_host(&url) => Ok(url),
        "http" => Err(format!("{raw:?} must use https (http is allowed only for loopback addresses)")),
        other => Err(format!("{raw:?}: scheme {other:?} is not allowed")),
    }
}

fn is_loopback_host(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d == "localhost",
        None => false,
    }
}

/// Parses durations such as `"15m"`, `"1h30m"`, `"90s"`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

/// Serde helpers for humantime durations (`"10m"`).
pub mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_duration(&s).map_err(serde::de::Error::custom)
    }

    pub mod option {
        use super::*;

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            let s: Option<String> = Option::deserialize(d)?;
            s.map(|s| super::super::parse_duration(&s).map_err(serde::de::Error::custom)).transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:8443"
audience = "https://latchkey.example.com"

[[issuer]]
id = "github-actions"
kind = "github"
url = "https://token.actions.githubusercontent.com"
max_token_age = "10m"
required_claims = { repository_owner_id = ["1234567"] }
"#;

    #[test]
    fn parses_a_minimal_config_with_defaults() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        c.validate().unwrap();
        assert_eq!(c.store.url, "sqlite://latchkey.db");
        assert!(c.issuers[0].single_use);
        assert_eq!(c.issuers[0].algorithms, ["RS256"]);
        assert_eq!(c.issuers[0].max_token_age, Some(Duration::from_secs(600)));
    }

    #[test]
    fn header_read_timeout_defaults_to_ten_seconds_and_must_be_positive() {
        let c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(10));
        let text = MINIMAL.replace("audience =", "header_read_timeout = \"2s\"\naudience =");
        let c = Config::parse(&text, Path::new("x.toml")).unwrap();
        assert_eq!(c.server.header_read_timeout, Duration::from_secs(2));
        let text = MINIMAL.replace("audience =", "header_read_timeout = \"0s\"\naudience =");
        let err = Config::parse(&text, Path::new("x.toml")).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("header_read_timeout"), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let text = MINIMAL.replace("audience =", "audiance = \"x\"\naudience =");
        let err = Config::parse(&text, Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("audiance"), "{err}");
    }

    #[test]
    fn hmac_and_none_are_refused() {
        for alg in ["HS256", "none"] {
            let text = MINIMAL.replace("max_token_age", &format!("algorithms = [\"{alg}\"]\nmax_token_age"));
            let c = Config::parse(&text, Path::new("x.toml")).unwrap();
            assert!(c.validate().is_err(), "{alg} accepted");
        }
    }

    #[test]
    fn http_issuers_only_on_loopback() {
        assert!(check_issuer_url("http://127.0.0.1:8080").is_ok());
        assert!(check_issuer_url("http://localhost:8080/x").is_ok());
        assert!(check_issuer_url("http://example.com").is_err());
        assert!(check_issuer_url("file:///etc/passwd").is_err());
        assert!(check_issuer_url("https://example.com").is_ok());
    }

    const VAULT: &str = r#"
[backends.vault]
address = "https://vault.example.com:8200"
token_role = "latchkey"
"#;

    #[test]
    fn vault_needs_exactly_one_login() {
        let check = |extra: &str| {
            let c = Config::parse(&format!("{MINIMAL}{VAULT}{extra}"), Path::new("x.toml")).unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        assert!(check("").unwrap_err().contains("required"));
        check("token_file = \"vault-token\"\n").unwrap();
        let approle = "[backends.vault.approle]\nrole_id = \"r\"\nsecret_id_file = \"s\"\n";
        check(approle).unwrap();
        let both = format!("token_file = \"t\"\n{approle}");
        assert!(check(&both).unwrap_err().contains("not both"));
        let c = Config::parse(&format!("{MINIMAL}{VAULT}{approle}"), Path::new("x.toml")).unwrap();
        assert_eq!(c.backends.vault.unwrap().approle.unwrap().mount, "approle", "the default mount");
    }

    #[test]
    fn vault_address_is_https_except_loopback_and_keys_are_checked() {
        let text = format!("{MINIMAL}{VAULT}token_file = \"t\"\n").replace("https://vault", "http://vault");
        let err = Config::parse(&text, Path::new("x.toml")).unwrap().validate().unwrap_err();
        assert!(err.to_string().contains("https"), "{err}");
        let text = format!("{MINIMAL}{VAULT}token = \"inline\"\n");
        assert!(Config::parse(&text, Path::new("x.toml")).is_err(), "no inline token, no unknown key");
    }

    #[test]
    fn admin_oidc_is_checked_like_an_issuer() {
        let check = |table: &str| {
            let c = Config::parse(&format!("{MINIMAL}\n[admin_oidc]\n{table}"), Path::new("x.toml")).unwrap();
            c.validate().map_err(|e| e.to_string())
        };
        let ok = "issuer = \"https://idp.example.com\"\naudience = \"latchkey\"\nroles = { \"sec\" = \"security\" }\n";
        check(ok).unwrap();
        assert!(check(&ok.replace("https://idp", "http://idp")).unwrap_err().contains("https"));
        assert!(check(&ok.replace("{ \"sec\" = \"security\" }", "{}")).unwrap_err().contains("roles"));
        assert!(check(&format!("{ok}algorithms = [\"HS256\"]\n")).unwrap_err().contains("algorithms"));
        let c = Config::parse(&format!("{MINIMAL}\n[admin_oidc]\n{ok}"), Path::new("x.toml")).unwrap();
        let issuer = c.admin_oidc.unwrap().issuer_config();
        assert!(!issuer.single_use, "a person reuses an ID token until it expires");
        assert_eq!(issuer.audience.as_deref(), Some("latchkey"));
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::parse(MINIMAL, Path::new("x.toml")).unwrap();
        c.apply_env(|n| (n == "LATCHKEY_STORE_URL").then(|| "sqlite://other.db".to_string())).unwrap();
        assert_eq!(c.store.url, "sqlite://other.db");
    }

    #[test]
    fn a_store_password_never_shows_in_debug_output() {
        let store =
            StoreConfig { url: "postgres://latchkey:s3cr3t-pw@db.internal:5432/latchkey".into(), ..Default::default() };
        let shown = format!("{store:?}");
        assert!(!shown.contains("s3cr3t-pw"), "{shown}");
        assert!(shown.contains("postgres://latchkey:REDACTED@db.internal:5432/latchkey"), "{shown}");
        let store = StoreConfig { url: "sqlite://latchkey.db".into(), ..Default::default() };
        assert!(format!("{store:?}").contains("sqlite://latchkey.db"));
    }
}
