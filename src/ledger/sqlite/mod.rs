//! The SQLite ledger: one node, WAL, durable commits, group commit.
//!
//! * Writes go to one writer thread that owns the only writing connection and commits whatever
//!   is queued in one transaction ([`writer`]); every reply follows a durable COMMIT
//!   (`synchronous = FULL`).
//! * WAL checkpoints run on a thread of their own, not inside the writer's commits ([`wal`]).
//! * Reads go to a small pool of read connections on blocking tasks ([`read`]); WAL lets them
//!   run beside the writer.
//! * The database belongs to one process: an exclusive lock on `<db>.lock`, held for the
//!   ledger's lifetime, refuses a second `open`, in this process or another. The writer's
//!   in-memory chain head and its serialization of activations with kill creation are only
//!   sound with a single writer.
//! * The schema comes from `migrations/sqlite`, tracked in `PRAGMA user_version` ([`schema`]).

mod codec;
mod ops;
mod read;
mod schema;
#[cfg(test)]
mod tests;
mod wal;
mod writer;

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use self::codec::{Cols, db_err, hash_from_hex, id, query_opt, ts};
use self::read::{ReadPool, connect};
use self::writer::{ChainHead, Command, Writer};
use super::command::{CredentialParams, EventParams, ExchangeParams, JobParams, Op, Reply};
use super::{
    Abort, Activate, Activation, Checkpoint, CredentialQuery, CredentialRow, CredentialState, EventQuery,
    ExchangeQuery, ExchangeRow, Handle, Job, JobOutcome, KillEffect, KillPage, KillState, KillTarget, Ledger,
    LedgerError, LiveCount, LiveCredential, NewJob, Reseal, ResealCount, RevokeRequest, SealedBlob, StoredKey,
    StoredKill,
};
use super::{BlobCursor, RetireKey, Retired};
use crate::audit::{AuditEvent, GENESIS_HASH, StoredEvent};
use crate::kill::{KillRule, Selector};
use crate::policy::BackendKind;

/// Read connections: reads are short, and the writer is the bottleneck, not them.
const READERS: usize = 4;

/// Commands that may wait for the writer. A full queue makes callers wait (back-pressure)
/// instead of growing without bound.
const QUEUE: usize = 4 * writer::MAX_BATCH;

/// Opens (creating if needed) the database at `path`.
pub async fn open(path: &Path, migrate: bool) -> Result<Arc<dyn Ledger>, LedgerError> {
    let path = path.to_owned();
    let ledger = tokio::task::spawn_blocking(move || SqliteLedger::open(path, migrate))
        .await
        .map_err(|e| LedgerError::Unavailable(format!("opening the ledger failed: {e}")))??;
    Ok(Arc::new(ledger))
}

pub struct SqliteLedger {
    /// The database path, for messages.
    shown: String,
    /// The writer's queue. Dropping the last sender stops the writer.
    writer: mpsc::Sender<Command>,
    /// Joined on drop, so that the file lock is released when the ledger is gone.
    thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<ReadPool>,
}

impl std::fmt::Debug for SqliteLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLedger").field("path", &self.shown).finish_non_exhaustive()
    }
}

impl SqliteLedger {
    fn open(path: PathBuf, migrate: bool) -> Result<SqliteLedger, LedgerError> {
        let shown = path.display().to_string();
        // Without `migrate`, a missing file is an unmigrated database: refuse it without creating
        // anything, not even the lock file.
        if !migrate && !path.exists() {
            schema::check(0, false, &shown)?;
        }
        let lock = lock(&path, &shown)?;

        let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE;
        if migrate {
            flags |= OpenFlags::SQLITE_OPEN_CREATE;
        }
        let mut conn = connect(&path, flags)?;
        let current = schema::version(&conn)?;
        schema::check(current, migrate, &shown)?;

        // WAL: readers never block the writer nor each other. FULL: a commit is on disk before
        // its reply leaves (the intent of step 5 must survive a power cut). Foreign keys keep
        // credentials and jobs tied to rows that exist.
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).map_err(db_err)?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(LedgerError::Unavailable(format!("{shown}: cannot use WAL (journal mode is {mode})")));
        }
        conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
        conn.pragma_update(None, "foreign_keys", true).map_err(db_err)?;
        // Savepoint journals stay in memory: they only ever hold one batch.
        conn.pragma_update(None, "temp_store", "MEMORY").map_err(db_err)?;
        // The WAL file keeps up to this size when the WAL starts over, so that commits overwrite
        // it in place ([`wal::WAL_SIZE_LIMIT`]).
        conn.pragma_update(None, "journal_size_limit", wal::WAL_SIZE_LIMIT).map_err(db_err)?;
        if current < schema::latest() {
            schema::migrate(&mut conn, current)?;
        }
        conn.set_prepared_statement_cache_capacity(64);

        let head = chain_head(&conn)?;
        let checkpoints = open_checkpoints(&path)?;
        let readers = ReadPool::open(path, READERS)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let thread = Writer::new(conn, head, lock, checkpoints)?.spawn(rx)?;
        tracing::info!(path = %shown, events = head.seq, "ledger.opened");
        Ok(SqliteLedger { shown, writer: tx, thread: Mutex::new(Some(thread)), readers })
    }

    async fn write(&self, op: Op) -> Result<Reply, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command { op, reply }).await.map_err(|_| self.stopped())?;
        answer.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> LedgerError {
        LedgerError::Unavailable(format!("the ledger writer for {} has stopped", self.shown))
    }
}

impl Drop for SqliteLedger {
    fn drop(&mut self) {
        // Close the queue, then wait for the writer to finish its batch and close the database,
        // so that the lock is free again once the ledger is dropped.
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.writer, closed));
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// Takes the exclusive lock of the database at `path`, a sidecar file `<path>.lock`: SQLite's own
/// locks only guard single transactions, while the ledger assumes it is the only writer for its
/// whole life.
fn lock(path: &Path, shown: &str) -> Result<File, LedgerError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(PathBuf::from(name))
        .map_err(|e| LedgerError::Unavailable(format!("{shown}: cannot open its lock file: {e}")))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(TryLockError::WouldBlock) => {
            Err(LedgerError::Unavailable(format!("{shown} is in use by another latchkey process")))
        }
        Err(TryLockError::Error(e)) => Err(LedgerError::Unavailable(format!("{shown}: cannot lock: {e}"))),
    }
}

/// The checkpointer's connection ([`wal`]): read-write, since a checkpoint writes the database
/// file, and as durable as the writer's.
fn open_checkpoints(path: &Path) -> Result<Connection, LedgerError> {
    let conn = connect(path, OpenFlags::SQLITE_OPEN_READ_WRITE)?;
    conn.pragma_update(None, "synchronous", "FULL").map_err(db_err)?;
    Ok(conn)
}

fn chain_head(conn: &Connection) -> Result<ChainHead, LedgerError> {
    let last = query_opt(conn, "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1", [], |r| {
        let c = Cols::new(r, "audit_events");
        Ok((c.int(0, "seq")?, c.text(1, "hash")?))
    })?;
    Ok(match last {
        None => ChainHead { seq: 0, hash: GENESIS_HASH },
        Some((seq, hash)) => ChainHead {
            seq,
            hash: hash_from_hex(&hash).ok_or_else(|| LedgerError::Corrupt(format!("audit_events.hash of {seq}")))?,
        },
    })
}

/// What [`backup`] copied: the audit chain's head in the copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupReport {
    pub events: i64,
    pub head_hash: String,
}

/// Copies the store at `path` into a new file `to` with SQLite's online backup API, safely
/// beside a running broker: the source is opened read-only and without the broker's lock, and
/// the copy is one read transaction, which in WAL mode never blocks the writer and sees one
/// consistent state (every commit before it, none after). The copy is written beside `to`,
/// flushed to disk, and only then renamed into place, so `to` is either absent or complete; an
/// existing `to` is never overwritten.
pub fn backup(path: &Path, to: &Path) -> Result<BackupReport, LedgerError> {
    let unavailable = |what: &str, e: &dyn std::fmt::Display| LedgerError::Unavailable(format!("{what}: {e}"));
    if !path.exists() {
        return Err(LedgerError::Unavailable(format!("{} does not exist", path.display())));
    }
    if to.exists() {
        return Err(LedgerError::Conflict(format!("{} exists; a backup never overwrites a file", to.display())));
    }
    let source = connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    if schema::version(&source)? == 0 {
        return Err(LedgerError::Schema(format!("{} has no latchkey schema", path.display())));
    }
    let dir = to.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let partial = tempfile::Builder::new()
        .prefix(".latchkey-backup-")
        .tempfile_in(dir)
        .map_err(|e| unavailable(&format!("cannot write in {}", dir.display()), &e))?;
    {
        let mut copy = Connection::open(partial.path()).map_err(db_err)?;
        let backup = rusqlite::backup::Backup::new(&source, &mut copy).map_err(db_err)?;
        // All pages in one step: one read transaction, so the copy is one consistent state.
        // Should the step be told to retry (the source busy or locked), it goes again whole.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            match backup.step(-1).map_err(db_err)? {
                rusqlite::backup::StepResult::Done => break,
                _ if std::time::Instant::now() > deadline => {
                    return Err(LedgerError::Unavailable("the store stayed busy for a minute; try again".into()));
                }
                _ => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
        drop(backup);
        let ok: String = copy.query_row("PRAGMA integrity_check", [], |r| r.get(0)).map_err(db_err)?;
        if ok != "ok" {
            return Err(LedgerError::Corrupt(format!("the copy fails SQLite's integrity check: {ok}")));
        }
        // One self-contained file: the copy's pages are in it, not in a WAL beside it.
        let _: String = copy.query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0)).map_err(db_err)?;
    }
    partial.as_file().sync_all().map_err(|e| unavailable("cannot flush the copy", &e))?;
    let copy = Connection::open_with_flags(partial.path(), OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(db_err)?;
    let (events, head_hash) = read::audit_head(&copy)?;
    drop(copy);
    partial.persist_noclobber(to).map_err(|e| unavailable(&format!("cannot create {}", to.display()), &e.error))?;
    Ok(BackupReport { events, head_hash })
}

/// A store file opened read-only, for offline verification of the audit chain.
#[derive(Debug)]
pub struct AuditFile {
    conn: Mutex<Connection>,
    /// Whether the schema has the checkpoint table (older files have none).
    has_checkpoints: bool,
}

impl AuditFile {
    pub fn open(path: &Path) -> Result<AuditFile, LedgerError> {
        if !path.exists() {
            return Err(LedgerError::Unavailable(format!("{} does not exist", path.display())));
        }
        let conn = connect(path, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
        let version = schema::version(&conn)?;
        if version == 0 {
            return Err(LedgerError::Schema(format!("{} has no latchkey schema", path.display())));
        }
        let has_checkpoints = query_opt(
            &conn,
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'audit_checkpoints'",
            [],
            |_| Ok(()),
        )?
        .is_some();
        Ok(AuditFile { conn: Mutex::new(conn), has_checkpoints })
    }
}

#[async_trait]
impl super::AuditSource for AuditFile {
    async fn chain(&self, after: i64, limit_: usize) -> Result<Vec<StoredEvent>, LedgerError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        read::events(&conn, after, limit(limit_))
    }

    async fn stored_checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        if !self.has_checkpoints {
            return Ok(Vec::new());
        }
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        read::checkpoints(&conn)
    }
}

/// Replies come back typed by the command that was sent; a mismatch is a bug in this module.
fn unexpected(reply: Reply) -> LedgerError {
    LedgerError::Unavailable(format!("internal error: unexpected ledger reply {reply:?}"))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl Ledger for SqliteLedger {
    async fn record_refusal(&self, exchange: &ExchangeRow, event: AuditEvent) -> Result<(), LedgerError> {
        let op = Op::Refusal { exchange: ExchangeParams::new(exchange), event: EventParams::new(&event) };
        self.write(op).await.map(drop)
    }

    async fn record_intent(
        &self,
        exchange: &ExchangeRow,
        credentials: &[CredentialRow],
        event: AuditEvent,
    ) -> Result<(), LedgerError> {
        let op = Op::Intent {
            exchange: ExchangeParams::new(exchange),
            credentials: credentials.iter().map(CredentialParams::new).collect(),
            event: EventParams::new(&event),
        };
        self.write(op).await.map(drop)
    }

    async fn record_handle(&self, credential_id: Uuid, handle: &Handle) -> Result<(), LedgerError> {
        self.write(Op::handle(credential_id, handle)).await.map(drop)
    }

    async fn activate(&self, activate: Activate) -> Result<Activation, LedgerError> {
        match self.write(Op::activate(activate)).await? {
            Reply::Activation(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    async fn issue_local(
        &self,
        exchange: &ExchangeRow,
        credentials: &[CredentialRow],
        activate: Activate,
    ) -> Result<Activation, LedgerError> {
        match self.write(Op::issue_local(exchange, credentials, activate)).await? {
            Reply::Activation(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    async fn abort(&self, abort: Abort) -> Result<(), LedgerError> {
        self.write(Op::abort(abort)).await.map(drop)
    }

    async fn jti_spent(&self, issuer: &str, jti: &str, capability: &str) -> Result<bool, LedgerError> {
        let (issuer, jti, capability) = (issuer.to_owned(), jti.to_owned(), capability.to_owned());
        self.readers.run(move |c| read::jti_spent(c, &issuer, &jti, &capability)).await
    }

    async fn exchange(&self, exchange_id: Uuid) -> Result<Option<ExchangeRow>, LedgerError> {
        let exchange_id = id(exchange_id);
        self.readers.run(move |c| read::exchange(c, &exchange_id)).await
    }

    async fn credential(&self, credential_id: Uuid) -> Result<Option<CredentialRow>, LedgerError> {
        let credential_id = id(credential_id);
        self.readers.run(move |c| read::credential(c, &credential_id)).await
    }

    async fn credentials_of_exchange(&self, exchange_id: Uuid) -> Result<Vec<CredentialRow>, LedgerError> {
        let exchange_id = id(exchange_id);
        self.readers.run(move |c| read::credentials_of_exchange(c, &exchange_id)).await
    }

    async fn pending_credentials(&self, before: DateTime<Utc>) -> Result<Vec<CredentialRow>, LedgerError> {
        self.readers.run(move |c| read::pending_credentials(c, before)).await
    }

    async fn transition_credential(
        &self,
        credential_id: Uuid,
        from: &[CredentialState],
        to: CredentialState,
        event: AuditEvent,
    ) -> Result<bool, LedgerError> {
        let op = Op::Transition { id: id(credential_id), from: from.to_vec(), to, event: EventParams::new(&event) };
        match self.write(op).await? {
            Reply::Moved(moved) => Ok(moved),
            other => Err(unexpected(other)),
        }
    }

    async fn create_kill(&self, rule: &KillRule, event: AuditEvent) -> Result<KillEffect, LedgerError> {
        let selector = serde_json::to_string(&rule.selector)
            .map_err(|e| LedgerError::Conflict(format!("selector does not serialize: {e}")))?;
        let op = Op::CreateKill { rule: Box::new(rule.clone()), selector, event: EventParams::new(&event) };
        match self.write(op).await? {
            Reply::KillEffect(effect) => Ok(effect),
            other => Err(unexpected(other)),
        }
    }

    async fn kill_state(&self, now: DateTime<Utc>) -> Result<KillState, LedgerError> {
        self.readers.run(move |c| read::kill_state(c, now)).await
    }

    async fn record_lapses(&self, now: DateTime<Utc>, actor: &str) -> Result<Vec<Uuid>, LedgerError> {
        match self.write(Op::RecordLapses { now, actor: actor.to_owned() }).await? {
            Reply::KillIds(ids) => Ok(ids),
            other => Err(unexpected(other)),
        }
    }

    async fn lift_kill(
        &self,
        kill_id: Uuid,
        now: DateTime<Utc>,
        by: &str,
        reason: &str,
        event: AuditEvent,
    ) -> Result<StoredKill, LedgerError> {
        let op = Op::LiftKill {
            id: id(kill_id),
            now: ts(now),
            by: by.to_owned(),
            reason: reason.to_owned(),
            event: EventParams::new(&event),
        };
        match self.write(op).await? {
            Reply::Kill(kill) => Ok(*kill),
            other => Err(unexpected(other)),
        }
    }

    async fn kill_rule(&self, kill_id: Uuid) -> Result<Option<StoredKill>, LedgerError> {
        let kill_id = id(kill_id);
        self.readers.run(move |c| read::kill_rule(c, &kill_id)).await
    }

    async fn kill_rules(&self, page: KillPage) -> Result<Vec<StoredKill>, LedgerError> {
        self.readers.run(move |c| read::kill_rules(c, &page)).await
    }

    async fn kill_targets(&self, kill_id: Uuid) -> Result<Vec<KillTarget>, LedgerError> {
        let kill_id = id(kill_id);
        self.readers.run(move |c| read::kill_targets(c, &kill_id)).await
    }

    async fn kill_matches(&self, selector: &Selector) -> Result<Vec<LiveCredential>, LedgerError> {
        let selector = selector.clone();
        self.readers.run(move |c| read::kill_matches(c, &selector)).await
    }

    async fn request_revoke(&self, job: NewJob, event: AuditEvent) -> Result<RevokeRequest, LedgerError> {
        let op = Op::RequestRevoke { job: JobParams::new(&job), event: EventParams::new(&event) };
        match self.write(op).await? {
            Reply::Revoke(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn release_exchange(
        &self,
        revokes: Vec<(NewJob, AuditEvent)>,
        event: AuditEvent,
    ) -> Result<Vec<RevokeRequest>, LedgerError> {
        let revokes = revokes.iter().map(|(job, e)| (JobParams::new(job), EventParams::new(e))).collect();
        match self.write(Op::Release { revokes, event: EventParams::new(&event) }).await? {
            Reply::Revokes(r) => Ok(r),
            other => Err(unexpected(other)),
        }
    }

    async fn enqueue_jobs(&self, jobs: &[NewJob]) -> Result<(), LedgerError> {
        if jobs.is_empty() {
            return Ok(());
        }
        self.write(Op::EnqueueJobs(jobs.iter().map(JobParams::new).collect())).await.map(drop)
    }

    async fn claim_jobs(
        &self,
        now: DateTime<Utc>,
        backend: BackendKind,
        limit_: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>, LedgerError> {
        let backend = backend.as_str();
        let op = Op::ClaimJobs { now: ts(now), backend, limit: limit(limit_), lease_until: ts(lease_until) };
        match self.write(op).await? {
            Reply::Jobs(jobs) => Ok(jobs),
            other => Err(unexpected(other)),
        }
    }

    async fn finish_job(&self, job: &Job, outcome: JobOutcome) -> Result<(), LedgerError> {
        self.write(Op::finish_job(job, outcome)).await.map(drop)
    }

    async fn job_queue_depth(&self) -> Result<u64, LedgerError> {
        self.readers.run(read::job_queue_depth).await
    }

    async fn append_event(&self, event: AuditEvent) -> Result<(), LedgerError> {
        self.write(Op::AppendEvent(EventParams::new(&event))).await.map(drop)
    }

    async fn events(&self, after: i64, limit_: usize) -> Result<Vec<StoredEvent>, LedgerError> {
        let limit = limit(limit_);
        self.readers.run(move |c| read::events(c, after, limit)).await
    }

    async fn list_events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
        self.readers.run(move |c| read::list_events(c, &query)).await
    }

    async fn audit_head(&self) -> Result<(i64, String), LedgerError> {
        self.readers.run(read::audit_head).await
    }

    async fn list_credentials(&self, query: CredentialQuery) -> Result<Vec<CredentialRow>, LedgerError> {
        self.readers.run(move |c| read::list_credentials(c, &query)).await
    }

    async fn list_exchanges(&self, query: ExchangeQuery) -> Result<Vec<ExchangeRow>, LedgerError> {
        self.readers.run(move |c| read::list_exchanges(c, &query)).await
    }

    async fn record_checkpoint(&self, checkpoint: &Checkpoint, event: AuditEvent) -> Result<(), LedgerError> {
        let op = Op::RecordCheckpoint { checkpoint: checkpoint.clone(), event: EventParams::new(&event) };
        self.write(op).await.map(drop)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        self.readers.run(read::checkpoints).await
    }

    async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        self.readers.run(read::latest_checkpoint).await
    }

    async fn stream_position(&self, name: &str) -> Result<Option<i64>, LedgerError> {
        let name = name.to_owned();
        self.readers.run(move |c| read::stream_position(c, &name)).await
    }

    async fn set_stream_position(&self, name: &str, seq: i64) -> Result<(), LedgerError> {
        self.write(Op::SetStreamPosition { name: name.to_owned(), seq }).await.map(drop)
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, LedgerError> {
        self.readers.run(read::signing_keys).await
    }

    async fn insert_signing_key(&self, key: &StoredKey, event: AuditEvent) -> Result<(), LedgerError> {
        self.write(Op::insert_signing_key(key, &event)).await.map(drop)
    }

    async fn retire_signing_key(&self, retire: RetireKey) -> Result<Retired, LedgerError> {
        match self.write(Op::retire_signing_key(retire)).await? {
            Reply::Retired(retired) => Ok(retired),
            other => Err(unexpected(other)),
        }
    }

    async fn sealed_blobs(&self, after: Option<&BlobCursor>, limit: usize) -> Result<Vec<SealedBlob>, LedgerError> {
        let after = after.cloned();
        self.readers.run(move |c| read::sealed_blobs(c, after.as_ref(), limit)).await
    }

    async fn reseal(&self, reseals: Vec<Reseal>, key_id: &str, now: DateTime<Utc>) -> Result<ResealCount, LedgerError> {
        if reseals.is_empty() {
            return Ok(ResealCount::default());
        }
        match self.write(Op::Reseal { reseals, key_id: key_id.to_owned(), now }).await? {
            Reply::Resealed(count) => Ok(count),
            other => Err(unexpected(other)),
        }
    }

    async fn prune(&self, now: DateTime<Utc>) -> Result<u64, LedgerError> {
        match self.write(Op::Prune { now: ts(now) }).await? {
            Reply::Count(n) => Ok(n),
            other => Err(unexpected(other)),
        }
    }

    async fn take_rate(
        &self,
        key: &str,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        tolerance: std::time::Duration,
    ) -> Result<Option<std::time::Duration>, LedgerError> {
        match self.write(Op::TakeRate { key: key.to_owned(), now, interval, tolerance }).await? {
            Reply::Wait(wait) => Ok(wait),
            other => Err(unexpected(other)),
        }
    }

    async fn live_count(
        &self,
        agent: &str,
        repository: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<LiveCount, LedgerError> {
        let (agent, repository) = (agent.to_owned(), repository.map(str::to_owned));
        self.readers.run(move |c| read::live_count(c, &agent, repository.as_deref(), now, None)).await
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        // Ready means both sides answer: a dead writer would refuse every exchange.
        if self.writer.is_closed() {
            return Err(self.stopped());
        }
        self.readers.run(read::ping).await
    }
}
