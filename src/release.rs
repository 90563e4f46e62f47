//! `POST /v1/release`: the holder of an exchange gives its credentials back before they expire,
//! proving itself with the exchange's `release_token` instead of an admin key.
//!
//! Invariants:
//! * The token is never stored: the ledger keeps its SHA-256 (hex), and the comparison of the
//!   SHA-256 of what the caller sent with it runs in constant time ([`subtle`]).
//! * An unknown exchange, an exchange without a release token (a refused one) and a wrong token
//!   are one and the same refusal, [`ReleaseError::Refused`]: a caller learns nothing about which
//!   exchanges exist.
//! * Credentials are revoked exactly as `POST /v1/credentials/{id}/revoke` revokes them
//!   (durable `revoke` jobs for active ones, a mark on pending ones), in one transaction with
//!   the `exchange.released` audit event. A release that finds nothing left to do changes
//!   nothing and writes nothing: releasing twice is safe, which a CI step that retries needs.
//! * A refused release changes nothing either; it is logged (without the token) for operators.

use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::Digest;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::app::App;
use crate::audit::AuditEvent;
use crate::ledger::{CredentialState, NewJob, RevokeRequest};
use crate::policy::BackendKind;

/// The longest release token accepted: issued ones are 43 characters (32 bytes, base64url).
const MAX_TOKEN: usize = 256;

/// The refusal's description: the same words for every reason.
pub const REFUSED: &str = "unknown exchange or wrong release token";

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The request is malformed (not a UUID, a token far too long).
    #[error("{0}")]
    Invalid(String),
    /// Unknown exchange, an exchange that issued nothing, or a wrong token: never told apart.
    #[error("{REFUSED}")]
    Refused,
    /// The store failed; nothing is known to have changed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// The body of `POST /v1/release` (JSON or form).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    pub exchange_id: String,
    pub release_token: secrecy::SecretString,
}

/// One credential of a released exchange.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReleasedCredential {
    pub id: Uuid,
    pub name: String,
    pub backend: BackendKind,
    /// The credential's state now: `active` until its revocation job has run, then `revoked`.
    pub state: CredentialState,
    /// `queued` (a revocation job was enqueued), `already_queued`, `marked` (still being issued;
    /// it can no longer become active) or `none` (it had already ended).
    pub revocation: &'static str,
}

/// What `POST /v1/release` answers, the first time and every time after.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Released {
    pub exchange_id: Uuid,
    pub credentials: Vec<ReleasedCredential>,
}

/// Whether `token` hashes to `stored_hex`, in time that does not depend on where they differ.
fn token_matches(token: &str, stored_hex: Option<&str>) -> bool {
    let sent = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    // A missing hash is compared against a value no token hashes to, so that every refusal
    // takes the same path.
    let stored = stored_hex.unwrap_or("-").as_bytes();
    bool::from(sent.as_bytes().ct_eq(stored))
}

/// Releases an exchange: revokes every credential of it that is still pending or active.
pub async fn release(app: &App, req: ReleaseRequest, request_id: &str) -> Result<Released, ReleaseError> {
    use secrecy::ExposeSecret;
    let exchange_id = Uuid::parse_str(req.exchange_id.trim())
        .map_err(|_| ReleaseError::Invalid("exchange_id must be a UUID".into()))?;
    let token = req.release_token.expose_secret();
    if token.is_empty() || token.len() > MAX_TOKEN {
        return Err(ReleaseError::Invalid("release_token is empty or too long".into()));
    }
    let unavailable = |e: crate::ledger::LedgerError| ReleaseError::Unavailable(e.to_string());
    let exchange = app.ledger.exchange(exchange_id).await.map_err(unavailable)?;
    let stored = exchange.as_ref().and_then(|e| e.release_token_sha256.as_deref());
    if !token_matches(token, stored) || exchange.is_none() {
        tracing::warn!(%exchange_id, "release refused: unknown exchange or wrong release token");
        return Err(ReleaseError::Refused);
    }
    let credentials = app.ledger.credentials_of_exchange(exchange_id).await.map_err(unavailable)?;

    let now = app.clock.now();
    let event = |name: &str| {
        let mut e = AuditEvent::new(name, now);
        e.actor = Some("release-token".into());
        e.request_id = Some(request_id.to_owned());
        e.exchange_id = Some(exchange_id.to_string());
        e.reason = Some("released by the exchange's holder".into());
        e
    };
    let revokes = credentials
        .iter()
        .map(|c| {
            let job = NewJob::revoke(c, now);
            let mut e = event("credential.revoke_requested");
            e.credential_id = Some(c.id.to_string());
            e.backend = Some(c.backend.to_string());
            e.agent = Some(c.agent.clone());
            e.capability = Some(c.capability.clone());
            e.subject = Some(c.subject.clone());
            e.repository = c.repository.clone();
            e.fingerprint = c.fingerprint.clone();
            (job, e)
        })
        .collect();
    let mut released = event("exchange.released");
    if let Some(first) = credentials.first() {
        released.agent = Some(first.agent.clone());
        released.capability = Some(first.capability.clone());
        released.subject = Some(first.subject.clone());
        released.repository = first.repository.clone();
    }
    released.detail = Some(json!({ "credentials": credentials.iter().map(|c| c.id).collect::<Vec<_>>() }));
    let answers = app.ledger.release_exchange(revokes, released).await.map_err(unavailable)?;

    if answers.iter().any(|a| matches!(a, RevokeRequest::Queued | RevokeRequest::AlreadyQueued)) {
        // Revocations start now, not at the worker's next tick.
        app.jobs_wake.notify_one();
    }
    let credentials: Vec<ReleasedCredential> = credentials
        .into_iter()
        .zip(answers)
        .map(|(c, a)| {
            let (state, revocation) = match a {
                RevokeRequest::Queued => (CredentialState::Active, "queued"),
                RevokeRequest::AlreadyQueued => (CredentialState::Active, "already_queued"),
                RevokeRequest::Marked => (CredentialState::Pending, "marked"),
                RevokeRequest::Finished(s) => (s, "none"),
            };
            ReleasedCredential { id: c.id, name: c.name, backend: c.backend, state, revocation }
        })
        .collect();
    tracing::info!(%exchange_id, credentials = credentials.len(), "exchange.released");
    Ok(Released { exchange_id, credentials })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_matches_only_its_own_hash() {
        let hash = hex::encode(sha2::Sha256::digest(b"t0ken"));
        assert!(token_matches("t0ken", Some(&hash)));
        assert!(!token_matches("t0kem", Some(&hash)));
        assert!(!token_matches("t0ken", Some(&hash[..10])));
        assert!(!token_matches("t0ken", None));
        assert!(!token_matches("-", None), "no token matches a missing hash");
    }
}
