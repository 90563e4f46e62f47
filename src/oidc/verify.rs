//! The verifier: issuers by `iss`, their key caches, and the claim checks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::discovery::{HttpKeySource, KeySource, http_client};
use super::error::OidcError;
use super::jwks::{Alg, KeyMiss, KeySet};
use super::token::{Jws, parse};
use super::{Claims, LEEWAY_SECS, MAX_JTI_CHARS, MIN_REFRESH_INTERVAL_SECS, VerifiedClaims};
use crate::app::Clock;
use crate::config::{ALLOWED_ALGORITHMS, IssuerConfig};

/// Key health of one issuer, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IssuerHealth {
    pub id: String,
    /// Published keys currently usable.
    pub keys: usize,
    pub last_refresh_ok: Option<DateTime<Utc>>,
    /// The error of the latest refresh, cleared when a refresh succeeds.
    pub last_error: Option<String>,
    /// Refresh attempts, successful or not.
    pub refreshes: u64,
    pub refresh_failures: u64,
}

#[derive(Debug, Default)]
struct Stats {
    last_ok: Option<DateTime<Utc>>,
    last_error: Option<String>,
    /// Start of the latest refresh made because of a key miss: the 30 s window. Warm-up and
    /// periodic refreshes do not count, as an operator (not a token) decides how often they run.
    last_miss_refresh: Option<DateTime<Utc>>,
    refreshes: u64,
    failures: u64,
}

/// One configured issuer and its key cache.
#[derive(Debug)]
struct Issuer {
    config: IssuerConfig,
    audience: String,
    algorithms: Vec<Alg>,
    source: Arc<dyn KeySource>,
    /// The decoded keys. Readers clone the `Arc` and drop the lock at once; a refresh swaps in a
    /// whole new set, so a set in use is never modified and a failed refresh changes nothing.
    keys: RwLock<Arc<KeySet>>,
    /// Bumped after every refresh attempt, so a waiter can tell that one finished meanwhile.
    generation: AtomicU64,
    /// Single flight: at most one refresh of this issuer runs at a time; concurrent misses wait
    /// for it instead of starting their own. It is the only lock held across an await, and only
    /// by refreshes, never by a verification that finds its key.
    refresh_lock: tokio::sync::Mutex<()>,
    stats: Mutex<Stats>,
}

impl Issuer {
    fn keys(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Fetches and installs the published keys. The caller holds `refresh_lock`. On failure the
    /// old keys stay: an issuer outage must not stop tokens signed with keys we already have.
    async fn refresh_locked(&self, clock: &dyn Clock) {
        let result = self.source.fetch().await.map(|jwks| KeySet::build(&jwks, &self.algorithms));
        let now = clock.now();
        {
            let mut stats = self.stats();
            stats.refreshes += 1;
            match result {
                Ok(set) => {
                    tracing::debug!(oidc.issuer = %self.config.id, oidc.keys = set.len(), "issuer keys refreshed");
                    // Exactly the published set: keys the issuer withdrew stop verifying now.
                    *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                    stats.last_ok = Some(now);
                    stats.last_error = None;
                }
                Err(e) => {
                    tracing::warn!(oidc.issuer = %self.config.id, error = %e, "issuer key refresh failed; keeping cached keys");
                    stats.failures += 1;
                    stats.last_error = Some(e.to_string());
                }
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// Refreshes after a key miss, unless a refresh finished since the miss was observed
    /// (`seen` generation) or another miss started one within the last 30 s (window measured on
    /// the `Clock`). However many tokens with unknown `kid`s arrive, concurrently or not, they
    /// cause at most one fetch per window: tokens decide whether a miss happens, so they must
    /// not decide how often the issuer is called.
    async fn refresh_after_miss(&self, seen: u64, clock: &dyn Clock) {
        let _flight = self.refresh_lock.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return;
        }
        let now = clock.now();
        {
            let mut stats = self.stats();
            let window = chrono::Duration::seconds(MIN_REFRESH_INTERVAL_SECS);
            if stats.last_miss_refresh.is_some_and(|last| now < last + window) {
                return;
            }
            stats.last_miss_refresh = Some(now);
        }
        self.refresh_locked(clock).await;
    }

    /// Checks the signature with the key the token names, refreshing once on a miss.
    async fn check_signature(&self, jws: &Jws<'_>, clock: &dyn Clock) -> Result<(), OidcError> {
        let verify = |keys: &KeySet| keys.verify(jws.kid.as_deref(), jws.alg, jws.signing_input, &jws.signature);
        // Read the generation before the keys: a refresh that lands in between is then seen as
        // "finished meanwhile" and not repeated.
        let seen = self.generation.load(Ordering::Acquire);
        match verify(&self.keys()) {
            Ok(()) => return Ok(()),
            Err(KeyMiss::Missing) => {}
            Err(other) => return Err(miss_error(other)),
        }
        self.refresh_after_miss(seen, clock).await;
        let keys = self.keys();
        match verify(&keys) {
            Ok(()) => Ok(()),
            Err(KeyMiss::Missing) if keys.len() == 0 && self.stats().last_error.is_some() => {
                Err(OidcError::KeysUnavailable)
            }
            Err(other) => Err(miss_error(other)),
        }
    }

    fn health(&self) -> IssuerHealth {
        let keys = self.keys().len();
        let stats = self.stats();
        IssuerHealth {
            id: self.config.id.clone(),
            keys,
            last_refresh_ok: stats.last_ok,
            last_error: stats.last_error.clone(),
            refreshes: stats.refreshes,
            refresh_failures: stats.failures,
        }
    }
}

fn miss_error(miss: KeyMiss) -> OidcError {
    match miss {
        KeyMiss::Missing => OidcError::UnknownKey,
        KeyMiss::WrongAlg => OidcError::KeyAlgorithmMismatch,
        KeyMiss::Ambiguous => OidcError::AmbiguousKey,
        KeyMiss::BadSignature => OidcError::BadSignature,
    }
}

#[derive(Debug, Clone)]
struct Inner {
    issuers: Vec<Arc<Issuer>>,
    /// Configured `url` → index in `issuers`. Exact strings: no normalisation, so that the
    /// `iss` a token carries is the `iss` an operator configured, byte for byte.
    by_url: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
    clock: Arc<dyn Clock>,
}

/// Verifies subject tokens against the configured issuers. Cheap to clone; every clone shares
/// the key caches.
#[derive(Debug, Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

impl Verifier {
    /// Builds the verifier and its own HTTP client (no redirects, connect and total timeout of
    /// `outbound_timeout`, https except on loopback). Fetches nothing yet: call
    /// [`Verifier::refresh_all`] to warm the caches.
    pub fn new(
        issuers: &[IssuerConfig],
        default_audience: &str,
        outbound_timeout: Duration,
        clock: Arc<dyn Clock>,
    ) -> Result<Verifier, OidcError> {
        let client = http_client(outbound_timeout)?;
        let mut inner = Inner { issuers: Vec::new(), by_url: HashMap::new(), by_id: HashMap::new(), clock };
        for config in issuers {
            let bad = |m: String| OidcError::Config(format!("issuer {}: {m}", config.id));
            let mut algorithms = Vec::new();
            for name in &config.algorithms {
                // Defence in depth: config validation already refuses these, but a verifier
                // built from an unvalidated config must not accept `none` or HMAC either.
                let alg = Alg::from_name(name)
                    .filter(|_| ALLOWED_ALGORITHMS.contains(&name.as_str()))
                    .ok_or_else(|| bad(format!("algorithm {name:?} is not allowed")))?;
                algorithms.push(alg);
            }
            if algorithms.is_empty() {
                return Err(bad("algorithms must not be empty".into()));
            }
            let audience = config.audience.as_deref().unwrap_or(default_audience);
            if audience.is_empty() {
                return Err(bad("the audience must not be empty".into()));
            }
            let source = Arc::new(HttpKeySource::new(client.clone(), config)?);
            let index = inner.issuers.len();
            if inner.by_url.insert(config.url.clone(), index).is_some() {
                return Err(bad("another issuer has the same url".into()));
            }
            if inner.by_id.insert(config.id.clone(), index).is_some() {
                return Err(bad("the id is configured twice".into()));
            }
            inner.issuers.push(Arc::new(Issuer {
                config: config.clone(),
                audience: audience.to_owned(),
                algorithms,
                source,
                keys: RwLock::default(),
                generation: AtomicU64::new(0),
                refresh_lock: tokio::sync::Mutex::new(()),
                stats: Mutex::default(),
            }));
        }
        Ok(Verifier { inner: Arc::new(inner) })
    }

    /// The issuer with this id takes its keys from `source` instead of HTTP discovery (the
    /// built-in issuer of `latchkey dev`). Its cache starts empty. An unknown id changes nothing.
    pub fn with_key_source(self, issuer_id: &str, source: Arc<dyn KeySource>) -> Self {
        let mut inner = Arc::try_unwrap(self.inner).unwrap_or_else(|shared| (*shared).clone());
        match inner.by_id.get(issuer_id) {
            Some(&index) => {
                let old = &inner.issuers[index];
                inner.issuers[index] = Arc::new(Issuer {
                    config: old.config.clone(),
                    audience: old.audience.clone(),
                    algorithms: old.algorithms.clone(),
                    source,
                    keys: RwLock::default(),
                    generation: AtomicU64::new(0),
                    refresh_lock: tokio::sync::Mutex::new(()),
                    stats: Mutex::default(),
                });
            }
            None => tracing::warn!(oidc.issuer = issuer_id, "key source given for an issuer that is not configured"),
        }
        Verifier { inner: Arc::new(inner) }
    }

    pub fn issuer(&self, id: &str) -> Option<&IssuerConfig> {
        self.inner.by_id.get(id).map(|&i| &self.inner.issuers[i].config)
    }

    /// Fetches every issuer's keys now, concurrently. Failures are recorded in
    /// [`Verifier::health`], not returned: one issuer's outage must not stop start-up.
    pub async fn refresh_all(&self) {
        self.refresh_where(|_| true).await;
    }

    /// Refreshes the issuers whose last refresh failed.
    async fn refresh_failing(&self) {
        self.refresh_where(|issuer| issuer.stats().last_error.is_some()).await;
    }

    async fn refresh_where(&self, due: impl Fn(&Issuer) -> bool) {
        let mut tasks = tokio::task::JoinSet::new();
        for issuer in self.inner.issuers.iter().filter(|i| due(i)) {
            let issuer = issuer.clone();
            let clock = self.inner.clock.clone();
            tasks.spawn(async move {
                let _flight = issuer.refresh_lock.lock().await;
                issuer.refresh_locked(clock.as_ref()).await;
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Refreshes every issuer's keys every `every`, so that rotations are picked up before the
    /// first token under a new key arrives and an issuer's outage shows in its health, and
    /// refreshes an issuer whose last refresh failed every `retry` (at most `every`), so that
    /// its recovery shows as soon. Stops when the returned handle is aborted.
    pub fn spawn_periodic_refresh(&self, every: Duration, retry: Duration) -> tokio::task::JoinHandle<()> {
        let verifier = self.clone();
        let retry = retry.min(every);
        tokio::spawn(async move {
            // The first refresh is one period away: start-up has just fetched every issuer's keys.
            let start = tokio::time::Instant::now();
            let mut next_full = start + every;
            let mut ticks = tokio::time::interval_at(start + retry, retry);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let now = ticks.tick().await;
                if now >= next_full {
                    next_full = now + every;
                    verifier.refresh_all().await;
                } else {
                    verifier.refresh_failing().await;
                }
            }
        })
    }

    pub fn health(&self) -> Vec<IssuerHealth> {
        self.inner.issuers.iter().map(|issuer| issuer.health()).collect()
    }

    /// Verifies a subject token (DESIGN step 2, except spending the `jti`).
    pub async fn verify(&self, token: &str) -> Result<VerifiedClaims, OidcError> {
        let jws = parse(token)?;
        let iss = match jws.payload.get("iss") {
            Some(Value::String(iss)) => iss.as_str(),
            Some(_) => return Err(OidcError::InvalidClaim("iss")),
            None => return Err(OidcError::MissingClaim("iss")),
        };
        let issuer = self.inner.by_url.get(iss).map(|&i| &self.inner.issuers[i]).ok_or(OidcError::UnknownIssuer)?;
        // Per-issuer allow-list, before any key is looked up.
        if !issuer.algorithms.contains(&jws.alg) {
            return Err(OidcError::AlgorithmNotAllowed);
        }
        let clock = self.inner.clock.as_ref();
        issuer.check_signature(&jws, clock).await?;
        check_claims(issuer, jws.payload, clock.now().timestamp())
    }
}

/// The claim checks, on a payload whose signature has been verified.
fn check_claims(issuer: &Issuer, payload: Map<String, Value>, now: i64) -> Result<VerifiedClaims, OidcError> {
    let config = &issuer.config;

    let audience_ok = match payload.get("aud") {
        None => return Err(OidcError::MissingClaim("aud")),
        Some(Value::String(aud)) => *aud == issuer.audience,
        Some(Value::Array(auds)) => {
            if auds.iter().any(|a| !a.is_string()) {
                return Err(OidcError::InvalidClaim("aud"));
            }
            auds.iter().any(|a| a.as_str() == Some(&issuer.audience))
        }
        Some(_) => return Err(OidcError::InvalidClaim("aud")),
    };
    if !audience_ok {
        return Err(OidcError::AudienceMismatch);
    }

    let exp = numeric_date(&payload, "exp")?.ok_or(OidcError::MissingClaim("exp"))?;
    if now >= exp.saturating_add(LEEWAY_SECS) {
        return Err(OidcError::Expired);
    }
    if let Some(nbf) = numeric_date(&payload, "nbf")?
        && now.saturating_add(LEEWAY_SECS) < nbf
    {
        return Err(OidcError::NotYetValid);
    }
    let iat = numeric_date(&payload, "iat")?;
    if let Some(iat) = iat
        && iat > now.saturating_add(LEEWAY_SECS)
    {
        return Err(OidcError::IssuedInFuture);
    }
    if let Some(max_age) = config.max_token_age {
        let iat = iat.ok_or(OidcError::MissingClaim("iat"))?;
        let max_age = i64::try_from(max_age.as_secs()).unwrap_or(i64::MAX);
        if now.saturating_sub(iat) > max_age {
            return Err(OidcError::TooOld);
        }
    }

    let jti = match payload.get("jti") {
        Some(Value::String(jti)) if !jti.is_empty() && jti.chars().count() <= MAX_JTI_CHARS => Some(jti.clone()),
        Some(_) if config.single_use => return Err(OidcError::InvalidClaim("jti")),
        None if config.single_use => return Err(OidcError::MissingClaim("jti")),
        // Not single use: an unusable jti is simply not carried along.
        _ => None,
    };

    // Checked before any policy; a claim that is absent, an array or an object never matches.
    for (name, allowed) in &config.required_claims {
        let text = payload.get(name).and_then(claim_text);
        if !text.is_some_and(|text| allowed.contains(&text)) {
            return Err(OidcError::RequiredClaim(name.clone()));
        }
    }

    let claims = Claims::from_map_with(
        &config.id,
        config.kind,
        config.repository_claim.as_deref(),
        config.workflow_claim.as_deref(),
        payload,
    );
    Ok(VerifiedClaims { claims, jti, expires_at: exp })
}

/// A NumericDate claim (RFC 7519 §2): a JSON number of seconds, fractions dropped.
fn numeric_date(payload: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, OidcError> {
    match payload.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Ok(Some(i)),
            (None, Some(f)) if f.is_finite() && f.abs() < 1e15 => Ok(Some(f.floor() as i64)),
            _ => Err(OidcError::InvalidClaim(name)),
        },
        Some(_) => Err(OidcError::InvalidClaim(name)),
    }
}

/// The text a claim is compared by: strings as they are, numbers and booleans as their JSON
/// text (`1234567`, `true`); other values have none.
pub(crate) fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
