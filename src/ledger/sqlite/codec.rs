//! How values are written to and read back from SQLite columns, and how SQLite errors map to
//! [`LedgerError`].
//!
//! Invariant: reading never panics. Anything in a column that does not decode (a bad timestamp,
//! an unknown state, unparsable JSON) is [`LedgerError::Corrupt`], naming the table and column but
//! never the value, which could be sensitive.

use chrono::{DateTime, Utc};
use rusqlite::{ErrorCode, Row};
use serde_json::Value;
use uuid::Uuid;

use super::super::{
    CredentialRow, CredentialState, ExchangeRow, ExchangeState, Job, JobKind, KillTarget, LedgerError, StoredKey,
    StoredKill,
};
use crate::audit::StoredEvent;
use crate::kill::{KillRule, Selector};
use crate::policy::BackendKind;

/// Timestamps are stored as fixed-width RFC 3339 UTC strings with milliseconds
/// (`2025-01-31T12:00:00.000Z`), the audit time format, so that text order is time order and
/// range conditions work on the text. Sub-millisecond precision is dropped.
pub(super) fn ts(t: DateTime<Utc>) -> String {
    crate::audit::format_time(t)
}

pub(super) fn ts_opt(t: Option<DateTime<Utc>>) -> Option<String> {
    t.map(ts)
}

/// Ids are stored in their hyphenated lowercase form.
pub(super) fn id(u: Uuid) -> String {
    u.to_string()
}

/// Maps an SQLite error. Conditions an operator must fix (disk full, read-only file, I/O errors,
/// a lock held too long) are `Unavailable`; constraint violations are `Conflict` (a duplicate id,
/// a reference to a row that does not exist); a damaged file or a column that does not decode is
/// `Corrupt`.
pub(super) fn db_err(e: rusqlite::Error) -> LedgerError {
    use rusqlite::Error as E;
    match &e {
        E::SqliteFailure(f, _) => match f.code {
            ErrorCode::ConstraintViolation => LedgerError::Conflict(e.to_string()),
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => LedgerError::Corrupt(e.to_string()),
            _ => LedgerError::Unavailable(e.to_string()),
        },
        E::FromSqlConversionFailure(..)
        | E::IntegralValueOutOfRange(..)
        | E::Utf8Error(..)
        | E::InvalidColumnType(..) => LedgerError::Corrupt(e.to_string()),
        _ => LedgerError::Unavailable(e.to_string()),
    }
}

/// A copy of an error, for answering every command of a batch whose commit failed.
pub(super) fn copy_err(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::Unavailable(m) => LedgerError::Unavailable(m.clone()),
        LedgerError::Schema(m) => LedgerError::Schema(m.clone()),
        LedgerError::NotFound => LedgerError::NotFound,
        LedgerError::Conflict(m) => LedgerError::Conflict(m.clone()),
        LedgerError::Corrupt(m) => LedgerError::Corrupt(m.clone()),
    }
}

fn corrupt(table: &str, column: &str, what: &str) -> LedgerError {
    LedgerError::Corrupt(format!("{table}.{column}: {what}"))
}

/// Typed column access that turns every decoding failure into `Corrupt`.
pub(super) struct Cols<'a, 'r> {
    row: &'a Row<'r>,
    table: &'static str,
}

impl<'a, 'r> Cols<'a, 'r> {
    pub(super) fn new(row: &'a Row<'r>, table: &'static str) -> Self {
        Cols { row, table }
    }

    pub(super) fn text(&self, i: usize, name: &str) -> Result<String, LedgerError> {
        self.row.get::<_, String>(i).map_err(|_| corrupt(self.table, name, "not text"))
    }

    pub(super) fn opt_text(&self, i: usize, name: &str) -> Result<Option<String>, LedgerError> {
        self.row.get::<_, Option<String>>(i).map_err(|_| corrupt(self.table, name, "not text"))
    }

    pub(super) fn int(&self, i: usize, name: &str) -> Result<i64, LedgerError> {
        self.row.get::<_, i64>(i).map_err(|_| corrupt(self.table, name, "not an integer"))
    }

    pub(super) fn bool(&self, i: usize, name: &str) -> Result<bool, LedgerError> {
        self.row.get::<_, bool>(i).map_err(|_| corrupt(self.table, name, "not a boolean"))
    }

    pub(super) fn opt_blob(&self, i: usize, name: &str) -> Result<Option<Vec<u8>>, LedgerError> {
        self.row.get::<_, Option<Vec<u8>>>(i).map_err(|_| corrupt(self.table, name, "not a blob"))
    }

    pub(super) fn blob(&self, i: usize, name: &str) -> Result<Vec<u8>, LedgerError> {
        self.row.get::<_, Vec<u8>>(i).map_err(|_| corrupt(self.table, name, "not a blob"))
    }

    pub(super) fn uuid(&self, i: usize, name: &str) -> Result<Uuid, LedgerError> {
        Uuid::parse_str(&self.text(i, name)?).map_err(|_| corrupt(self.table, name, "not a UUID"))
    }

    pub(super) fn opt_uuid(&self, i: usize, name: &str) -> Result<Option<Uuid>, LedgerError> {
        self.opt_text(i, name)?
            .map(|s| Uuid::parse_str(&s).map_err(|_| corrupt(self.table, name, "not a UUID")))
            .transpose()
    }

    pub(super) fn time(&self, i: usize, name: &str) -> Result<DateTime<Utc>, LedgerError> {
        parse_time(&self.text(i, name)?).ok_or_else(|| corrupt(self.table, name, "not an RFC 3339 time"))
    }

    pub(super) fn opt_time(&self, i: usize, name: &str) -> Result<Option<DateTime<Utc>>, LedgerError> {
        self.opt_text(i, name)?
            .map(|s| parse_time(&s).ok_or_else(|| corrupt(self.table, name, "not an RFC 3339 time")))
            .transpose()
    }

    pub(super) fn json(&self, i: usize, name: &str) -> Result<Value, LedgerError> {
        serde_json::from_str(&self.text(i, name)?).map_err(|_| corrupt(self.table, name, "not JSON"))
    }
}

pub(super) fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

pub(super) fn exchange_state(s: &str) -> Option<ExchangeState> {
    Some(match s {
        "pending" => ExchangeState::Pending,
        "allowed" => ExchangeState::Allowed,
        "denied" => ExchangeState::Denied,
        "failed" => ExchangeState::Failed,
        _ => return None,
    })
}

pub(super) fn credential_state(s: &str) -> Option<CredentialState> {
    Some(match s {
        "pending" => CredentialState::Pending,
        "active" => CredentialState::Active,
        "revoked" => CredentialState::Revoked,
        "expired" => CredentialState::Expired,
        "failed" => CredentialState::Failed,
        _ => return None,
    })
}

pub(super) fn backend(s: &str) -> Option<BackendKind> {
    Some(match s {
        "github" => BackendKind::Github,
        "aws" => BackendKind::Aws,
        "vault" => BackendKind::Vault,
        "jwt" => BackendKind::Jwt,
        _ => return None,
    })
}

fn job_kind(s: &str) -> Option<JobKind> {
    Some(match s {
        "revoke_at_ttl" => JobKind::RevokeAtTtl,
        "revoke" => JobKind::Revoke,
        _ => return None,
    })
}

/// The columns of [`exchange_from_row`], in order.
macro_rules! exchange_columns {
    () => {
        "id, request_id, created_at, state, error, reason, issuer, subject, repository, workflow, \
         capability, agent, claims, trace, policy_sha256, release_token_sha256, expires_at"
    };
}
pub(super) use exchange_columns;

pub(super) fn exchange_from_row(row: &Row<'_>) -> Result<ExchangeRow, LedgerError> {
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
pub(super) use credential_columns;

pub(super) fn credential_from_row(row: &Row<'_>) -> Result<CredentialRow, LedgerError> {
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
pub(super) use kill_rule_columns;

pub(super) fn kill_rule_from_row(row: &Row<'_>) -> Result<KillRule, LedgerError> {
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
pub(super) use stored_kill_columns;

pub(super) fn stored_kill_from_row(row: &Row<'_>) -> Result<StoredKill, LedgerError> {
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
pub(super) use kill_target_columns;

pub(super) fn kill_target_from_row(row: &Row<'_>) -> Result<KillTarget, LedgerError> {
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
pub(super) use job_columns;

pub(super) fn job_from_row(row: &Row<'_>) -> Result<Job, LedgerError> {
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

pub(super) fn event_from_row(row: &Row<'_>) -> Result<StoredEvent, LedgerError> {
    let c = Cols::new(row, "audit_events");
    Ok(StoredEvent {
        seq: c.int(0, "seq")?,
        prev_hash: c.text(1, "prev_hash")?,
        hash: c.text(2, "hash")?,
        body: c.text(3, "body")?,
    })
}

pub(super) fn signing_key_from_row(row: &Row<'_>) -> Result<StoredKey, LedgerError> {
    let c = Cols::new(row, "signing_keys");
    Ok(StoredKey {
        id: c.text(0, "id")?,
        algorithm: c.text(1, "algorithm")?,
        sealed_private: c.blob(2, "sealed_private")?,
        public_jwk: c.json(3, "public_jwk")?,
        created_at: c.time(4, "created_at")?,
    })
}

/// Decodes a 64-digit hex hash (the chain head read at open).
pub(super) fn hash_from_hex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Runs a cached statement and decodes at most one row.
pub(super) fn query_opt<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    decode: impl FnOnce(&Row<'_>) -> Result<T, LedgerError>,
) -> Result<Option<T>, LedgerError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    match rows.next().map_err(db_err)? {
        Some(row) => decode(row).map(Some),
        None => Ok(None),
    }
}

/// Runs a cached statement and decodes every row.
pub(super) fn query_all<T>(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
    mut decode: impl FnMut(&Row<'_>) -> Result<T, LedgerError>,
) -> Result<Vec<T>, LedgerError> {
    let mut stmt = conn.prepare_cached(sql).map_err(db_err)?;
    let mut rows = stmt.query(params).map_err(db_err)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(db_err)? {
        out.push(decode(row)?);
    }
    Ok(out)
}

/// Runs a cached statement that returns no rows; answers the number of rows changed.
pub(super) fn exec(
    conn: &rusqlite::Connection,
    sql: &str,
    params: impl rusqlite::Params,
) -> Result<usize, LedgerError> {
    conn.prepare_cached(sql).map_err(db_err)?.execute(params).map_err(db_err)
}
