//! Reads: a small pool of connections of their own, used from blocking tasks.
//!
//! WAL lets readers run beside the writer: a read sees the last committed state and never waits
//! for (or holds up) a batch being written.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, params, params_from_iter};
use tokio::sync::Semaphore;

use super::codec::{
    Cols, checkpoint_from_row, credential_columns, credential_from_row, db_err, event_from_row, exchange_columns,
    exchange_from_row, kill_target_columns, kill_target_from_row, query_all, query_opt, sealed_blob_from_row,
    signing_key_from_row, stored_kill_columns, stored_kill_from_row, ts,
};
use super::ops::{live_exchanges, rules_in_force};
use crate::audit::StoredEvent;
use crate::kill::Selector;
use crate::ledger::{
    BlobCursor, Checkpoint, CredentialQuery, CredentialRow, EventQuery, ExchangeQuery, ExchangeRow, KillPage,
    KillState, KillTarget, LedgerError, LiveCount, LiveCredential, SealedBlob, SealedKind, StateFilter, StoredKey,
    StoredKill,
};

pub(super) const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read connections. `permits` bounds how many reads run at once to the number of connections,
/// so a read always finds one (or opens a replacement if one was lost to a panic).
#[derive(Debug)]
pub(super) struct ReadPool {
    path: PathBuf,
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl ReadPool {
    pub(super) fn open(path: PathBuf, size: usize) -> Result<Arc<ReadPool>, LedgerError> {
        let conns = (0..size).map(|_| open_reader(&path)).collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(ReadPool { path, conns: Mutex::new(conns), permits: Arc::new(Semaphore::new(size)) }))
    }

    /// Runs `f` on a read connection in a blocking task.
    pub(super) async fn run<T, F>(self: &Arc<Self>, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, LedgerError> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LedgerError::Unavailable("the ledger is closed".into()))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let conn = match pool.conns.lock().unwrap_or_else(|p| p.into_inner()).pop() {
                Some(c) => c,
                None => open_reader(&pool.path)?,
            };
            let out = f(&conn);
            pool.conns.lock().unwrap_or_else(|p| p.into_inner()).push(conn);
            out
        })
        .await
        .map_err(|e| LedgerError::Unavailable(format!("ledger read failed: {e}")))?
    }
}

/// A connection to the database at `path` with `flags` (each used by one thread at a time), that
/// waits up to [`BUSY_TIMEOUT`] for a lock another connection holds.
pub(super) fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, LedgerError> {
    let conn = Connection::open_with_flags(path, flags | OpenFlags::SQLITE_OPEN_NO_MUTEX).map_err(db_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(db_err)?;
    Ok(conn)
}

fn open_reader(path: &Path) -> Result<Connection, LedgerError> {
    let conn = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    // A read connection must never write, whatever a bug asks of it.
    conn.pragma_update(None, "query_only", true).map_err(db_err)?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(conn)
}

pub(super) fn exchange(conn: &Connection, id: &str) -> Result<Option<ExchangeRow>, LedgerError> {
    query_opt(conn, concat!("SELECT ", exchange_columns!(), " FROM exchanges WHERE id = ?1"), [id], |r| {
        exchange_from_row(r)
    })
}

pub(super) fn credential(conn: &Connection, id: &str) -> Result<Option<CredentialRow>, LedgerError> {
    query_opt(conn, concat!("SELECT ", credential_columns!(), " FROM credentials WHERE id = ?1"), [id], |r| {
        credential_from_row(r)
    })
}

pub(super) fn credentials_of_exchange(conn: &Connection, exchange_id: &str) -> Result<Vec<CredentialRow>, LedgerError> {
    query_all(
        conn,
        concat!("SELECT ", credential_columns!(), " FROM credentials WHERE exchange_id = ?1 ORDER BY created_at, id"),
        [exchange_id],
        |r| credential_from_row(r),
    )
}

pub(super) fn pending_credentials(conn: &Connection, before: DateTime<Utc>) -> Result<Vec<CredentialRow>, LedgerError> {
    query_all(
        conn,
        concat!(
            "SELECT ",
            credential_columns!(),
            " FROM credentials WHERE state = 'pending' AND created_at < ?1 ORDER BY created_at, id"
        ),
        [ts(before)],
        |r| credential_from_row(r),
    )
}

pub(super) fn jti_spent(conn: &Connection, issuer: &str, jti: &str, capability: &str) -> Result<bool, LedgerError> {
    Ok(query_opt(
        conn,
        "SELECT 1 FROM spent_jti WHERE issuer = ?1 AND jti = ?2 AND capability = ?3",
        params![issuer, jti, capability],
        |_| Ok(()),
    )?
    .is_some())
}

/// The epoch and the rules from one snapshot: a cache must never hold a new epoch with old
/// rules, or an activation would trust a check that missed a rule.
pub(super) fn kill_state(conn: &Connection, now: DateTime<Utc>) -> Result<KillState, LedgerError> {
    let tx = conn.unchecked_transaction().map_err(db_err)?;
    let epoch = query_opt(&tx, "SELECT epoch FROM kill_epoch WHERE id = 1", [], |r| {
        Cols::new(r, "kill_epoch").int(0, "epoch")
    })?
    .ok_or_else(|| LedgerError::Corrupt("kill_epoch: the row is missing".into()))?;
    let rules = rules_in_force(&tx, now)?;
    tx.finish().map_err(db_err)?;
    Ok(KillState { epoch, rules })
}

pub(super) fn kill_rule(conn: &Connection, id: &str) -> Result<Option<StoredKill>, LedgerError> {
    query_opt(conn, concat!("SELECT ", stored_kill_columns!(), " FROM kill_rules WHERE id = ?1"), [id], |r| {
        stored_kill_from_row(r)
    })
}

/// A page of rules, oldest first, after the cursor's `(created_at, id)`.
pub(super) fn kill_rules(conn: &Connection, page: &KillPage) -> Result<Vec<StoredKill>, LedgerError> {
    let (after_at, after_id) = match page.after {
        Some((at, id)) => (Some(ts(at)), Some(id.to_string())),
        None => (None, None),
    };
    query_all(
        conn,
        concat!(
            "SELECT ",
            stored_kill_columns!(),
            " FROM kill_rules WHERE (?1 IS NULL OR (created_at, id) > (?1, ?2)) \
             AND (?3 IS NULL OR created_at >= ?3) AND (?4 IS NULL OR created_at < ?4) \
             ORDER BY created_at, id LIMIT ?5"
        ),
        params![
            after_at,
            after_id,
            page.since.map(ts),
            page.until.map(ts),
            i64::try_from(page.limit).unwrap_or(i64::MAX)
        ],
        |r| stored_kill_from_row(r),
    )
}

/// Every credential the rule gave a job or marked.
pub(super) fn kill_targets(conn: &Connection, kill_id: &str) -> Result<Vec<KillTarget>, LedgerError> {
    // Each credential's jobs are looked up by credential. Left to itself SQLite looks them up by
    // `kill_id`, which every job of the kill shares: quadratic, a minute for a kill of 10,000
    // credentials, on the kill call's answer and on every `GET /v1/kills/{id}`.
    query_all(
        conn,
        concat!(
            "SELECT ",
            kill_target_columns!(),
            " FROM credentials c LEFT JOIN jobs j INDEXED BY jobs_credential \
             ON j.credential_id = c.id AND j.kill_id = ?1 \
             WHERE j.id IS NOT NULL OR c.revoke_requested_by = ?1 ORDER BY c.id"
        ),
        [kill_id],
        |r| kill_target_from_row(r),
    )
}

/// The live credentials a selector matches, judged exactly as kill creation judges them.
pub(super) fn kill_matches(conn: &Connection, selector: &Selector) -> Result<Vec<LiveCredential>, LedgerError> {
    Ok(live_exchanges(conn)?.into_iter().filter(|e| e.matched_by(selector)).flat_map(|e| e.credentials).collect())
}

pub(super) fn job_queue_depth(conn: &Connection) -> Result<u64, LedgerError> {
    let n = query_opt(conn, "SELECT COUNT(*) FROM jobs WHERE done_at IS NULL", [], |r| {
        Cols::new(r, "jobs").int(0, "count")
    })?
    .unwrap_or(0);
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(super) fn events(conn: &Connection, after: i64, limit: i64) -> Result<Vec<StoredEvent>, LedgerError> {
    query_all(
        conn,
        "SELECT seq, prev_hash, hash, body FROM audit_events WHERE seq > ?1 ORDER BY seq LIMIT ?2",
        params![after, limit],
        |r| event_from_row(r),
    )
}

pub(super) fn signing_keys(conn: &Connection) -> Result<Vec<StoredKey>, LedgerError> {
    query_all(
        conn,
        "SELECT id, algorithm, sealed_private, public_jwk, created_at, signs_from, retired_at FROM signing_keys \
         ORDER BY created_at, id",
        [],
        |r| signing_key_from_row(r),
    )
}

/// A page of sealed blobs: credential handles by id (through the partial index of handles that
/// are left), then signing keys by id. Each table is read by its own keyset query.
pub(super) fn sealed_blobs(
    conn: &Connection,
    after: Option<&BlobCursor>,
    limit: usize,
) -> Result<Vec<SealedBlob>, LedgerError> {
    let mut page = Vec::new();
    let after_key = match after {
        Some(BlobCursor { kind: SealedKind::SigningKey, id }) => id.as_str(),
        credential => {
            let after_id = credential.map_or("", |c| c.id.as_str());
            page = query_all(
                conn,
                "SELECT 'credential', id, handle FROM credentials INDEXED BY credentials_sealed \
                 WHERE handle IS NOT NULL AND id > ?1 ORDER BY id LIMIT ?2",
                params![after_id, page_limit(limit)],
                |r| sealed_blob_from_row(r),
            )?;
            ""
        }
    };
    if page.len() < limit {
        page.extend(query_all(
            conn,
            "SELECT 'signing_key', id, sealed_private FROM signing_keys WHERE id > ?1 ORDER BY id LIMIT ?2",
            params![after_key, page_limit(limit - page.len())],
            |r| sealed_blob_from_row(r),
        )?);
    }
    Ok(page)
}

pub(super) fn ping(conn: &Connection) -> Result<(), LedgerError> {
    query_opt(conn, "SELECT 1", [], |_| Ok(()))?;
    Ok(())
}

fn page_limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The conditions of a newest-first listing, only those given, with their values in order.
///
/// Only a condition that is in the SQL can use an index: written as `(?n IS NULL OR …)` for
/// every filter, the listing would be planned once for all of them and walk the table from its
/// newest row, cursor and time bounds included, so that each later page of a large ledger read
/// every row before it. Here the cursor, `since` and `until` are a range on `created_at`.
#[derive(Default)]
struct Conditions {
    sql: Vec<&'static str>,
    values: Vec<SqlValue>,
}

impl Conditions {
    fn push(&mut self, condition: &'static str, values: impl IntoIterator<Item = SqlValue>) {
        self.sql.push(condition);
        self.values.extend(values);
    }

    /// `condition` with its one `?` bound to `value`, when there is a value.
    fn add(&mut self, condition: &'static str, value: Option<impl Into<String>>) {
        if let Some(value) = value {
            self.push(condition, [SqlValue::Text(value.into())]);
        }
    }

    /// The cursor and the time window: a range on `created_at`.
    fn paged(
        &mut self,
        before: Option<(DateTime<Utc>, uuid::Uuid)>,
        since: Option<DateTime<Utc>>,
        until: Option<DateTime<Utc>>,
    ) {
        if let Some((at, id)) = before {
            self.push("(created_at, id) < (?, ?)", [SqlValue::Text(ts(at)), SqlValue::Text(id.to_string())]);
        }
        self.add("created_at >= ?", since.map(ts));
        self.add("created_at < ?", until.map(ts));
    }

    /// The columns both exchanges and credentials carry from the subject token and the policy.
    fn identity(
        &mut self,
        agent: &Option<String>,
        capability: &Option<String>,
        repository: &Option<String>,
        workflow: &Option<String>,
        subject: &Option<String>,
    ) {
        self.add("agent = ?", agent.as_deref());
        self.add("capability = ?", capability.as_deref());
        self.add("repository = ?", repository.as_deref());
        self.add("workflow = ?", workflow.as_deref());
        self.add("subject = ?", subject.as_deref());
    }

    /// `SELECT columns FROM table [WHERE …] ORDER BY created_at DESC, id DESC LIMIT ?`.
    fn newest_first(mut self, select: &str, limit: usize) -> (String, Vec<SqlValue>) {
        let mut sql = select.to_owned();
        if !self.sql.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&self.sql.join(" AND "));
        }
        sql.push_str(" ORDER BY created_at DESC, id DESC LIMIT ?");
        self.values.push(SqlValue::Integer(page_limit(limit)));
        (sql, self.values)
    }
}

pub(super) fn credentials_query(q: &CredentialQuery) -> (String, Vec<SqlValue>) {
    let mut c = Conditions::default();
    c.paged(q.before, q.since, q.until);
    c.identity(&q.agent, &q.capability, &q.repository, &q.workflow, &q.subject);
    c.add("backend = ?", q.backend.map(|b| b.as_str()));
    c.add("exchange_id = ?", q.exchange.map(|e| e.to_string()));
    match q.state {
        Some(StateFilter::Is(s)) => c.add("state = ?", Some(s.as_str())),
        Some(StateFilter::Live) => c.push(
            "state IN ('pending', 'active') AND expires_at > ?",
            [q.now.map_or(SqlValue::Null, |now| SqlValue::Text(ts(now)))],
        ),
        None => {}
    }
    c.newest_first(concat!("SELECT ", credential_columns!(), " FROM credentials"), q.limit)
}

pub(super) fn exchanges_query(q: &ExchangeQuery) -> (String, Vec<SqlValue>) {
    let mut c = Conditions::default();
    c.paged(q.before, q.since, q.until);
    c.identity(&q.agent, &q.capability, &q.repository, &q.workflow, &q.subject);
    c.add("issuer = ?", q.issuer.as_deref());
    c.add("state = ?", q.decision.map(|d| d.as_str()));
    c.add(
        "EXISTS (SELECT 1 FROM credentials c WHERE c.exchange_id = e.id AND c.backend = ?)",
        q.backend.map(|b| b.as_str()),
    );
    c.newest_first(concat!("SELECT ", exchange_columns!(), " FROM exchanges e"), q.limit)
}

/// A page of credentials, newest first.
pub(super) fn list_credentials(conn: &Connection, q: &CredentialQuery) -> Result<Vec<CredentialRow>, LedgerError> {
    let (sql, values) = credentials_query(q);
    let mut rows = query_all(conn, &sql, params_from_iter(values), |r| credential_from_row(r))?;
    // Listings never carry what revocation keeps sealed.
    for r in &mut rows {
        r.handle = None;
    }
    Ok(rows)
}

/// A page of exchanges, newest first.
pub(super) fn list_exchanges(conn: &Connection, q: &ExchangeQuery) -> Result<Vec<ExchangeRow>, LedgerError> {
    let (sql, values) = exchanges_query(q);
    query_all(conn, &sql, params_from_iter(values), |r| exchange_from_row(r))
}

/// Audit events matching a query, oldest first. Fields are read from the stored canonical body;
/// times in it are fixed-width RFC 3339, so text order is time order.
pub(super) fn list_events(conn: &Connection, q: &EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
    let (event, prefix) = match q.event.as_deref() {
        Some(e) => match e.strip_suffix('*') {
            Some(p) => (None, Some(format!("{}%", p.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")))),
            None => (Some(e.to_owned()), None),
        },
        None => (None, None),
    };
    query_all(
        conn,
        "SELECT seq, prev_hash, hash, body FROM audit_events WHERE seq > ?1 \
         AND (?2 IS NULL OR json_extract(body, '$.event') = ?2) \
         AND (?3 IS NULL OR json_extract(body, '$.event') LIKE ?3 ESCAPE '\\') \
         AND (?4 IS NULL OR json_extract(body, '$.actor') = ?4) \
         AND (?5 IS NULL OR json_extract(body, '$.agent') = ?5) \
         AND (?6 IS NULL OR json_extract(body, '$.capability') = ?6) \
         AND (?7 IS NULL OR json_extract(body, '$.repository') = ?7) \
         AND (?8 IS NULL OR json_extract(body, '$.subject') = ?8) \
         AND (?9 IS NULL OR json_extract(body, '$.credential_id') = ?9) \
         AND (?10 IS NULL OR json_extract(body, '$.time') >= ?10) \
         AND (?11 IS NULL OR json_extract(body, '$.time') < ?11) \
         ORDER BY seq LIMIT ?12",
        params![
            q.after,
            event,
            prefix,
            q.actor,
            q.agent,
            q.capability,
            q.repository,
            q.subject,
            q.credential,
            q.since.map(ts),
            q.until.map(ts),
            page_limit(q.limit),
        ],
        |r| event_from_row(r),
    )
}

pub(super) fn audit_head(conn: &Connection) -> Result<(i64, String), LedgerError> {
    Ok(query_opt(conn, "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1", [], |r| {
        let c = Cols::new(r, "audit_events");
        Ok((c.int(0, "seq")?, c.text(1, "hash")?))
    })?
    .unwrap_or_else(|| (0, hex::encode(crate::audit::GENESIS_HASH))))
}

pub(super) fn checkpoints(conn: &Connection) -> Result<Vec<Checkpoint>, LedgerError> {
    query_all(conn, "SELECT seq, hash, signed_at, key_id, signature FROM audit_checkpoints ORDER BY seq", [], |r| {
        checkpoint_from_row(r)
    })
}

pub(super) fn latest_checkpoint(conn: &Connection) -> Result<Option<Checkpoint>, LedgerError> {
    query_opt(
        conn,
        "SELECT seq, hash, signed_at, key_id, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT 1",
        [],
        |r| checkpoint_from_row(r),
    )
}

pub(super) fn stream_position(conn: &Connection, name: &str) -> Result<Option<i64>, LedgerError> {
    query_opt(conn, "SELECT seq FROM audit_stream_positions WHERE name = ?1", [name], |r| {
        Cols::new(r, "audit_stream_positions").int(0, "seq")
    })
}

/// The identity's live exchanges at `now`, other than `except`.
pub(super) fn live_count(
    conn: &Connection,
    agent: &str,
    repository: Option<&str>,
    now: DateTime<Utc>,
    except: Option<&str>,
) -> Result<LiveCount, LedgerError> {
    query_opt(
        conn,
        "SELECT COUNT(DISTINCT exchange_id), MIN(expires_at) FROM credentials \
         WHERE agent = ?1 AND repository IS ?2 AND state IN ('pending', 'active') AND expires_at > ?3 \
         AND (?4 IS NULL OR exchange_id <> ?4)",
        params![agent, repository, ts(now), except],
        |r| {
            let c = Cols::new(r, "credentials");
            Ok(LiveCount {
                exchanges: u64::try_from(c.int(0, "count")?).unwrap_or(0),
                first_end: c.opt_time(1, "expires_at")?,
            })
        },
    )
    .map(|n| n.unwrap_or(LiveCount { exchanges: 0, first_end: None }))
}
