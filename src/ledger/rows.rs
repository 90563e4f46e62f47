//! How ledger values are written as column values and read back, the same way in every store:
//! ids as hyphenated lowercase text, times as fixed-width RFC 3339 text, states and kinds as
//! their snake_case names. Also the one place that groups live credentials into the exchanges a
//! kill rule judges.
//!
//! Invariant: decoding never panics and never quotes a value: anything that does not decode is
//! [`LedgerError::Corrupt`], naming the table and column only.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use serde_json::Value;

use super::{
    Checkpoint, CredentialRow, CredentialState, ExchangeRow, ExchangeState, Job, JobKind, KillTarget, LedgerError,
    LiveCredential, SealedBlob, SealedKind, StoredKey, StoredKill,
};
use crate::audit::StoredEvent;
use crate::kill::{KillRule, KillSubject, Selector};
use crate::policy::BackendKind;

/// Timestamps are stored as fixed-width RFC 3339 UTC strings with milliseconds
/// (`2025-01-31T12:00:00.000Z`), the audit time format, so that text order is time order and
/// range conditions work on the text. Sub-millisecond precision is dropped.
pub(crate) fn ts(t: DateTime<Utc>) -> String {
    crate::audit::format_time(t)
}

pub(crate) fn ts_opt(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

/// Ids are stored in their hyphenated lowercase form.
pub(crate) fn id(u: Uuid) -> String {
    u.to_string()
}

pub(crate) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

pub(crate) fn corrupt(table: &str, column: &str, what: &str) -> LedgerError {
    LedgerError::Corrupt(format!("{table}.{column}: {what}"))
}

pub(crate) fn exchange_state(s: &str) -> Option<ExchangeState> {
    Some(match s {
        "pending" => ExchangeState::Pending,
        "allowed" => ExchangeState::Allowed,
        "denied" => ExchangeState::Denied,
        "failed" => ExchangeState::Failed,
        _ => return None,
    })
}

pub(crate) fn credential_state(s: &str) -> Option<CredentialState> {
    Some(match s {
        "pending" => CredentialState::Pending,
        "active" => CredentialState::Active,
        "revoked" => CredentialState::Revoked,
        "expired" => CredentialState::Expired,
        "failed" => CredentialState::Failed,
        _ => return None,
    })
}

pub(crate) fn backend(s: &str) -> Option<BackendKind> {
    Some(match s {
        "github" => BackendKind::Github,
        "aws" => BackendKind::Aws,
        "vault" => BackendKind::Vault,
        "jwt" => BackendKind::Jwt,
        _ => return None,
    })
}

pub(crate) fn job_kind(s: &str) -> Option<JobKind> {
    Some(match s {
        "revoke_at_ttl" => JobKind::RevokeAtTtl,
        "revoke" => JobKind::Revoke,
        _ => return None,
    })
}

/// Decodes a 64-digit hex hash (a chain head).
pub(crate) fn hash_from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// A copy of an error, for answering every command of a batch whose commit failed.
pub(crate) fn copy_err(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::Unavailable(m) => LedgerError::Unavailable(m.clone()),
        LedgerError::Schema(m) => LedgerError::Schema(m.clone()),
        LedgerError::NotFound => LedgerError::NotFound,
        LedgerError::Conflict(m) => LedgerError::Conflict(m.clone()),
        LedgerError::Corrupt(m) => LedgerError::Corrupt(m.clone()),
    }
}

/// One result row of either store, read by position. Each method answers `None` when the
/// column does not hold that type; [`Cols`] turns that into [`LedgerError::Corrupt`].
pub(crate) trait RawRow {
    fn text(&self, i: usize) -> Option<String>;
    fn opt_text(&self, i: usize) -> Option<Option<String>>;
    fn int(&self, i: usize) -> Option<i64>;
    fn bool(&self, i: usize) -> Option<bool>;
    fn opt_blob(&self, i: usize) -> Option<Option<Vec<u8>>>;
}

/// Typed column access that turns every decoding failure into `Corrupt`.
pub(crate) struct Cols<'a, R: RawRow + ?Sized> {
    row: &'a R,
    table: &'static str,
}

impl<'a, R: RawRow + ?Sized> Cols<'a, R> {
    pub(crate) fn new(row: &'a R, table: &'static str) -> Self {
        Cols { row, table }
    }

    pub(crate) fn text(&self, i: usize, name: &str) -> Result<String, LedgerError> {
        self.row.text(i).ok_or_else(|| corrupt(self.table, name, "not text"))
    }

    pub(crate) fn opt_text(&self, i: usize, name: &str) -> Result<Option<String>, LedgerError> {
        self.row.opt_text(i).ok_or_else(|| corrupt(self.table, name, "not text"))
    }

    pub(crate) fn int(&self, i: usize, name: &str) -> Result<i64, LedgerError> {
        self.row.int(i).ok_or_else(|| corrupt(self.table, name, "not an integer"))
    }

    pub(crate) fn bool(&self, i: usize, name: &str) -> Result<bool, LedgerError> {
        self.row.bool(i).ok_or_else(|| corrupt(self.table, name, "not a boolean"))
    }

    pub(crate) fn opt_blob(&self, i: usize, name: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        self.row.opt_blob(i).ok_or_else(|| corrupt(self.table, name, "not a blob"))
    }

    pub(crate) fn blob(&self, i: usize, name: &str) -> Result<Vec<u8>, LedgerError> {
        self.row.opt_blob(i).flatten().ok_or_else(|| corrupt(self.table, name, "not a blob"))
    }

    pub(crate) fn uuid(&self, i: usize, name: &str) -> Result<Uuid, LedgerError> {
        Uuid::parse_str(&self.text(i, name)?).map_err(|_| corrupt(self.table, name, "not a UUID"))
    }

    pub(crate) fn opt_uuid(&self, i: usize, name: &str) -> Result<Option<Uuid>, LedgerError> {
        self.opt_text(i, name)?
            .map(|s| Uuid::parse_str(&s).map_err(|_| corrupt(self.table, name, "not a UUID")))
            .transpose()
    }

    pub(crate) fn time(&self, i: usize, name: &str) -> Result<DateTime<Utc>, LedgerError> {
        parse_time(&self.text(i, name)?).ok_or_else(|| corrupt(self.table, name, "not an RFC 3339 time"))
    }

    pub(crate) fn opt_time(&self, i: usize, name: &str) -> Result<Option<DateTime<Utc>>, LedgerError> {
        self.opt_text(i, name)?
            .map(|s| parse_time(&s).ok_or_else(|| corrupt(self.table, name, "not an RFC 3339 time")))
            .transpose()
    }

    pub(crate) fn json(&self, i: usize, name: &str) -> Result<Value, LedgerError> {
        serde_json::from_str(&self.text(i, name)?).map_err(|_| corrupt(self.table, name, "not JSON"))
    }
}

/// The columns of [`exchange_from_row`], in order.
macro_rules! exchange_columns {
    () => {
        "id, request_id, created_at, state, error, reason, issuer, subject, repository, workflow, \
         capability, agent, claims, trace, policy_sha256, release_token_sha256, expires_at"
    };
}
pub(crate) use exchange_columns;

pub(crate) fn exchange_from_row<R: RawRow + ?Sized>(row: &R) -> Result<ExchangeRow, LedgerError> {
    let c = Cols::new(row, "exchanges");
    Ok(ExchangeRow {
        id: c.uuid(0, "id")?,
        request_id: c.text(1, "request_id")?,
        created_at: c.time(2, "created_at")?,
        state: exchange_state(&c.text(3, "state")?).ok_or_else(|| corrupt("exchanges", "state", "unknown"))?,
        error: c.opt_text(4, "error")?,
        reason: c.opt_text(5, "reason")?,
        issuer: c.opt_text(6, "issuer")?,
        subject: c.opt_text(7, "subject")?,
        repository: c.opt_text(8, "repository")?,
        workflow: c.opt_text(9, "workflow")?,
        capability: c.opt_text(10, "capability")?,
        agent: c.opt_text(11, "agent")?,
        claims: c.json(12, "claims")?,
        trace: c.json(13, "trace")?,
        policy_sha256: c.opt_text(14, "policy_sha256")?,
        release_token_sha256: c.opt_text(15, "release_token_sha256")?,
        expires_at: c.opt_time(16, "expires_at")?,
    })
}

/// The columns of [`credential_from_row`], in order.
macro_rules! credential_columns {
    () => {
        "id, exchange_id, name, backend, state, agent, capability, issuer, subject, repository, \
         workflow, created_at, expires_at, fingerprint, handle, revoke_requested, revoked_at"
    };
}
pub(crate) use credential_columns;

pub(crate) fn credential_from_row<R: RawRow + ?Sized>(row: &R) -> Result<CredentialRow, LedgerError> {
    let c = Cols::new(row, "credentials");
    Ok(CredentialRow {
        id: c.uuid(0, "id")?,
        exchange_id: c.uuid(1, "exchange_id")?,
        name: c.text(2, "name")?,
        backend: backend(&c.text(3, "backend")?).ok_or_else(|| corrupt("credentials", "backend", "unknown"))?,
        state: credential_state(&c.text(4, "state")?).ok_or_else(|| corrupt("credentials", "state", "unknown"))?,
        agent: c.text(5, "agent")?,
        capability: c.text(6, "capability")?,
        issuer: c.text(7, "issuer")?,
        subject: c.text(8, "subject")?,
        repository: c.opt_text(9, "repository")?,
        workflow: c.opt_text(10, "workflow")?,
        created_at: c.time(11, "created_at")?,
        expires_at: c.time(12, "expires_at")?,
        fingerprint: c.opt_text(13, "fingerprint")?,
        handle: c.opt_blob(14, "handle")?,
        revoke_requested: c.bool(15, "revoke_requested")?,
        revoked_at: c.opt_time(16, "revoked_at")?,
    })
}

/// The columns of [`kill_rule_from_row`], in order.
macro_rules! kill_rule_columns {
    () => {
        "id, selector, reason, created_at, created_by, expires_at, lifted_at"
    };
}
pub(crate) use kill_rule_columns;

pub(crate) fn kill_rule_from_row<R: RawRow + ?Sized>(row: &R) -> Result<KillRule, LedgerError> {
    let c = Cols::new(row, "kill_rules");
    let selector: Selector = serde_json::from_str(&c.text(1, "selector")?)
        .map_err(|_| corrupt("kill_rules", "selector", "not a selector"))?;
    Ok(KillRule {
        id: c.uuid(0, "id")?,
        selector,
        reason: c.text(2, "reason")?,
        created_at: c.time(3, "created_at")?,
        created_by: c.text(4, "created_by")?,
        expires_at: c.opt_time(5, "expires_at")?,
        lifted_at: c.opt_time(6, "lifted_at")?,
    })
}

/// The columns of [`stored_kill_from_row`], in order: a rule's, then what is kept beside it.
macro_rules! stored_kill_columns {
    () => {
        "id, selector, reason, created_at, created_by, expires_at, lifted_at, lifted_by, lift_reason"
    };
}
pub(crate) use stored_kill_columns;

pub(crate) fn stored_kill_from_row<R: RawRow + ?Sized>(row: &R) -> Result<StoredKill, LedgerError> {
    let rule = kill_rule_from_row(row)?;
    let c = Cols::new(row, "kill_rules");
    Ok(StoredKill { rule, lifted_by: c.opt_text(7, "lifted_by")?, lift_reason: c.opt_text(8, "lift_reason")? })
}

/// The columns of [`kill_target_from_row`]: a credential joined with its rule's job, if any.
macro_rules! kill_target_columns {
    () => {
        "c.id, c.backend, c.state, j.id IS NOT NULL, j.outcome"
    };
}
pub(crate) use kill_target_columns;

pub(crate) fn kill_target_from_row<R: RawRow + ?Sized>(row: &R) -> Result<KillTarget, LedgerError> {
    let c = Cols::new(row, "credentials");
    Ok(KillTarget {
        credential_id: c.uuid(0, "id")?,
        backend: backend(&c.text(1, "backend")?).ok_or_else(|| corrupt("credentials", "backend", "unknown"))?,
        state: credential_state(&c.text(2, "state")?).ok_or_else(|| corrupt("credentials", "state", "unknown"))?,
        has_job: c.bool(3, "job")?,
        job_outcome: c.opt_text(4, "outcome")?,
    })
}

/// The columns of [`job_from_row`], in order.
macro_rules! job_columns {
    () => {
        "id, kind, credential_id, kill_id, run_at, attempts, last_error"
    };
}
pub(crate) use job_columns;

pub(crate) fn job_from_row<R: RawRow + ?Sized>(row: &R) -> Result<Job, LedgerError> {
    let c = Cols::new(row, "jobs");
    Ok(Job {
        id: c.uuid(0, "id")?,
        kind: job_kind(&c.text(1, "kind")?).ok_or_else(|| corrupt("jobs", "kind", "unknown"))?,
        credential_id: c.uuid(2, "credential_id")?,
        kill_id: c.opt_uuid(3, "kill_id")?,
        run_at: c.time(4, "run_at")?,
        attempts: u32::try_from(c.int(5, "attempts")?).map_err(|_| corrupt("jobs", "attempts", "out of range"))?,
        last_error: c.opt_text(6, "last_error")?,
    })
}

pub(crate) fn event_from_row<R: RawRow + ?Sized>(row: &R) -> Result<StoredEvent, LedgerError> {
    let c = Cols::new(row, "audit_events");
    Ok(StoredEvent {
        seq: c.int(0, "seq")?,
        prev_hash: c.text(1, "prev_hash")?,
        hash: c.text(2, "hash")?,
        body: c.text(3, "body")?,
    })
}

pub(crate) fn signing_key_from_row<R: RawRow + ?Sized>(row: &R) -> Result<StoredKey, LedgerError> {
    let c = Cols::new(row, "signing_keys");
    Ok(StoredKey {
        id: c.text(0, "id")?,
        algorithm: c.text(1, "algorithm")?,
        sealed_private: c.blob(2, "sealed_private")?,
        public_jwk: c.json(3, "public_jwk")?,
        created_at: c.time(4, "created_at")?,
        signs_from: c.opt_time(5, "signs_from")?,
        retired_at: c.opt_time(6, "retired_at")?,
    })
}

/// One live `jwt` credential that a retirement ends: `id, state, agent, capability, subject,
/// repository, fingerprint`.
pub(crate) struct RetiredCredential {
    pub(crate) id: Uuid,
    pub(crate) state: CredentialState,
    pub(crate) agent: String,
    pub(crate) capability: String,
    pub(crate) subject: String,
    pub(crate) repository: Option<String>,
    pub(crate) fingerprint: Option<String>,
}

pub(crate) fn retired_credential_from_row<R: RawRow + ?Sized>(row: &R) -> Result<RetiredCredential, LedgerError> {
    let c = Cols::new(row, "credentials");
    Ok(RetiredCredential {
        id: c.uuid(0, "id")?,
        state: credential_state(&c.text(1, "state")?).ok_or_else(|| corrupt("credentials", "state", "unknown"))?,
        agent: c.text(2, "agent")?,
        capability: c.text(3, "capability")?,
        subject: c.text(4, "subject")?,
        repository: c.opt_text(5, "repository")?,
        fingerprint: c.opt_text(6, "fingerprint")?,
    })
}

pub(crate) fn sealed_blob_from_row<R: RawRow + ?Sized>(row: &R) -> Result<SealedBlob, LedgerError> {
    let c = Cols::new(row, "sealed blobs");
    let kind = match c.text(0, "kind")?.as_str() {
        "credential" => SealedKind::CredentialHandle,
        "signing_key" => SealedKind::SigningKey,
        _ => return Err(corrupt("sealed blobs", "kind", "unknown")),
    };
    Ok(SealedBlob { kind, id: c.text(1, "id")?, blob: c.blob(2, "blob")? })
}

pub(crate) fn checkpoint_from_row<R: RawRow + ?Sized>(row: &R) -> Result<Checkpoint, LedgerError> {
    let c = Cols::new(row, "audit_checkpoints");
    Ok(Checkpoint {
        seq: c.int(0, "seq")?,
        hash: c.text(1, "hash")?,
        signed_at: c.text(2, "signed_at")?,
        key_id: c.text(3, "key_id")?,
        signature: c.text(4, "signature")?,
    })
}

/// Every live (pending or active) credential with its exchange's identity, grouped by exchange:
/// the columns [`LiveRow`] is read from. Both dialects accept it as is.
pub(crate) const LIVE_CREDENTIALS: &str = "SELECT c.exchange_id, c.id, c.state, c.agent, c.capability, c.issuer, \
     c.subject, c.repository, c.workflow, e.claims, c.backend \
     FROM credentials c JOIN exchanges e ON e.id = c.exchange_id \
     WHERE c.state IN ('pending', 'active') \
     ORDER BY c.exchange_id, c.id";

/// One row of [`LIVE_CREDENTIALS`], as text.
pub(crate) struct LiveRow {
    pub(crate) exchange_id: String,
    pub(crate) id: String,
    pub(crate) state: String,
    pub(crate) agent: String,
    pub(crate) capability: String,
    pub(crate) issuer: String,
    pub(crate) subject: String,
    pub(crate) repository: Option<String>,
    pub(crate) workflow: Option<String>,
    pub(crate) claims: String,
    pub(crate) backend: String,
}

/// Groups the rows of [`LIVE_CREDENTIALS`] (ordered by exchange) into kill subjects.
pub(crate) fn group_live(rows: Vec<LiveRow>) -> Result<Vec<LiveExchange>, LedgerError> {
    let mut out: Vec<LiveExchange> = Vec::new();
    for row in rows {
        let uuid = |s: &str, col: &str| Uuid::parse_str(s).map_err(|_| corrupt("credentials", col, "not a UUID"));
        let exchange_id = uuid(&row.exchange_id, "exchange_id")?;
        let credential = LiveCredential {
            credential_id: uuid(&row.id, "id")?,
            backend: backend(&row.backend).ok_or_else(|| corrupt("credentials", "backend", "unknown"))?,
            state: credential_state(&row.state).ok_or_else(|| corrupt("credentials", "state", "unknown"))?,
        };
        let cid = credential.credential_id;
        match out.last_mut() {
            Some(last) if last.id == exchange_id => {
                last.subject.credentials.push(cid);
                last.credentials.push(credential);
            }
            _ => {
                let (claims, claims_readable) = match serde_json::from_str::<serde_json::Value>(&row.claims) {
                    Ok(serde_json::Value::Object(map)) => (map, true),
                    Ok(serde_json::Value::Null) => (serde_json::Map::new(), true),
                    _ => (serde_json::Map::new(), false),
                };
                let subject = KillSubject {
                    agent: row.agent,
                    capability: row.capability,
                    issuer: row.issuer,
                    subject: row.subject,
                    repository: row.repository,
                    workflow: row.workflow,
                    claims,
                    credentials: vec![cid],
                };
                out.push(LiveExchange { id: exchange_id, subject, claims_readable, credentials: vec![credential] });
            }
        }
    }
    Ok(out)
}

/// One exchange that still holds pending or active credentials.
pub(crate) struct LiveExchange {
    id: Uuid,
    /// The exchange's identity; `credentials` lists its live credentials, because a
    /// `credential` selector names the exchange that holds it: an exchange's grants are issued
    /// and withdrawn together (DESIGN step 6), as activation judges them.
    subject: KillSubject,
    /// False when the stored claims do not decode.
    claims_readable: bool,
    pub(crate) credentials: Vec<LiveCredential>,
}

impl LiveExchange {
    pub(crate) fn matched_by(&self, selector: &Selector) -> bool {
        if self.claims_readable || selector.claims.is_empty() {
            return selector.matches(&self.subject);
        }
        // Claims that cannot be read cannot clear an identity: judged on every other field, so
        // that a damaged row errs towards revocation instead of blocking the kill.
        tracing::warn!(exchange_id = %self.id, "ledger.kill.unreadable_claims");
        let mut without_claims = selector.clone();
        without_claims.claims.clear();
        without_claims.matches(&self.subject)
    }
}
