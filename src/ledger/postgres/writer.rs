//! This replica's writer: one connection of its own, and group commit.
//!
//! Callers send [`Command`]s over a bounded channel. The writer takes every command already
//! queued (up to [`MAX_BATCH`]) and runs them in ONE transaction. A command that fails (or
//! answers "nothing changed", like a killed activation) rolls back alone: the batch first runs
//! without savepoints, as it nearly always commits whole, and if a command fails it is rolled
//! back and runs again with each command in its own savepoint (two round trips more each).
//!
//! Invariants:
//! * every transaction first locks the chain head row (`audit_head … FOR UPDATE`) and reads the
//!   head from it: writers on every replica take turns, each appends after the last committed
//!   event, and the head row moves in the same transaction as the events, so the chain never
//!   forks and has no gaps. Kill creation and activation (DESIGN step 7) both hold it, so they
//!   are serialized across replicas as well;
//! * a reply leaves only after the COMMIT that made it durable succeeded; if the transaction is
//!   lost (connection gone, COMMIT refused), every command of the batch gets the error, and the
//!   connection is dropped and opened again for the next batch.

use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, Row};
use tokio::sync::{mpsc, oneshot};

use super::db_err;
use super::ops::{ChainHead, Tx};
use crate::ledger::LedgerError;
use crate::ledger::command::{Op, Reply};
use crate::ledger::rows::{copy_err, hash_from_hex};

/// The most commands one transaction takes.
pub(super) const MAX_BATCH: usize = 128;

type ReplyTx = oneshot::Sender<Result<Reply, LedgerError>>;

pub(super) struct Command {
    pub(super) op: Op,
    pub(super) reply: ReplyTx,
}

pub(super) struct Writer {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// How long connecting may take.
    connect_timeout: Duration,
    /// How long one transaction may take from BEGIN to COMMIT, measured here: the server's own
    /// statement timeout cannot help when the network, not the server, stops answering.
    batch_timeout: Duration,
}

impl Writer {
    pub(super) fn new(options: PgConnectOptions, connect_timeout: Duration, statement_timeout: Duration) -> Self {
        Writer { options, conn: None, connect_timeout, batch_timeout: statement_timeout * 3 }
    }

    /// Runs until every sender is dropped.
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.recv().await {
            batch.push(first);
            // Whatever queued up while the previous batch was committing goes in this one.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.run_batch(std::mem::take(&mut batch)).await;
        }
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }

    async fn run_batch(&mut self, batch: Vec<Command>) {
        let mut results = Vec::with_capacity(batch.len());
        let mut guarded = false;
        let mut reconnected = false;
        let outcome = loop {
            results.clear();
            match self.try_batch(&batch, guarded, &mut results).await {
                Ok(true) => break Ok(()),
                // A command failed or undid itself, and the transaction was rolled back: the
                // batch runs again with each command in its own savepoint.
                Ok(false) => guarded = true,
                // The kept connection failed before any command ran: PostgreSQL restarted, or
                // closed it while idle. Nothing was written, so the batch runs again on a new
                // connection instead of failing exchanges that a healthy server would take.
                Err(_) if results.is_empty() && self.conn.is_some() && !reconnected => {
                    self.conn = None;
                    reconnected = true;
                }
                Err(e) => break Err(e),
            }
        };
        let mut results = results.into_iter();
        match outcome {
            Ok(()) => {
                for (cmd, result) in batch.into_iter().zip(results) {
                    let _ = cmd.reply.send(result);
                }
            }
            Err(e) => {
                // Nothing of this transaction was kept: answers that said otherwise become the
                // error, and the connection (broken or in an unknown state) is not used again.
                tracing::error!(error = %e, commands = batch.len(), "ledger.commit_failed");
                self.conn = None;
                for cmd in batch {
                    let _ = cmd.reply.send(match results.next() {
                        Some(Err(own)) => Err(own),
                        _ => Err(copy_err(&e)),
                    });
                }
            }
        }
    }

    /// One transaction over the batch: true when it committed, false when it ran `guarded ==
    /// false` and a command failed or undid itself (the transaction is then rolled back).
    async fn try_batch(
        &mut self,
        commands: &[Command],
        guarded: bool,
        results: &mut Vec<Result<Reply, LedgerError>>,
    ) -> Result<bool, LedgerError> {
        let timeout = self.batch_timeout;
        let conn = self.connection().await?;
        match tokio::time::timeout(timeout, transact(conn, commands, guarded, results)).await {
            Ok(outcome) => outcome,
            Err(_) => {
                // Dropping the connection ends the transaction on the server's side too.
                self.conn = None;
                Err(LedgerError::Unavailable(format!("the store did not answer within {timeout:?}")))
            }
        }
    }

    async fn connection(&mut self) -> Result<&mut PgConnection, LedgerError> {
        let conn = match self.conn.take() {
            Some(conn) => conn,
            None => tokio::time::timeout(self.connect_timeout, PgConnection::connect_with(&self.options))
                .await
                .map_err(|_| LedgerError::Unavailable(format!("no connection within {:?}", self.connect_timeout)))?
                .map_err(db_err)?,
        };
        Ok(self.conn.insert(conn))
    }
}

/// One transaction: the head lock, every command, the head row, COMMIT. `guarded`: each
/// command in its own savepoint, so that a command that fails or undoes itself rolls back alone;
/// unguarded (two round trips fewer per command), such a command rolls the whole transaction
/// back and the answer is false. An error answered here is fatal to the whole transaction; a
/// command's own error is its result.
async fn transact(
    conn: &mut PgConnection,
    commands: &[Command],
    guarded: bool,
    results: &mut Vec<Result<Reply, LedgerError>>,
) -> Result<bool, LedgerError> {
    control(conn, "BEGIN").await?;
    let row = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_optional(&mut *conn)
        .await
        .map_err(db_err)?
        .ok_or_else(|| LedgerError::Corrupt("audit_head: the row is missing".into()))?;
    let seq: i64 = row.try_get(0).map_err(db_err)?;
    let hash: String = row.try_get(1).map_err(db_err)?;
    let start =
        ChainHead { seq, hash: hash_from_hex(&hash).ok_or_else(|| LedgerError::Corrupt("audit_head.hash".into()))? };
    let mut head = start;
    let mut kill_epoch = None;

    for cmd in commands {
        if guarded {
            control(conn, "SAVEPOINT command").await?;
        }
        let before = head;
        let result = {
            let mut tx = Tx { conn: &mut *conn, head: &mut head, kill_epoch: &mut kill_epoch };
            // A panic in one command (a bug, never expected) fails that command alone.
            AssertUnwindSafe(tx.apply(&cmd.op))
                .catch_unwind()
                .await
                .unwrap_or_else(|_| Err(LedgerError::Unavailable("internal error in the ledger writer".into())))
        };
        let keep = matches!(&result, Ok(applied) if applied.keep);
        if !guarded && !keep {
            control(conn, "ROLLBACK").await?;
            return Ok(false);
        }
        if guarded && keep {
            control(conn, "RELEASE SAVEPOINT command").await?;
        } else if guarded {
            // What the command read or moved is undone with it.
            (head, kill_epoch) = (before, None);
            control(conn, "ROLLBACK TO SAVEPOINT command").await?;
            control(conn, "RELEASE SAVEPOINT command").await?;
        }
        results.push(result.map(|a| a.reply));
    }

    if head != start {
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(head.seq)
            .bind(hex::encode(head.hash))
            .execute(&mut *conn)
            .await
            .map_err(db_err)?;
    }
    control(conn, "COMMIT").await?;
    Ok(true)
}

async fn control(conn: &mut PgConnection, sql: &'static str) -> Result<(), LedgerError> {
    sqlx::raw_sql(sql).execute(conn).await.map(drop).map_err(db_err)
}
