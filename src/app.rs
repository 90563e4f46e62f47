//! Application state shared by every request handler and background task.

use std::sync::Arc;

use chrono::{DateTime, Utc};

/// Time is an input: everything that compares times asks the clock, so that tests can fix it.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> DateTime<Utc>;
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that tests move by hand.
#[derive(Debug)]
pub struct ManualClock(std::sync::Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(at: DateTime<Utc>) -> Arc<Self> {
        Arc::new(Self(std::sync::Mutex::new(at)))
    }
    pub fn advance(&self, by: chrono::Duration) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

use std::collections::HashMap;
use std::sync::RwLock;

use crate::backend::Backend;
use crate::backend::jwt::JwtBackend;
use crate::config::{AdminKeyConfig, Config, Role};
use crate::ledger::{KillState, Ledger};
use crate::metrics::Metrics;
use crate::oidc::Verifier;
use crate::policy::{BackendKind, PolicySet};
use crate::seal::Sealer;

/// Everything a request or a background task needs. One per process, shared as [`AppState`].
#[derive(Debug)]
pub struct App {
    /// The loaded configuration.
    pub config: Config,
    /// The only source of the current time.
    pub clock: Arc<dyn Clock>,
    /// Exchanges, credentials, kill rules, jobs and the audit chain.
    pub ledger: Arc<dyn Ledger>,
    /// Subject-token verification against the configured issuers.
    pub verifier: Verifier,
    /// The policy set in force; replaced whole on reload.
    pub policies: Swap<PolicySet>,
    /// The kill rules in force, refreshed from the ledger at least every second.
    pub kills: Swap<KillSnapshot>,
    /// One backend per kind that is configured.
    pub backends: HashMap<BackendKind, Arc<dyn Backend>>,
    /// What the Vault token role allows, read from Vault at start-up; policies are checked
    /// against it when they load. `None` when unknown: then the check happens at mint.
    pub vault_policies: Option<crate::policy::VaultPolicyLimits>,
    /// The `jwt` backend, also needed for the JWKS and introspection.
    pub jwt: Arc<JwtBackend>,
    /// Seals revocation handles and signing keys.
    pub sealer: Sealer,
    /// Signs checkpoints of the audit chain; `None` when `[audit] checkpoint_key_file` is unset.
    pub checkpoint_key: Option<crate::checkpoint::CheckpointKey>,
    /// Admin keys by the SHA-256 of the key; replaced whole when SIGHUP re-reads the config.
    pub admin_keys: Swap<AdminKeys>,
    /// The admin identity provider (`[admin_oidc]`), if any; replaced on SIGHUP like the keys.
    pub admin_oidc: Swap<Option<AdminOidc>>,
    /// `[limits] per_ip`: the per-source-address limit of `/v1/token`, if configured.
    pub per_ip: Option<crate::http::ip_limit::IpLimiter>,
    /// One gate per backend: at most `[limits] backend_concurrency` mint calls in flight each,
    /// so a slow backend holds up its own exchanges, not the broker.
    pub backend_slots: HashMap<BackendKind, Arc<tokio::sync::Semaphore>>,
    /// Prometheus metrics.
    pub metrics: Metrics,
    /// Wakes the job worker before its next tick: a kill or a revocation request has just
    /// enqueued jobs that should start within milliseconds. A notification sent while the worker
    /// is busy is kept for its next wait, so none is lost.
    pub jobs_wake: tokio::sync::Notify,
}

/// The shared handle on the [`App`] that axum hands to each handler.
#[derive(Debug, Clone)]
pub struct AppState(pub Arc<App>);

impl std::ops::Deref for AppState {
    type Target = App;
    fn deref(&self) -> &App {
        &self.0
    }
}

/// A value read on every request and replaced whole now and then: readers take a cheap `Arc`.
#[derive(Debug, Default)]
pub struct Swap<T>(RwLock<Arc<T>>);

impl<T> Swap<T> {
    pub fn new(value: T) -> Self {
        Self(RwLock::new(Arc::new(value)))
    }
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// The kill rules as last read from the ledger, and when.
#[derive(Debug, Clone)]
pub struct KillSnapshot {
    pub state: KillState,
    pub loaded_at: DateTime<Utc>,
    /// When the rules were read, on the monotonic clock: how fresh they are is an operational
    /// fact about this process, not a time in the domain.
    pub refreshed: std::time::Instant,
}

impl KillSnapshot {
    pub fn new(state: KillState, loaded_at: DateTime<Utc>) -> Self {
        KillSnapshot { state, loaded_at, refreshed: std::time::Instant::now() }
    }

    pub fn age(&self) -> std::time::Duration {
        self.refreshed.elapsed()
    }
}

/// The configured admin keys. Keys are compared by their SHA-256 in constant time.
#[derive(Debug, Default)]
pub struct AdminKeys(Vec<([u8; 32], String, Role)>);

impl AdminKeys {
    pub fn new(keys: &[AdminKeyConfig]) -> Self {
        Self(
            keys.iter()
                .filter_map(|k| {
                    let digest: [u8; 32] = hex::decode(&k.sha256).ok()?.try_into().ok()?;
                    Some((digest, k.name.clone(), k.role))
                })
                .collect(),
        )
    }

    /// The name and role of the key, if it is one of ours. Every configured key is compared, in
    /// constant time, so the time taken says nothing about which one (nearly) matched.
    pub fn lookup(&self, presented: &str) -> Option<(String, Role)> {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (hash, name, role) in &self.0 {
            if bool::from(hash.ct_eq(&digest)) {
                found = Some((name.clone(), *role));
            }
        }
        found
    }
}

/// The admin identity provider: a verifier for its tokens and the group → role map.
#[derive(Debug)]
pub struct AdminOidc {
    pub config: crate::config::AdminOidcConfig,
    verifier: Verifier,
}

impl AdminOidc {
    pub fn new(
        config: &crate::config::AdminOidcConfig,
        outbound_timeout: std::time::Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, crate::oidc::OidcError> {
        let verifier = Verifier::new(&[config.issuer_config()], &config.audience, outbound_timeout, clock)?;
        Ok(AdminOidc { config: config.clone(), verifier })
    }

    /// Whether `presented` looks like a JWT rather than an admin key.
    pub fn looks_like_token(presented: &str) -> bool {
        presented.split('.').count() == 3
    }

    /// The user (`oidc:<sub>`) and the highest role their groups map to. `Err` with a reason when
    /// the token does not verify or maps to no role.
    pub async fn authenticate(&self, token: &str) -> Result<(String, Role), String> {
        let v = self.verifier.verify(token).await.map_err(|e| format!("admin token rejected: {e}"))?;
        let claims = &v.claims().claims;
        let groups: Vec<&str> = match claims.get(&self.config.groups_claim) {
            Some(serde_json::Value::Array(a)) => a.iter().filter_map(|g| g.as_str()).collect(),
            Some(serde_json::Value::String(g)) => vec![g.as_str()],
            _ => Vec::new(),
        };
        let role = groups.iter().filter_map(|g| self.config.roles.get(*g)).max().copied();
        let user = format!("oidc:{}", v.claims().subject);
        role.map(|r| (user.clone(), r)).ok_or_else(|| format!("{user}: none of its groups maps to a role"))
    }
}

/// A new admin key: the key (shown once) and the SHA-256 the config keeps.
pub fn new_admin_key() -> (String, String) {
    use base64::Engine;
    use sha2::Digest;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).expect("the system random source works");
    let key = format!("lk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
    let hash = hex::encode(sha2::Sha256::digest(key.as_bytes()));
    (key, hash)
}
