//! Audit events and the hash chain.
//!
//! Each stored event carries a sequence number and `hash = SHA-256(prev_hash ‖ body)`, where
//! `body` is the event's canonical JSON (RFC 8785) and `prev_hash` the previous event's hash (32
//! zero bytes before the first). The body is stored as the exact bytes that were hashed, so any
//! store, and `latchkey audit verify`, recomputes the same chain byte for byte.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

mod canonical;

/// One audit event. Field names are the SIEM schema of `docs/AUDIT.md`; absent fields are
/// omitted from the JSON. Never holds a secret.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditEvent {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    /// Dotted name: `exchange.allowed`, `exchange.denied`, `credential.revoked`, `admin.call`, …
    pub event: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Who acted: `admin-key:<name>`, `system`, or the token subject for exchanges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// `allowed` | `denied` | `failed` for exchanges.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy_hash: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credential_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiry: Option<String>,
    /// Anything else: the decision trace, the credentials of an exchange, a kill selector.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<Value>,
}

impl AuditEvent {
    pub fn new(event: &str, time: DateTime<Utc>) -> Self {
        AuditEvent { time: format_time(time), event: event.to_owned(), ..Default::default() }
    }
}

/// The audit time format: RFC 3339 in UTC with milliseconds.
pub fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An event as stored: its place in the chain, the hashed body and the hashes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub seq: i64,
    /// Hex SHA-256 of the previous event (64 zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 of `prev_hash ‖ body`.
    pub hash: String,
    /// The canonical JSON that was hashed.
    pub body: String,
}

impl StoredEvent {
    pub fn event(&self) -> Result<AuditEvent, serde_json::Error> {
        serde_json::from_str(&self.body)
    }
}

pub const GENESIS_HASH: [u8; 32] = [0; 32];

/// RFC 8785 canonical JSON of an event.
pub fn canonical_body(event: &AuditEvent) -> String {
    let mut body = String::with_capacity(1024);
    if canonical::write_event(event, &mut body) {
        return body;
    }
    serde_json_canonicalizer::to_string(event).expect("an audit event always serializes")
}

/// `SHA-256(prev ‖ body)`.
pub fn chain_hash(prev: &[u8; 32], body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.finalize().into()
}

/// Where a chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("event {seq}: sequence gap (expected {expected})")]
    Gap { seq: i64, expected: i64 },
    #[error("event {seq}: prev_hash does not match the previous event's hash")]
    BrokenLink { seq: i64 },
    #[error("event {seq}: hash does not match its body")]
    BadHash { seq: i64 },
    #[error("event {seq}: body is not canonical JSON of an audit event")]
    BadBody { seq: i64 },
}

/// Checks a run of consecutive events, starting after an event whose hash was `prev`.
pub fn verify_chain(mut prev: [u8; 32], first_seq: i64, events: &[StoredEvent]) -> Result<[u8; 32], ChainError> {
    for (expected, e) in (first_seq..).zip(events) {
        if e.seq != expected {
            return Err(ChainError::Gap { seq: e.seq, expected });
        }
        if e.prev_hash != hex::encode(prev) {
            return Err(ChainError::BrokenLink { seq: e.seq });
        }
        let parsed = e.event().map_err(|_| ChainError::BadBody { seq: e.seq })?;
        if canonical_body(&parsed) != e.body {
            return Err(ChainError::BadBody { seq: e.seq });
        }
        let hash = chain_hash(&prev, e.body.as_bytes());
        if e.hash != hex::encode(hash) {
            return Err(ChainError::BadHash { seq: e.seq });
        }
        prev = hash;
    }
    Ok(prev)
}

/// A valid chain of `n` events from genesis, the `i`th with reason `n{i}`: for tests.
#[cfg(test)]
pub(crate) fn test_chain(n: usize) -> Vec<StoredEvent> {
    let mut prev = GENESIS_HASH;
    (0..n)
        .map(|i| {
            let mut e = AuditEvent::new("test.event", DateTime::<Utc>::UNIX_EPOCH);
            e.reason = Some(format!("n{i}"));
            let body = canonical_body(&e);
            let hash = chain_hash(&prev, body.as_bytes());
            let s = StoredEvent { seq: i as i64 + 1, prev_hash: hex::encode(prev), hash: hex::encode(hash), body };
            prev = hash;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_body_sorts_keys_and_omits_absent_fields() {
        let mut e = AuditEvent::new("exchange.denied", DateTime::<Utc>::UNIX_EPOCH);
        e.agent = Some("a".into());
        assert_eq!(canonical_body(&e), r#"{"agent":"a","event":"exchange.denied","time":"1970-01-01T00:00:00.000Z"}"#);
    }

    #[test]
    fn an_intact_chain_verifies() {
        let events = test_chain(5);
        verify_chain(GENESIS_HASH, 1, &events).unwrap();
    }

    #[test]
    fn an_edited_body_is_caught() {
        let mut events = test_chain(5);
        events[2].body = events[2].body.replace("n2", "nX");
        assert_eq!(verify_chain(GENESIS_HASH, 1, &events), Err(ChainError::BadHash { seq: 3 }));
    }

    #[test]
    fn a_removed_event_is_caught() {
        let mut events = test_chain(5);
        events.remove(1);
        assert_eq!(verify_chain(GENESIS_HASH, 1, &events), Err(ChainError::Gap { seq: 3, expected: 2 }));
    }
}
