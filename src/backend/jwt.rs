//! The `jwt` backend: latchkey signs a short-lived ES256 JWT for internal services.
//!
//! Services verify it against `/.well-known/jwks.json` and learn about revocation through
//! `/v1/introspect` (RFC 7662), which also consults the ledger: a JWT whose credential is not
//! `active` is inactive even while its signature and `exp` are still good. The signing key is
//! generated once, kept in the ledger sealed under the sealing key, and shared by every replica.

use std::sync::Arc;

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
use crate::ledger::{CredentialRow, Ledger, LedgerError, StoredKey};
use crate::policy::{BackendKind, GrantSpec};
use crate::seal::Sealer;

pub const ISSUED_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

struct SigningKey {
    kid: String,
    pair: EcdsaKeyPair,
    public_point: Vec<u8>,
    public_jwk: Value,
}

/// Signs latchkey JWTs; verifies them for introspection.
pub struct JwtBackend {
    /// `iss` of every token: the broker's public URL.
    issuer: String,
    /// The first key signs; all of them verify.
    keys: Arc<Vec<SigningKey>>,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
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
}

fn key_aad(kid: &str) -> Vec<u8> {
    format!("jwt-signing-key:{kid}").into_bytes()
}

impl JwtBackend {
    /// Loads the signing keys from the ledger, creating the first one if there is none.
    pub async fn load_or_create(
        ledger: &dyn Ledger,
        sealer: &Sealer,
        issuer: &str,
        now: DateTime<Utc>,
    ) -> Result<JwtBackend, JwtKeyError> {
        let mut stored = ledger.signing_keys().await?;
        if stored.is_empty() {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| JwtKeyError::BadKey("new".into()))?;
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                .map_err(|_| JwtKeyError::BadKey("new".into()))?;
            let (kid, jwk) = public_jwk(pair.public_key().as_ref());
            let key = StoredKey {
                id: kid.clone(),
                algorithm: "ES256".into(),
                sealed_private: sealer.seal(&key_aad(&kid), pkcs8.as_ref()),
                public_jwk: jwk,
                created_at: now,
            };
            let mut event = AuditEvent::new("signing_key.created", now);
            event.actor = Some("system".into());
            event.detail = Some(json!({ "kid": kid, "algorithm": "ES256" }));
            ledger.insert_signing_key(&key, event).await?;
            stored = ledger.signing_keys().await?;
        }
        // Newest first: it signs.
        stored.sort_by_key(|k| std::cmp::Reverse(k.created_at));
        let keys = stored
            .iter()
            .map(|k| {
                let der = sealer
                    .open(&key_aad(&k.id), &k.sealed_private)
                    .map_err(|e| JwtKeyError::Unseal(k.id.clone(), e))?;
                let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
                    .map_err(|_| JwtKeyError::BadKey(k.id.clone()))?;
                let public_point = pair.public_key().as_ref().to_vec();
                Ok(SigningKey { kid: k.id.clone(), pair, public_point, public_jwk: k.public_jwk.clone() })
            })
            .collect::<Result<Vec<_>, JwtKeyError>>()?;
        Ok(JwtBackend { issuer: issuer.to_owned(), keys: Arc::new(keys), rng: SystemRandom::new() })
    }

    /// The JWK set served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> Value {
        json!({ "keys": self.keys.iter().map(|k| k.public_jwk.clone()).collect::<Vec<_>>() })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    fn sign(&self, claims: &Value) -> String {
        let key = &self.keys[0];
        let header = json!({ "alg": "ES256", "typ": "JWT", "kid": key.kid });
        let mut out = String::with_capacity(512);
        out.push_str(&B64.encode(header.to_string()));
        out.push('.');
        out.push_str(&B64.encode(claims.to_string()));
        let sig = key.pair.sign(&self.rng, out.as_bytes()).expect("ECDSA signing with a valid key cannot fail");
        out.push('.');
        out.push_str(&B64.encode(sig.as_ref()));
        out
    }

    /// Checks the signature and `iss` of a latchkey JWT and returns its claims. Lifetime and
    /// revocation are the caller's (introspection's) business.
    pub fn verify(&self, token: &str) -> Option<Map<String, Value>> {
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
        let key = self.keys.iter().find(|k| k.kid == kid)?;
        let sig = B64.decode(s).ok()?;
        let signed = &token[..h.len() + 1 + p.len()];
        signature::UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &key.public_point)
            .verify(signed.as_bytes(), &sig)
            .ok()?;
        let claims: Map<String, Value> = serde_json::from_slice(&B64.decode(p).ok()?).ok()?;
        (claims.get("iss")?.as_str()? == self.issuer).then_some(claims)
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
        let token = self.sign(&Value::Object(claims));
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
