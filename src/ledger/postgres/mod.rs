//! The PostgreSQL ledger: several replicas on one database.
//!
//! * Writes that append to the audit chain go through this replica's writer ([`writer`]): one
//!   connection, group commit, and the chain head's row lock taken first in every transaction.
//!   Across replicas, writers take turns on that lock, so the chain never forks or skips, and
//!   kill creation and activation (DESIGN step 7) are serialized whichever replicas run them.
//! * Everything else runs on the pool: reads, revocation handles, job claims (`FOR UPDATE SKIP
//!   LOCKED`, so each job goes to exactly one worker of one replica), stream positions, pruning.
//! * Kill changes and signing-key changes are announced with `NOTIFY` in the transaction that
//!   makes them; every replica `LISTEN`s and wakes its kill-rule refresher
//!   ([`Ledger::kill_changes`]) or its signing-key refresher ([`Ledger::key_changes`]). A
//!   listener that lost its connection may have missed some, so it wakes both; and both also
//!   poll, so a rule reaches every replica within a second, and a key within ten, even when
//!   notifications fail.
//! * Every connection runs with a statement timeout and an idle-in-transaction timeout: a slow
//!   query fails instead of hanging an exchange, and a replica that stalls mid-transaction
//!   cannot hold the chain lock for longer than that.
//! * The schema comes from `migrations/postgres`, tracked in `latchkey_schema` ([`schema`]); the
//!   URL may choose a schema other than `public` with `?options[search_path]=NAME`.

mod ops;
mod read;
mod schema;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

use self::writer::{Command, MAX_BATCH, Writer};
use super::command::{CredentialParams, EventParams, ExchangeParams, JobParams, Op, Reply};
use super::rows::{id, ts};
use super::{
    Abort, Activate, Activation, Checkpoint, CredentialQuery, CredentialRow, CredentialState, EventQuery,
    ExchangeQuery, ExchangeRow, Handle, Job, JobOutcome, KillEffect, KillPage, KillState, KillTarget, Ledger,
    LedgerError, LiveCount, LiveCredential, NewJob, Reseal, ResealCount, RevokeRequest, SealedBlob, StoredKey,
    StoredKill,
};
use super::{BlobCursor, RetireKey, Retired};
use crate::audit::{AuditEvent, StoredEvent};
use crate::kill::{KillRule, Selector};
use crate::policy::BackendKind;

/// How a replica connects to PostgreSQL (`[store]` in the configuration).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Connections in the pool, beside the writer's own.
    pub max_connections: u32,
    /// Any statement running longer is cancelled, and so is a transaction left idle that long.
    pub statement_timeout: Duration,
    /// How long to wait for a connection, new or from the pool. Short by default: while the
    /// store is down, every exchange and `/readyz` fail (503) after this long.
    pub connect_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_connections: 10,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
        }
    }
}

/// Maps a PostgreSQL error. Constraint violations (class 23) are `Conflict`; values that do not
/// decode are `Corrupt`; everything an operator must fix (the server down or restarting, a
/// timeout, a full disk, a read-only standby) is `Unavailable`. Messages never carry the URL.
pub(super) fn db_err(e: sqlx::Error) -> LedgerError {
    use sqlx::Error as E;
    match &e {
        E::Database(d) if d.code().is_some_and(|c| c.starts_with("23")) => LedgerError::Conflict(d.message().into()),
        E::Database(d) => {
            LedgerError::Unavailable(format!("{} (SQLSTATE {})", d.message(), d.code().as_deref().unwrap_or("?")))
        }
        E::ColumnDecode { .. } | E::Decode(_) | E::ColumnNotFound(_) | E::ColumnIndexOutOfBounds { .. } => {
            LedgerError::Corrupt(e.to_string())
        }
        E::Configuration(_) => LedgerError::Unavailable("the PostgreSQL connection settings are invalid".into()),
        _ => LedgerError::Unavailable(e.to_string()),
    }
}

/// Opens the database named by `url` (`postgres://…`).
pub async fn open(url: &str, migrate: bool, settings: &Settings) -> Result<Arc<dyn Ledger>, LedgerError> {
    let options: PgConnectOptions =
        url.parse().map_err(|_| LedgerError::Schema("the store URL is not a valid PostgreSQL URL".into()))?;
    // Names the database in messages and logs, never with its password.
    let shown = format!(
        "postgres://{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or_default()
    );
    let timeout_ms = settings.statement_timeout.as_millis().max(1);
    let options = options
        .application_name("latchkey")
        .options([("statement_timeout", timeout_ms), ("idle_in_transaction_session_timeout", timeout_ms)]);
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections.max(2))
        .acquire_timeout(settings.connect_timeout)
        .connect_with(options.clone())
        .await
        .map_err(|e| LedgerError::Unavailable(format!("{shown}: cannot connect: {}", db_err(e))))?;

    {
        let mut conn = pool.acquire().await.map_err(db_err)?;
        if migrate {
            schema::migrate(&mut conn, &shown).await?;
        } else {
            schema::check(schema::version(&mut conn).await?, false, &shown)?;
        }
    }
    let schema_name: String =
        sqlx::query_scalar("SELECT current_schema()::text").fetch_one(&pool).await.map_err(db_err)?;

    let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
    let writer = tokio::spawn(Writer::new(options, settings.connect_timeout, settings.statement_timeout).run(rx));
    let changes = Changes::default();
    let listener = tokio::spawn(listen(pool.clone(), schema_name.clone(), changes.clone()));
    tracing::info!(store = %shown, schema = %schema_name, "ledger.opened");
    Ok(Arc::new(PgLedger { shown, pool, writer: tx, changes, tasks: vec![writer, listener] }))
}

/// What the listener wakes: one waiter per channel.
#[derive(Clone, Default)]
struct Changes {
    kills: Arc<Notify>,
    keys: Arc<Notify>,
}

impl Changes {
    /// Notifications may have been lost: everything is re-read.
    fn all(&self) {
        self.kills.notify_one();
        self.keys.notify_one();
    }
}

/// Wakes the waiter of each change of `schema` any replica announces, and all of them whenever
/// the listening connection was lost (and with it, perhaps, notifications).
async fn listen(pool: PgPool, schema: String, changes: Changes) {
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %db_err(e), "ledger.listen.connect_failed");
                changes.all();
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        if let Err(e) = listener.listen_all([ops::KILL_CHANNEL, ops::KEY_CHANNEL]).await {
            tracing::warn!(error = %db_err(e), "ledger.listen.failed");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) if n.payload() == schema => match n.channel() {
                    ops::KILL_CHANNEL => changes.kills.notify_one(),
                    ops::KEY_CHANNEL => changes.keys.notify_one(),
                    _ => {}
                },
                Ok(Some(_)) => {}
                Ok(None) => {
                    tracing::warn!("ledger.listen.connection_lost");
                    changes.all();
                }
                Err(e) => {
                    tracing::warn!(error = %db_err(e), "ledger.listen.failed");
                    changes.all();
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

pub struct PgLedger {
    /// The database, for messages: host, port and name, never the password.
    shown: String,
    pool: PgPool,
    /// The writer's queue. Dropping it stops the writer.
    writer: mpsc::Sender<Command>,
    changes: Changes,
    /// The writer and the listener, stopped when the ledger is dropped.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for PgLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger").field("store", &self.shown).finish_non_exhaustive()
    }
}

impl Drop for PgLedger {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl PgLedger {
    async fn write(&self, op: Op) -> Result<Reply, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.writer.send(Command { op, reply }).await.map_err(|_| self.stopped())?;
        answer.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> LedgerError {
        LedgerError::Unavailable(format!("the ledger writer for {} has stopped", self.shown))
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, LedgerError> {
        self.pool.acquire().await.map_err(db_err)
    }
}

fn unexpected(reply: Reply) -> LedgerError {
    LedgerError::Unavailable(format!("internal error: unexpected ledger reply {reply:?}"))
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl Ledger for PgLedger {
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
        read::jti_spent(&self.pool, issuer, jti, capability).await
    }

    async fn exchange(&self, exchange_id: Uuid) -> Result<Option<ExchangeRow>, LedgerError> {
        read::exchange(&self.pool, &id(exchange_id)).await
    }

    async fn credential(&self, credential_id: Uuid) -> Result<Option<CredentialRow>, LedgerError> {
        read::credential(&self.pool, &id(credential_id)).await
    }

    async fn credentials_of_exchange(&self, exchange_id: Uuid) -> Result<Vec<CredentialRow>, LedgerError> {
        read::credentials_of_exchange(&self.pool, &id(exchange_id)).await
    }

    async fn pending_credentials(&self, before: DateTime<Utc>) -> Result<Vec<CredentialRow>, LedgerError> {
        read::pending_credentials(&self.pool, before).await
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
        read::kill_state(&self.pool, now).await
    }

    fn kill_changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.kills.clone())
    }

    fn key_changes(&self) -> Option<Arc<Notify>> {
        Some(self.changes.keys.clone())
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
        read::kill_rule(&self.pool, &id(kill_id)).await
    }

    async fn kill_rules(&self, page: KillPage) -> Result<Vec<StoredKill>, LedgerError> {
        read::kill_rules(&self.pool, &page).await
    }

    async fn kill_targets(&self, kill_id: Uuid) -> Result<Vec<KillTarget>, LedgerError> {
        read::kill_targets(&self.pool, &id(kill_id)).await
    }

    async fn kill_matches(&self, selector: &Selector) -> Result<Vec<LiveCredential>, LedgerError> {
        read::kill_matches(&self.pool, selector).await
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
        let mut conn = self.conn().await?;
        let backend = backend.as_str();
        ops::claim_jobs(&mut conn, &ts(now), backend, limit(limit_), &ts(lease_until)).await
    }

    async fn finish_job(&self, job: &Job, outcome: JobOutcome) -> Result<(), LedgerError> {
        self.write(Op::finish_job(job, outcome)).await.map(drop)
    }

    async fn job_queue_depth(&self) -> Result<u64, LedgerError> {
        read::job_queue_depth(&self.pool).await
    }

    async fn append_event(&self, event: AuditEvent) -> Result<(), LedgerError> {
        self.write(Op::AppendEvent(EventParams::new(&event))).await.map(drop)
    }

    async fn events(&self, after: i64, limit_: usize) -> Result<Vec<StoredEvent>, LedgerError> {
        read::events(&self.pool, after, limit(limit_)).await
    }

    async fn list_events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, LedgerError> {
        read::list_events(&self.pool, &query).await
    }

    async fn audit_head(&self) -> Result<(i64, String), LedgerError> {
        read::audit_head(&self.pool).await
    }

    async fn list_credentials(&self, query: CredentialQuery) -> Result<Vec<CredentialRow>, LedgerError> {
        read::list_credentials(&self.pool, &query).await
    }

    async fn list_exchanges(&self, query: ExchangeQuery) -> Result<Vec<ExchangeRow>, LedgerError> {
        read::list_exchanges(&self.pool, &query).await
    }

    async fn record_checkpoint(&self, checkpoint: &Checkpoint, event: AuditEvent) -> Result<(), LedgerError> {
        let op = Op::RecordCheckpoint { checkpoint: checkpoint.clone(), event: EventParams::new(&event) };
        self.write(op).await.map(drop)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        read::checkpoints(&self.pool).await
    }

    async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError> {
        read::latest_checkpoint(&self.pool).await
    }

    async fn stream_position(&self, name: &str) -> Result<Option<i64>, LedgerError> {
        read::stream_position(&self.pool, name).await
    }

    async fn set_stream_position(&self, name: &str, seq: i64) -> Result<(), LedgerError> {
        self.write(Op::SetStreamPosition { name: name.to_owned(), seq }).await.map(drop)
    }

    async fn signing_keys(&self) -> Result<Vec<StoredKey>, LedgerError> {
        read::signing_keys(&self.pool).await
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
        read::sealed_blobs(&self.pool, after, limit).await
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
        interval: Duration,
        tolerance: Duration,
    ) -> Result<Option<Duration>, LedgerError> {
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
        read::live_count(&self.pool, agent, repository, now, None).await
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        if self.writer.is_closed() {
            return Err(self.stopped());
        }
        sqlx::query("SELECT 1").execute(&self.pool).await.map(drop).map_err(db_err)
    }
}

/// A PostgreSQL store opened only to read its audit chain (`latchkey audit verify --store`):
/// one connection, no writer, no listener, never migrated.
#[derive(Debug)]
pub struct AuditDatabase {
    pool: PgPool,
}

impl AuditDatabase {
    pub async fn open(url: &str) -> Result<AuditDatabase, LedgerError> {
        let options: PgConnectOptions =
            url.parse().map_err(|_| LedgerError::Schema("the store URL is not a valid PostgreSQL URL".into()))?;
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options.application_name("latchkey-audit-verify"))
            .await
            .map_err(db_err)?;
        let mut conn = pool.acquire().await.map_err(db_err)?;
        if schema::version(&mut conn).await? == 0 {
            return Err(LedgerError::Schema("the database has no latchkey schema".into()));
        }
        drop(conn);
        Ok(AuditDatabase { pool })
    }
}

#[async_trait]
impl super::AuditSource for AuditDatabase {
    async fn chain(&self, after: i64, limit_: usize) -> Result<Vec<StoredEvent>, LedgerError> {
        read::events(&self.pool, after, limit(limit_)).await
    }

    async fn stored_checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        read::checkpoints(&self.pool).await
    }
}

impl super::rows::RawRow for sqlx::postgres::PgRow {
    fn text(&self, i: usize) -> Option<String> {
        sqlx::Row::try_get(self, i).ok()
    }
    fn opt_text(&self, i: usize) -> Option<Option<String>> {
        sqlx::Row::try_get(self, i).ok()
    }
    fn int(&self, i: usize) -> Option<i64> {
        // BIGINT columns decode as i64, INTEGER ones as i32.
        sqlx::Row::try_get::<i64, _>(self, i).ok().or_else(|| sqlx::Row::try_get::<i32, _>(self, i).ok().map(i64::from))
    }
    fn bool(&self, i: usize) -> Option<bool> {
        sqlx::Row::try_get(self, i).ok()
    }
    fn opt_blob(&self, i: usize) -> Option<Option<Vec<u8>>> {
        sqlx::Row::try_get(self, i).ok()
    }
}
