//! Reads, on the pool (or, for the few the writer needs, on its connection): the same queries
//! and answers as the SQLite store's, in PostgreSQL's dialect.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, PgPool};

use super::db_err;
use crate::audit::StoredEvent;
use crate::kill::{KillRule, Selector};
use crate::ledger::rows::{
    self, LiveExchange, LiveRow, checkpoint_from_row, credential_columns, credential_from_row, event_from_row,
    exchange_columns, exchange_from_row, kill_rule_columns, kill_rule_from_row, kill_target_columns,
    kill_target_from_row, sealed_blob_from_row, signing_key_from_row, stored_kill_columns, stored_kill_from_row, ts,
};
use crate::ledger::{
    BlobCursor, Checkpoint, CredentialQuery, CredentialRow, EventQuery, ExchangeQuery, ExchangeRow, KillPage,
    KillState, KillTarget, LedgerError, LiveCount, LiveCredential, SealedBlob, SealedKind, StateFilter, StoredKey,
    StoredKill,
};

fn decode_all<T>(rows: Vec<PgRow>, decode: impl Fn(&PgRow) -> Result<T, LedgerError>) -> Result<Vec<T>, LedgerError> {
    rows.iter().map(decode).collect()
}

fn page_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

pub(super) async fn kill_epoch(e: impl PgExecutor<'_>) -> Result<i64, LedgerError> {
    sqlx::query_scalar::<_, i64>("SELECT epoch FROM kill_epoch WHERE id = 1")
        .fetch_optional(e)
        .await
        .map_err(db_err)?
        .ok_or_else(|| LedgerError::Corrupt("kill_epoch: the row is missing".into()))
}

/// The kill rules in force at `now`, oldest first.
pub(super) async fn rules_in_force(e: impl PgExecutor<'_>, now: DateTime<Utc>) -> Result<Vec<KillRule>, LedgerError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        kill_rule_columns!(),
        " FROM kill_rules WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > $1) ORDER BY created_at, id"
    ))
    .bind(ts(now))
    .fetch_all(e)
    .await
    .map_err(db_err)?;
    let mut rules = decode_all(rows, kill_rule_from_row)?;
    // The text comparison works at millisecond precision; this one is exact.
    rules.retain(|r| r.in_force(now));
    Ok(rules)
}

/// The epoch and the rules from one snapshot: a cache must never hold a new epoch with old rules.
pub(super) async fn kill_state(pool: &PgPool, now: DateTime<Utc>) -> Result<KillState, LedgerError> {
    let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(db_err)?;
    let epoch = kill_epoch(&mut *tx).await?;
    let rules = rules_in_force(&mut *tx, now).await?;
    tx.commit().await.map_err(db_err)?;
    Ok(KillState { epoch, rules })
}

/// Every exchange that holds pending or active credentials, as a kill subject.
pub(super) async fn live_exchanges(e: impl PgExecutor<'_>) -> Result<Vec<LiveExchange>, LedgerError> {
    let rows = sqlx::query(rows::LIVE_CREDENTIALS).fetch_all(e).await.map_err(db_err)?;
    let rows = decode_all(rows, |r| {
        let c = rows::Cols::new(r, "credentials");
        Ok(LiveRow {
            exchange_id: c.text(0, "exchange_id")?,
            id: c.text(1, "id")?,
            state: c.text(2, "state")?,
            agent: c.text(3, "agent")?,
            capability: c.text(4, "capability")?,
            issuer: c.text(5, "issuer")?,
            subject: c.text(6, "subject")?,
            repository: c.opt_text(7, "repository")?,
            workflow: c.opt_text(8, "workflow")?,
            claims: c.text(9, "claims")?,
            backend: c.text(10, "backend")?,
        })
    })?;
    rows::group_live(rows)
}

pub(super) async fn kill_matches(pool: &PgPool, selector: &Selector) -> Result<Vec<LiveCredential>, LedgerError> {
    Ok(live_exchanges(pool).await?.into_iter().filter(|e| e.matched_by(selector)).flat_map(|e| e.credentials).collect())
}

pub(super) async fn exchange(pool: &PgPool, id: &str) -> Result<Option<ExchangeRow>, LedgerError> {
    let row = sqlx::query(concat!("SELECT ", exchange_columns!(), " FROM exchanges WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    row.as_ref().map(exchange_from_row).transpose()
}

pub(super) async fn credential(pool: &PgPool, id: &str) -> Result<Option<CredentialRow>, LedgerError> {
    let row = sqlx::query(concat!("SELECT ", credential_columns!(), " FROM credentials WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    row.as_ref().map(credential_from_row).transpose()
}

pub(super) async fn credentials_of_exchange(
    pool: &PgPool,
    exchange_id: &str,
) -> Result<Vec<CredentialRow>, LedgerError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        credential_columns!(),
        " FROM credentials WHERE exchange_id = $1 ORDER BY created_at, id"
    ))
    .bind(exchange_id)
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, credential_from_row)
}

pub(super) async fn pending_credentials(
    pool: &PgPool,
    before: DateTime<Utc>,
) -> Result<Vec<CredentialRow>, LedgerError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        credential_columns!(),
        " FROM credentials WHERE state = 'pending' AND created_at < $1 ORDER BY created_at, id"
    ))
    .bind(ts(before))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, credential_from_row)
}

pub(super) async fn jti_spent(pool: &PgPool, issuer: &str, jti: &str, capability: &str) -> Result<bool, LedgerError> {
    let found: Option<i32> =
        sqlx::query_scalar("SELECT 1 FROM spent_jti WHERE issuer = $1 AND jti = $2 AND capability = $3")
            .bind(issuer)
            .bind(jti)
            .bind(capability)
            .fetch_optional(pool)
            .await
            .map_err(db_err)?;
    Ok(found.is_some())
}

pub(super) async fn kill_rule(pool: &PgPool, id: &str) -> Result<Option<StoredKill>, LedgerError> {
    let row = sqlx::query(concat!("SELECT ", stored_kill_columns!(), " FROM kill_rules WHERE id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await
        .map_err(db_err)?;
    row.as_ref().map(stored_kill_from_row).transpose()
}

pub(super) async fn kill_rules(pool: &PgPool, page: &KillPage) -> Result<Vec<StoredKill>, LedgerError> {
    let (after_at, after_id) = match page.after {
        Some((at, id)) => (Some(ts(at)), Some(id.to_string())),
        None => (None, None),
    };
    let rows = sqlx::query(concat!(
        "SELECT ",
        stored_kill_columns!(),
        " FROM kill_rules WHERE ($1::text IS NULL OR (created_at, id) > ($1, $2)) \
         AND ($3::text IS NULL OR created_at >= $3) AND ($4::text IS NULL OR created_at < $4) \
         ORDER BY created_at, id LIMIT $5"
    ))
    .bind(after_at)
    .bind(after_id)
    .bind(page.since.map(ts))
    .bind(page.until.map(ts))
    .bind(page_limit(page.limit))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, stored_kill_from_row)
}

pub(super) async fn kill_targets(pool: &PgPool, kill_id: &str) -> Result<Vec<KillTarget>, LedgerError> {
    let rows = sqlx::query(concat!(
        "SELECT ",
        kill_target_columns!(),
        " FROM credentials c LEFT JOIN jobs j ON j.credential_id = c.id AND j.kill_id = $1 \
         WHERE j.id IS NOT NULL OR c.revoke_requested_by = $1 ORDER BY c.id"
    ))
    .bind(kill_id)
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, kill_target_from_row)
}

pub(super) async fn job_queue_depth(pool: &PgPool) -> Result<u64, LedgerError> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE done_at IS NULL").fetch_one(pool).await.map_err(db_err)?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) async fn events(e: impl PgExecutor<'_>, after: i64, limit: i64) -> Result<Vec<StoredEvent>, LedgerError> {
    let rows = sqlx::query("SELECT seq, prev_hash, hash, body FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT $2")
        .bind(after)
        .bind(limit)
        .fetch_all(e)
        .await
        .map_err(db_err)?;
    decode_all(rows, event_from_row)
}

pub(super) async fn signing_keys(pool: &PgPool) -> Result<Vec<StoredKey>, LedgerError> {
    let rows = sqlx::query(
        "SELECT id, algorithm, sealed_private, public_jwk, created_at, signs_from, retired_at FROM signing_keys \
         ORDER BY created_at, id",
    )
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, signing_key_from_row)
}

/// A page of sealed blobs: credential handles by id (through the partial index of handles that
/// are left), then signing keys by id, each table read by its own keyset query.
pub(super) async fn sealed_blobs(
    pool: &PgPool,
    after: Option<&BlobCursor>,
    limit: usize,
) -> Result<Vec<SealedBlob>, LedgerError> {
    let mut page = Vec::new();
    let after_key = match after {
        Some(BlobCursor { kind: SealedKind::SigningKey, id }) => id.as_str(),
        credential => {
            let rows = sqlx::query(
                "SELECT 'credential', id, handle FROM credentials \
                 WHERE handle IS NOT NULL AND id > $1 ORDER BY id LIMIT $2",
            )
            .bind(credential.map_or("", |c| c.id.as_str()))
            .bind(page_limit(limit))
            .fetch_all(pool)
            .await
            .map_err(db_err)?;
            page = decode_all(rows, sealed_blob_from_row)?;
            ""
        }
    };
    if page.len() < limit {
        let rows = sqlx::query(
            "SELECT 'signing_key', id, sealed_private FROM signing_keys WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after_key)
        .bind(page_limit(limit - page.len()))
        .fetch_all(pool)
        .await
        .map_err(db_err)?;
        page.extend(decode_all(rows, sealed_blob_from_row)?);
    }
    Ok(page)
}

fn before(cursor: Option<(DateTime<Utc>, uuid::Uuid)>) -> (Option<String>, Option<String>) {
    match cursor {
        Some((at, id)) => (Some(ts(at)), Some(id.to_string())),
        None => (None, None),
    }
}

/// A page of credentials, newest first; never their handles.
pub(super) async fn list_credentials(pool: &PgPool, q: &CredentialQuery) -> Result<Vec<CredentialRow>, LedgerError> {
    let (before_at, before_id) = before(q.before);
    let (state, live) = match q.state {
        Some(StateFilter::Is(s)) => (Some(s.as_str()), false),
        Some(StateFilter::Live) => (None, true),
        None => (None, false),
    };
    let rows = sqlx::query(concat!(
        "SELECT ",
        credential_columns!(),
        " FROM credentials WHERE ($1::text IS NULL OR (created_at, id) < ($1, $2)) \
         AND ($3::text IS NULL OR agent = $3) AND ($4::text IS NULL OR capability = $4) \
         AND ($5::text IS NULL OR repository = $5) AND ($6::text IS NULL OR workflow = $6) \
         AND ($7::text IS NULL OR subject = $7) AND ($8::text IS NULL OR backend = $8) \
         AND ($9::text IS NULL OR exchange_id = $9) AND ($10::text IS NULL OR state = $10) \
         AND (NOT $11 OR (state IN ('pending', 'active') AND expires_at > $12)) \
         AND ($13::text IS NULL OR created_at >= $13) AND ($14::text IS NULL OR created_at < $14) \
         ORDER BY created_at DESC, id DESC LIMIT $15"
    ))
    .bind(before_at)
    .bind(before_id)
    .bind(&q.agent)
    .bind(&q.capability)
    .bind(&q.repository)
    .bind(&q.workflow)
    .bind(&q.subject)
    .bind(q.backend.map(|b| b.as_str()))
    .bind(q.exchange.map(|e| e.to_string()))
    .bind(state)
    .bind(live)
    .bind(q.now.map(ts))
    .bind(q.since.map(ts))
    .bind(q.until.map(ts))
    .bind(page_limit(q.limit))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    let mut rows = decode_all(rows, credential_from_row)?;
    for r in &mut rows {
        r.handle = None;
    }
    Ok(rows)
}

pub(super) async fn list_exchanges(pool: &PgPool, q: &ExchangeQuery) -> Result<Vec<ExchangeRow>, LedgerError> {
    let (before_at, before_id) = before(q.before);
    let rows = sqlx::query(concat!(
        "SELECT ",
        exchange_columns!(),
        " FROM exchanges e WHERE ($1::text IS NULL OR (created_at, id) < ($1, $2)) \
         AND ($3::text IS NULL OR agent = $3) AND ($4::text IS NULL OR capability = $4) \
         AND ($5::text IS NULL OR repository = $5) AND ($6::text IS NULL OR workflow = $6) \
         AND ($7::text IS NULL OR subject = $7) AND ($8::text IS NULL OR issuer = $8) \
         AND ($9::text IS NULL OR state = $9) \
         AND ($10::text IS NULL OR EXISTS (SELECT 1 FROM credentials c WHERE c.exchange_id = e.id AND c.backend = $10)) \
         AND ($11::text IS NULL OR created_at >= $11) AND ($12::text IS NULL OR created_at < $12) \
         ORDER BY created_at DESC, id DESC LIMIT $13"
    ))
    .bind(before_at)
    .bind(before_id)
    .bind(&q.agent)
    .bind(&q.capability)
    .bind(&q.repository)
    .bind(&q.workflow)
    .bind(&q.subject)
    .bind(&q.issuer)
    .bind(q.decision.map(|d| d.as_str()))
    .bind(q.backend.map(|b| b.as_str()))
    .bind(q.since.map(ts))
    .bind(q.until.map(ts))
    .bind(page_limit(q.limit))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, exchange_from_row)
}

/// Audit events matching a query, oldest first; fields are read from the stored canonical body.
pub(super) async fn list_events(pool: &PgPool, q: &EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
    let (event, prefix) = match q.event.as_deref() {
        Some(e) => match e.strip_suffix('*') {
            Some(p) => (None, Some(format!("{}%", p.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")))),
            None => (Some(e.to_owned()), None),
        },
        None => (None, None),
    };
    let rows = sqlx::query(
        "SELECT seq, prev_hash, hash, body FROM audit_events WHERE seq > $1 \
         AND ($2::text IS NULL OR body::jsonb ->> 'event' = $2) \
         AND ($3::text IS NULL OR body::jsonb ->> 'event' LIKE $3 ESCAPE '\\') \
         AND ($4::text IS NULL OR body::jsonb ->> 'actor' = $4) \
         AND ($5::text IS NULL OR body::jsonb ->> 'agent' = $5) \
         AND ($6::text IS NULL OR body::jsonb ->> 'capability' = $6) \
         AND ($7::text IS NULL OR body::jsonb ->> 'repository' = $7) \
         AND ($8::text IS NULL OR body::jsonb ->> 'subject' = $8) \
         AND ($9::text IS NULL OR body::jsonb ->> 'credential_id' = $9) \
         AND ($10::text IS NULL OR (body::jsonb ->> 'time') COLLATE \"C\" >= $10) \
         AND ($11::text IS NULL OR (body::jsonb ->> 'time') COLLATE \"C\" < $11) \
         ORDER BY seq LIMIT $12",
    )
    .bind(q.after)
    .bind(event)
    .bind(prefix)
    .bind(&q.actor)
    .bind(&q.agent)
    .bind(&q.capability)
    .bind(&q.repository)
    .bind(&q.subject)
    .bind(&q.credential)
    .bind(q.since.map(ts))
    .bind(q.until.map(ts))
    .bind(page_limit(q.limit))
    .fetch_all(pool)
    .await
    .map_err(db_err)?;
    decode_all(rows, event_from_row)
}

pub(super) async fn audit_head(pool: &PgPool) -> Result<(i64, String), LedgerError> {
    let row: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_optional(pool).await.map_err(db_err)?;
    row.ok_or_else(|| LedgerError::Corrupt("audit_head: the row is missing".into()))
}

pub(super) async fn checkpoints(e: impl PgExecutor<'_>) -> Result<Vec<Checkpoint>, LedgerError> {
    let rows = sqlx::query("SELECT seq, hash, signed_at, key_id, signature FROM audit_checkpoints ORDER BY seq")
        .fetch_all(e)
        .await
        .map_err(db_err)?;
    decode_all(rows, checkpoint_from_row)
}

pub(super) async fn latest_checkpoint(pool: &PgPool) -> Result<Option<Checkpoint>, LedgerError> {
    let row =
        sqlx::query("SELECT seq, hash, signed_at, key_id, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1")
            .fetch_optional(pool)
            .await
            .map_err(db_err)?;
    row.as_ref().map(checkpoint_from_row).transpose()
}

pub(super) async fn stream_position(pool: &PgPool, name: &str) -> Result<Option<i64>, LedgerError> {
    sqlx::query_scalar("SELECT seq FROM audit_stream_positions WHERE name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .map_err(db_err)
}

/// The identity's live exchanges at `now`, other than `except`.
pub(super) async fn live_count(
    e: impl PgExecutor<'_>,
    agent: &str,
    repository: Option<&str>,
    now: DateTime<Utc>,
    except: Option<&str>,
) -> Result<LiveCount, LedgerError> {
    let (count, first_end): (i64, Option<String>) = sqlx::query_as(
        "SELECT COUNT(DISTINCT exchange_id), MIN(expires_at) FROM credentials \
         WHERE agent = $1 AND repository IS NOT DISTINCT FROM $2 AND state IN ('pending', 'active') \
         AND expires_at > $3 AND ($4::text IS NULL OR exchange_id <> $4)",
    )
    .bind(agent)
    .bind(repository)
    .bind(ts(now))
    .bind(except)
    .fetch_one(e)
    .await
    .map_err(db_err)?;
    let first_end = first_end
        .map(|t| rows::parse_time(&t).ok_or_else(|| rows::corrupt("credentials", "expires_at", "not a time")))
        .transpose()?;
    Ok(LiveCount { exchanges: u64::try_from(count).unwrap_or(0), first_end })
}
