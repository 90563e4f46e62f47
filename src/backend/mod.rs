//! Backends mint and revoke one kind of credential each.

pub mod aws;
pub mod github;
pub mod jwt;
pub mod vault;

use std::fmt;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::kill::KillRule;
use crate::ledger::CredentialRow;
use crate::oidc::Claims;
use crate::policy::{AuthorizedGrant, BackendKind, PolicySet};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend could not be reached or answered an error; the message never holds a secret.
    #[error("{backend} backend unavailable: {message}")]
    Unavailable { backend: BackendKind, message: String },
    /// The grant cannot be minted as asked (a misconfiguration found at mint time).
    #[error("{backend} backend refused the grant: {message}")]
    Refused { backend: BackendKind, message: String },
    /// The backend asked latchkey to slow down; try again after `retry_after`.
    #[error("{backend} backend: {message}")]
    Throttled { backend: BackendKind, message: String, retry_after: std::time::Duration },
    /// The credential may have been issued, but no handle was recorded and the backend cannot
    /// find it without one: it ends by itself at the latest `lives_for` after its mint.
    #[error("{backend} backend: cannot revoke without the handle that was never recorded; it ends by itself")]
    Unrecorded { backend: BackendKind, lives_for: std::time::Duration },
    /// The stored revocation handle cannot be used.
    #[error("{backend} backend: bad revocation handle: {message}")]
    BadHandle { backend: BackendKind, message: String },
}

/// Everything a backend needs to mint one grant.
#[derive(Debug)]
pub struct MintRequest<'a> {
    pub credential_id: Uuid,
    pub grant: &'a AuthorizedGrant,
    pub agent: &'a str,
    pub capability: &'a str,
    pub claims: &'a Claims,
    pub now: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The secret fields of one credential, returned to the caller exactly once.
///
/// `Debug` prints only the field names, so a secret cannot reach a log by accident.
pub struct SecretFields(pub Map<String, Value>);

impl fmt::Debug for SecretFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What a backend returns for one minted grant.
#[derive(Debug)]
pub struct Minted {
    /// The fields that go into the credential object of the response.
    pub secret: SecretFields,
    /// The RFC 8693 `access_token` when this grant comes first.
    pub access_token: secrecy::SecretString,
    /// The RFC 8693 `issued_token_type` when this grant comes first.
    pub issued_token_type: &'static str,
    /// `Bearer` or `N_A`.
    pub token_type: &'static str,
    /// What revocation needs, in plain text; the broker seals it before it is stored.
    pub handle: Option<secrecy::SecretBox<Vec<u8>>>,
    /// Base64 SHA-256 of the secret, the form GitHub's audit log uses for `hashed_token`.
    pub fingerprint: String,
    pub expires_at: DateTime<Utc>,
}

/// One kind of credential.
#[async_trait]
pub trait Backend: Send + Sync + fmt::Debug {
    fn kind(&self) -> BackendKind;

    /// True when minting calls nothing outside latchkey and leaves no state anywhere but in the
    /// credential handed back (the `jwt` backend). Such grants need no intent record before
    /// minting: see [`crate::ledger::Ledger::issue_local`].
    fn is_local(&self) -> bool {
        false
    }

    async fn mint(&self, request: MintRequest<'_>) -> Result<Minted, BackendError>;

    /// Revokes one credential; `handle` is the unsealed handle recorded at mint. Already revoked
    /// or expired counts as done.
    async fn revoke(&self, credential: &CredentialRow, handle: Option<&[u8]>) -> Result<(), BackendError>;

    /// Revokes one credential because `rule` matched it. A backend that can refuse everything a
    /// selector names at once (AWS, by session tags) uses the rule; the others revoke the one
    /// credential.
    async fn revoke_for_kill(
        &self,
        credential: &CredentialRow,
        handle: Option<&[u8]>,
        _rule: &KillRule,
    ) -> Result<(), BackendError> {
        self.revoke(credential, handle).await
    }

    /// Periodic upkeep of what the backend keeps outside latchkey (AWS: pruning and bounding its
    /// deny statements). Called by the worker with the current policies and every kill rule that
    /// stood within the longest session a backend issues.
    async fn maintain(&self, _upkeep: &Upkeep<'_>) -> Result<(), BackendError> {
        Ok(())
    }

    /// Starts the backend's own background work, if it has any (the `vault` backend keeps its
    /// login alive). Called once, with the other background loops.
    fn spawn_maintenance(&self) {}
}

/// What [`Backend::maintain`] gets to look at.
#[derive(Debug)]
pub struct Upkeep<'a> {
    pub policies: &'a PolicySet,
    /// Kill rules in force, and those lifted or lapsed within the last 12 hours.
    pub rules: &'a [KillRule],
}

/// Base64 (standard, padded) SHA-256 of a secret.
pub fn fingerprint(secret: &[u8]) -> String {
    use base64::Engine;
    use sha2::Digest;
    base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_secret() {
        let mut fields = Map::new();
        fields.insert("token".into(), Value::String("ghs_supersecret".into()));
        let minted = Minted {
            secret: SecretFields(fields),
            access_token: "ghs_supersecret".to_string().into(),
            issued_token_type: "t",
            token_type: "Bearer",
            handle: Some(secrecy::SecretBox::new(Box::new(b"ghs_supersecret".to_vec()))),
            fingerprint: fingerprint(b"ghs_supersecret"),
            expires_at: DateTime::<Utc>::UNIX_EPOCH,
        };
        let debug = format!("{minted:?}");
        assert!(!debug.contains("supersecret"), "{debug}");
        assert!(debug.contains("token"), "field names stay visible: {debug}");
    }

    #[test]
    fn fingerprints_are_base64_sha256_like_githubs_hashed_token() {
        // echo -n "abc" | sha256sum | xxd -r -p | base64
        assert_eq!(fingerprint(b"abc"), "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0=");
    }
}
