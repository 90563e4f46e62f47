//! The `jwt` backend: latchkey signs a short-lived ES256 JWT for internal services.
//!
//! Services verify it against `/.well-known/jwks.json` and learn about revocation through
//! `/v1/introspect` (RFC 7662), which also consults the ledger: a JWT whose credential is not
//! `active` is inactive even while its signature and `exp` are still good. The signing key is
//! generated once, kept in the ledger sealed under the sealing key, and shared by every replica.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::{Backend, BackendError, MintRequest, Minted, SecretFields, fingerprint};
use crate::audit::AuditEvent;
use crate::ledger::{CredentialRow, Ledger, LedgerError, RetireKey, StoredKey};
use crate::policy::{BackendKind, GrantSpec};
use crate::seal::Sealer;

pub const ISSUED_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// How often every replica re-reads the signing keys from the ledger, to pick up a key another
/// replica created.
pub const KEY_REFRESH: Duration = Duration::from_secs(10);

/// How long verifiers may cache `/.well-known/jwks.json` (its `Cache-Control: max-age`).
pub const JWKS_MAX_AGE_SECS: i64 = 300;

/// A new key is published in the JWKS at once but signs only this long after it was created:
/// by then every replica has read it (a few [`KEY_REFRESH`]es) and every verifier's cached copy
/// of the JWKS has been replaced by one that lists it ([`JWKS_MAX_AGE_SECS`]), so that no token
/// ever names a `kid` its verifier cannot find.
pub const ACTIVATION_DELAY: chrono::Duration = chrono::Duration::seconds(JWKS_MAX_AGE_SECS + 30);

/// How long a key stays in the JWKS after a newer key took over signing: the longest a
/// latchkey JWT can live (the longest policy TTL, 12 h) plus a margin for verifiers' clock
/// leeway. Every token it signed has expired by then.
pub const RETENTION: chrono::Duration = chrono::Duration::minutes(12 * 60 + 5);

struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    public_point: Vec<u8>,
    public_jwk: Value,
    created_at: DateTime<Utc>,
    /// When this key starts signing (its creation + [`ACTIVATION_DELAY`]; at once for the
    /// first key and for a retirement's replacement), and when a newer key takes over signing
    /// (`None` while none has).
    slot: Slot,
}

impl SigningKey {
    /// Whether the key is in the JWKS (and verifies for introspection) at `now`. A retired key
    /// is never loaded at all.
    fn published(&self, now: DateTime<Utc>) -> bool {
        self.slot.superseded_at.is_none_or(|at| now < at + RETENTION)
    }
}

/// When one key signs: from `signs_from`, until a newer key takes over (`superseded_at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slot {
    signs_from: DateTime<Utc>,
    superseded_at: Option<DateTime<Utc>>,
}

impl Slot {
    fn signs_at(&self, now: DateTime<Utc>) -> bool {
        self.signs_from <= now && self.superseded_at.is_none_or(|at| now < at)
    }
}

/// The phase of one signing key at a given time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    /// Published, not signing yet.
    Next,
    /// Signs new tokens.
    Signing,
    /// Published until every token it signed has expired.
    Retiring,
    /// No longer published.
    Retired,
}

/// One signing key as an operator sees it: never the private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KeyView {
    pub kid: String,
    pub algorithm: &'static str,
    pub state: KeyState,
    pub created_at: String,
    pub signs_from: String,
    /// When a newer key took (or takes) over signing.
    pub superseded_at: Option<String>,
    /// When it leaves the JWKS.
    pub published_until: Option<String>,
}

/// What an emergency retirement did (`POST /v1/signing-keys/{kid}/retire`). Never a private key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Retirement {
    pub kid: String,
    pub retired_at: String,
    /// The key made to sign at once in its place, when nothing else would have signed.
    pub replacement: Option<KeyView>,
    /// Live `jwt` credentials it had signed, now revoked (active) or barred from activation
    /// (pending).
    pub credentials_revoked: usize,
    pub credentials_marked: usize,
}

/// Signs latchkey JWTs; verifies them for introspection.
pub struct JwtBackend {
    /// `iss` of every token: the broker's public URL.
    issuer: String,
    /// The published keys in the ledger, oldest first; replaced whole by [`JwtBackend::refresh`].
    keys: RwLock<Arc<Vec<Arc<SigningKey>>>>,
    /// Held by a refresh from its read of the ledger to the replacement of `keys`: a refresh
    /// that read the keys before a retirement committed can never install them after the
    /// retirement's own refresh did.
    refreshing: tokio::sync::Mutex<()>,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys = self.keys();
        let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("JwtBackend").field("issuer", &self.issuer).field("kids", &kids).finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum JwtKeyError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("signing key {0} does not open with the sealing key: {1}")]
    Unseal(String, crate::seal::SealError),
    #[error("signing key {0} is not a valid P-256 key")]
    BadKey(String),
    #[error("no signing key {0}")]
    UnknownKey(String),
    /// A malformed request (an empty reason).
    #[error("{0}")]
    Invalid(String),
    /// Already retired, or retired by another replica meanwhile.
    #[error("{0}")]
    Conflict(String),
}

impl JwtKeyError {
    fn from_retirement(kid: &str, e: LedgerError) -> Self {
        match e {
            LedgerError::NotFound => JwtKeyError::UnknownKey(kid.to_owned()),
            LedgerError::Conflict(m) => JwtKeyError::Conflict(m),
            other => JwtKeyError::Ledger(other),
        }
    }
}

/// The associated data a signing key is sealed under: it binds the sealed key to its kid.
pub fn key_aad(kid: &str) -> Vec<u8> {
    format!("jwt-signing-key:{kid}").into_bytes()
}

/// A new P-256 key, sealed, as the ledger stores it.
fn new_key(sealer: &Sealer, now: DateTime<Utc>) -> Result<StoredKey, JwtKeyError> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
        .map_err(|_| JwtKeyError::BadKey("new".into()))?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
        .map_err(|_| JwtKeyError::BadKey("new".into()))?;
    let (kid, jwk) = public_jwk(pair.public_key().as_ref());
    Ok(StoredKey {
        id: kid.clone(),
        algorithm: "ES256".into(),
        sealed_private: sealer.seal(&key_aad(&kid), pkcs8.as_ref()),
        public_jwk: jwk,
        created_at: now,
        signs_from: None,
        retired_at: None,
    })
}

/// The creation time of a new key. Keys are ordered by creation: a new key is strictly newer
/// than every stored one, even when a clock step or a rotation in the same millisecond would
/// say otherwise.
fn next_creation(stored: &[StoredKey], now: DateTime<Utc>) -> DateTime<Utc> {
    let newest = stored.iter().map(|k| k.created_at).max();
    newest.map_or(now, |n| now.max(n + chrono::Duration::milliseconds(1)))
}

/// When each stored key signs, oldest first (and `stored` sorted so). A key signs from its
/// stored `signs_from`, else from its creation + [`ACTIVATION_DELAY`] (the first key at once),
/// until a newer key takes over. A key retired before it ever signed takes over from none; one
/// retired after it took over still ends the keys before it: a superseded key never comes back.
fn schedule(stored: &mut [StoredKey]) -> Vec<Slot> {
    stored.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
    let signs_from: Vec<DateTime<Utc>> = stored
        .iter()
        .enumerate()
        .map(|(i, k)| k.signs_from.unwrap_or(if i == 0 { k.created_at } else { k.created_at + ACTIVATION_DELAY }))
        .collect();
    let mut slots = vec![Slot { signs_from: DateTime::<Utc>::MIN_UTC, superseded_at: None }; stored.len()];
    // The earliest takeover among the keys newer than each one.
    let mut takeover: Option<DateTime<Utc>> = None;
    for i in (0..stored.len()).rev() {
        slots[i] = Slot { signs_from: signs_from[i], superseded_at: takeover };
        if stored[i].retired_at.is_none_or(|r| signs_from[i] < r) {
            takeover = Some(takeover.map_or(signs_from[i], |t| t.min(signs_from[i])));
        }
    }
    slots
}

/// The key that signs at `now` among keys (oldest first) not retired: the newest whose
/// `signs_from` has come and that no newer key took over from. With a clock behind the one that
/// scheduled the keys, the oldest key that no newer key took over from.
fn signer_index<T>(keys: &[T], slot: impl Fn(&T) -> &Slot, now: DateTime<Utc>) -> Option<usize> {
    keys.iter()
        .rposition(|k| slot(k).signs_at(now))
        .or_else(|| keys.iter().position(|k| slot(k).superseded_at.is_none_or(|at| now < at)))
}

impl JwtBackend {
    /// Loads the signing keys from the ledger, creating the first one if there is none.
    pub async fn load_or_create(
        ledger: &dyn Ledger,
        sealer: &Sealer,
        issuer: &str,
        now: DateTime<Utc>,
    ) -> Result<JwtBackend, JwtKeyError> {
        if ledger.signing_keys().await?.is_empty() {
            let key = new_key(sealer, now)?;
            let mut event = AuditEvent::new("signing_key.created", now);
            event.actor = Some("system".into());
            event.detail = Some(json!({ "kid": key.id, "algorithm": "ES256" }));
            ledger.insert_signing_key(&key, event).await?;
        }
        let backend = JwtBackend {
            issuer: issuer.to_owned(),
            keys: RwLock::new(Arc::new(Vec::new())),
            refreshing: tokio::sync::Mutex::new(()),
            rng: SystemRandom::new(),
        };
        backend.refresh(ledger, sealer, now).await?;
        Ok(backend)
    }

    /// Re-reads the keys from the ledger (every replica does, every [`KEY_REFRESH`]): a key
    /// another replica created is published here too, and signs here from its `signs_from`; a
    /// key another replica retired is dropped here. Keys no longer published are not even
    /// unsealed.
    pub async fn refresh(&self, ledger: &dyn Ledger, sealer: &Sealer, now: DateTime<Utc>) -> Result<(), JwtKeyError> {
        let _turn = self.refreshing.lock().await;
        self.refresh_locked(ledger, sealer, now).await
    }

    async fn refresh_locked(
        &self,
        ledger: &dyn Ledger,
        sealer: &Sealer,
        now: DateTime<Utc>,
    ) -> Result<(), JwtKeyError> {
        let mut stored = ledger.signing_keys().await?;
        let slots = schedule(&mut stored);
        let mut keys = Vec::with_capacity(stored.len());
        for (k, slot) in stored.iter().zip(slots) {
            if k.retired_at.is_some() || slot.superseded_at.is_some_and(|at| now >= at + RETENTION) {
                continue;
            }
            let der =
                sealer.open(&key_aad(&k.id), &k.sealed_private).map_err(|e| JwtKeyError::Unseal(k.id.clone(), e))?;
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                .map_err(|_| JwtKeyError::BadKey(k.id.clone()))?;
            let public_point = pair.public_key().as_ref().to_vec();
            keys.push(Arc::new(SigningKey {
                kid: k.id.clone(),
                pair,
                public_point,
                public_jwk: k.public_jwk.clone(),
                created_at: k.created_at,
                slot,
            }));
        }
        *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
        Ok(())
    }

    /// Creates a new signing key (admin rotation): published at once, signing from
    /// [`ACTIVATION_DELAY`] later on every replica; the keys before it stay published until
    /// [`RETENTION`] after that. Recorded by a `signing_key.rotated` event naming `actor`.
    pub async fn rotate(
        &self,
        ledger: &dyn Ledger,
        sealer: &Sealer,
        now: DateTime<Utc>,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<KeyView, JwtKeyError> {
        let key = new_key(sealer, next_creation(&ledger.signing_keys().await?, now))?;
        let previous = self.signer(now).map(|k| k.kid.clone());
        let mut event = AuditEvent::new("signing_key.rotated", now);
        event.actor = Some(actor.to_owned());
        event.request_id = request_id.map(str::to_owned);
        event.detail = Some(json!({
            "kid": key.id,
            "algorithm": "ES256",
            "previous_kid": previous,
            "signs_from": crate::audit::format_time(key.created_at + ACTIVATION_DELAY),
        }));
        ledger.insert_signing_key(&key, event).await?;
        self.refresh(ledger, sealer, now).await?;
        self.views(now).into_iter().find(|v| v.kid == key.id).ok_or_else(|| JwtKeyError::BadKey(key.id.clone()))
    }

    /// Retires a key at once (a leak): it leaves the JWKS and verifies nothing more, here before
    /// this returns and on every other replica at its next refresh; the live `jwt` credentials
    /// created while it was the signing key are revoked in the same transaction, so that
    /// introspection answers inactive for them on every replica at once. When no other key
    /// would sign afterwards, a new key is created in the same transaction and signs at once:
    /// waiting [`ACTIVATION_DELAY`] would leave the broker without a key, and signing on with
    /// the leaked one is what the retirement is for. Its tokens fail at verifiers whose cached
    /// JWKS predates it, until they fetch it again ([`JWKS_MAX_AGE_SECS`] at the most).
    /// Recorded by a `signing_key.retired` event naming `actor` and `reason`, and one event per
    /// credential it ended.
    #[allow(clippy::too_many_arguments)]
    pub async fn retire(
        &self,
        ledger: &dyn Ledger,
        sealer: &Sealer,
        now: DateTime<Utc>,
        kid: &str,
        reason: &str,
        actor: &str,
        request_id: Option<&str>,
    ) -> Result<Retirement, JwtKeyError> {
        // Judged on the ledger's keys, not this replica's copy, which may be 10 s old.
        let mut stored = ledger.signing_keys().await?;
        let slots = schedule(&mut stored);
        let Some(i) = stored.iter().position(|k| k.id == kid) else {
            return Err(JwtKeyError::UnknownKey(kid.to_owned()));
        };
        if stored[i].retired_at.is_some() {
            return Err(JwtKeyError::Conflict(format!("signing key {kid} is already retired")));
        }
        let slot = slots[i];
        // What would sign once it is gone.
        let mut after = stored.clone();
        after[i].retired_at = Some(now);
        let after_slots = schedule(&mut after);
        let live: Vec<Slot> =
            after.iter().zip(after_slots).filter(|(k, _)| k.retired_at.is_none()).map(|(_, s)| s).collect();
        // Strictly: a `next` key would sign only after its delay, which is no help now.
        let replacement = if live.iter().any(|s| s.signs_at(now)) {
            None
        } else {
            let mut key = new_key(sealer, next_creation(&stored, now))?;
            key.signs_from = Some(now);
            Some(key)
        };
        let mut event = AuditEvent::new("signing_key.retired", now);
        event.actor = Some(actor.to_owned());
        event.request_id = request_id.map(str::to_owned);
        event.reason = Some(reason.to_owned());
        let t = crate::audit::format_time;
        // The key signed from its `signs_from` until a newer key took over; tokens it signed
        // after now can only come from a replica that has not read the retirement yet.
        let signed_until = slot.superseded_at.filter(|at| *at <= now);
        event.detail = Some(json!({
            "kid": kid,
            "signed_from": t(slot.signs_from),
            "signed_until": signed_until.map(t),
            "replacement_kid": replacement.as_ref().map(|k| k.id.clone()),
        }));
        let retire = RetireKey {
            kid: kid.to_owned(),
            at: now,
            replacement: replacement.clone(),
            signed_from: slot.signs_from,
            signed_until,
            event,
        };
        let ended = ledger.retire_signing_key(retire).await.map_err(|e| JwtKeyError::from_retirement(kid, e))?;
        {
            let _turn = self.refreshing.lock().await;
            // Dropped here first, so that it signs nothing more even if the re-read fails.
            self.forget(kid);
            if let Err(e) = self.refresh_locked(ledger, sealer, now).await {
                tracing::warn!(error = %e, kid, "the signing keys could not be re-read after a retirement; the next refresh will");
            }
        }
        let replacement = replacement.and_then(|k| self.views(now).into_iter().find(|v| v.kid == k.id));
        Ok(Retirement {
            kid: kid.to_owned(),
            retired_at: t(now),
            replacement,
            credentials_revoked: ended.revoked.len(),
            credentials_marked: ended.marked.len(),
        })
    }

    /// Drops one key from this replica's copy.
    fn forget(&self, kid: &str) {
        let mut keys = self.keys.write().unwrap_or_else(|p| p.into_inner());
        if keys.iter().any(|k| k.kid == kid) {
            *keys = Arc::new(keys.iter().filter(|k| k.kid != kid).cloned().collect());
        }
    }

    /// Every key still published, and its phase at `now`, oldest first.
    pub fn views(&self, now: DateTime<Utc>) -> Vec<KeyView> {
        let keys = self.keys();
        let signer = self.signer(now).map(|k| k.kid.clone());
        let t = crate::audit::format_time;
        keys.iter()
            .map(|k| {
                let superseded = k.slot.superseded_at.is_some_and(|at| at <= now);
                let state = if Some(&k.kid) == signer.as_ref() {
                    KeyState::Signing
                } else if !superseded && k.slot.signs_from > now {
                    KeyState::Next
                } else if k.published(now) {
                    KeyState::Retiring
                } else {
                    KeyState::Retired
                };
                KeyView {
                    kid: k.kid.clone(),
                    algorithm: "ES256",
                    state,
                    created_at: t(k.created_at),
                    signs_from: t(k.slot.signs_from),
                    superseded_at: k.slot.superseded_at.map(t),
                    published_until: k.slot.superseded_at.map(|at| t(at + RETENTION)),
                }
            })
            .collect()
    }

    fn keys(&self) -> Arc<Vec<Arc<SigningKey>>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The key that signs at `now` (see [`signer_index`]).
    fn signer(&self, now: DateTime<Utc>) -> Option<SigningKeyRef> {
        let keys = self.keys();
        let i = signer_index(&keys, |k| &k.slot, now)?;
        Some(SigningKeyRef { keys, i })
    }

    /// The JWK set served at `/.well-known/jwks.json`: every key that signs, will sign, or
    /// signed tokens that may not have expired yet.
    pub fn jwks(&self, now: DateTime<Utc>) -> Value {
        let keys = self.keys();
        json!({ "keys": keys.iter().filter(|k| k.published(now)).map(|k| k.public_jwk.clone()).collect::<Vec<_>>() })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn sign(&self, claims: &Value, now: DateTime<Utc>) -> Result<String, BackendError> {
        let key = self.signer(now).ok_or_else(|| BackendError::Unavailable {
            backend: BackendKind::Jwt,
            message: "no signing key is loaded".into(),
        })?;
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": key.kid });
        let mut out = String::with_capacity(512);
        out.push_str(&B64.encode(header.to_string()));
        out.push('.');
        out.push_str(&B64.encode(claims.to_string()));
        let sig = key.pair.sign(&self.rng, out.as_bytes()).expect("ECDSA signing with a valid key cannot fail");
        out.push('.');
        out.push_str(&B64.encode(sig.as_ref()));
        Ok(out)
    }

    /// Checks the signature and `iss` of a latchkey JWT and returns its claims. Lifetime and
    /// revocation are the caller's (introspection's) business.
    pub fn verify(&self, token: &str, now: DateTime<Utc>) -> Option<Map<String, Value>> {
        if token.len() > 16 * 1024 {
            return None;
        }
        let mut parts = token.split('.');
        let (h, p, s) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&B64.decode(h).ok()?).ok()?;
        if header.get("alg")? != "ES256" {
            return None;
        }
        let kid = header.get("kid")?.as_str()?;
        let keys = self.keys();
        let key = keys.iter().find(|k| k.kid == kid && k.published(now))?;
        let sig = B64.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + p.len()];
        signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public_point)
            .verify(signed.as_bytes(), &sig)
            .ok()?;
        let claims: Map<String, Value> = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
        (claims.get("iss")?.as_str()? == self.issuer).then_some(claims)
    }
}

/// The signing key at one index of a key set, kept alive while in use.
struct SigningKeyRef {
    keys: Arc<Vec<Arc<SigningKey>>>,
    i: usize,
}

impl std::ops::Deref for SigningKeyRef {
    type Target = SigningKey;
    fn deref(&self) -> &SigningKey {
        &self.keys[self.i]
    }
}

/// The public JWK and its id (RFC 7638 thumbprint) of an uncompressed P-256 point.
fn public_jwk(point: &[u8]) -> (String, Value) {
    let (x, y) = (B64.encode(&point[1..33]), B64.encode(&point[33..65]));
    // RFC 7638: members in lexicographic order, no whitespace.
    let thumbprint = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = B64.encode(Sha256::digest(thumbprint.as_bytes()));
    let jwk = json!({ "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid, "x": x, "y": y });
    (kid, jwk)
}

#[async_trait]
impl Backend for JwtBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Jwt
    }

    /// A latchkey JWT is made in memory; it is usable only once it is handed out, and
    /// introspection reports it active only once its credential row is.
    fn is_local(&self) -> bool {
        true
    }

    async fn mint(&self, req: MintRequest<'_>) -> Result<Minted, BackendError> {
        let GrantSpec::Jwt(grant) = &req.grant.spec else {
            return Err(BackendError::Refused { backend: BackendKind::Jwt, message: "not a jwt grant".into() });
        };
        // Static claims first, so that the registered and latchkey claims always win.
        let mut claims = grant.claims.clone();
        let registered = json!({
            "iss": self.issuer,
            "sub": req.claims.subject,
            "aud": grant.audience,
            "iat": req.now.timestamp(),
            "nbf": req.now.timestamp(),
            "exp": req.expires_at.timestamp(),
            "jti": req.credential_id.to_string(),
            "latchkey": {
                "agent": req.agent,
                "capability": req.capability,
                "issuer": req.claims.issuer,
                "repository": req.claims.repository,
                "workflow": req.claims.workflow,
            },
        });
        if let Value::Object(m) = registered {
            claims.extend(m);
        }
        let token = self.sign(&Value::Object(claims), req.now)?;
        let fp = fingerprint(token.as_bytes());
        let mut secret = Map::new();
        secret.insert("token".into(), Value::String(token.clone()));
        Ok(Minted {
            secret: SecretFields(secret),
            access_token: token.into(),
            issued_token_type: ISSUED_TOKEN_TYPE,
            token_type: "Bearer",
            handle: None,
            fingerprint: fp,
            expires_at: req.expires_at,
        })
    }

    /// Nothing to call: a latchkey JWT is revoked by its credential's state in the ledger, which
    /// introspection consults.
    async fn revoke(&self, _credential: &CredentialRow, _handle: Option<&[u8]>) -> Result<(), BackendError> {
        Ok(())
    }
}
