//! The writer thread: the only connection that writes, and group commit.
//!
//! Callers send [`Command`]s over a bounded channel. The writer takes every command already
//! queued, and those that arrive while it runs them (up to [`MAX_BATCH`]), in ONE
//! `BEGIN IMMEDIATE … COMMIT`, so one fsync makes a whole batch durable. Between batches it may
//! finish a WAL checkpoint ([`super::wal`]). A command that fails (or answers "nothing changed",
//! like a killed activation) rolls back alone and the rest of the batch commits.
//!
//! The batch first runs as it nearly always ends: every command keeping its changes, with no
//! savepoint between them (a savepoint copies each page a command touches into the statement
//! journal, which cost a fifth of the writer's time). If a command fails or undoes itself, that
//! transaction is rolled back whole, nothing of it answered, and the batch runs again with each
//! command in its own savepoint, so that one command can roll back alone.
//!
//! Invariants:
//! * a reply leaves only after the COMMIT that made it durable succeeded; if COMMIT fails, every
//!   command of the batch gets the error and nothing of it is kept;
//! * the in-memory chain head always equals the last committed-or-pending audit row: it is saved
//!   before each savepoint and restored when the savepoint rolls back, and saved at BEGIN and
//!   restored when the whole transaction is lost, so the chain never forks and has no gaps.

use std::fs::File;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

use super::codec::db_err;
use super::ops::Tx;
use super::wal::{self, Checkpointer, WalState};
use crate::ledger::LedgerError;
use crate::ledger::command::{Op, Reply};
use crate::ledger::rows::copy_err;

/// The most commands one transaction takes. Large enough that a burst shares one fsync, small
/// enough that the first command of a batch does not wait long for the last.
pub(super) const MAX_BATCH: usize = 256;

pub(super) type ReplyTx = oneshot::Sender<Result<Reply, LedgerError>>;

pub(super) struct Command {
    pub(super) op: Op,
    pub(super) reply: ReplyTx,
}

/// The last event of the chain: its sequence number (0 before the first) and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChainHead {
    pub(super) seq: i64,
    pub(super) hash: [u8; 32],
}

pub(super) struct Writer {
    conn: Connection,
    head: ChainHead,
    /// The WAL's length and how much of it is copied, and the thread that checkpoints it
    /// (declared after `conn`, so that the writer's connection closes first).
    wal: WalState,
    _checkpointer: Checkpointer,
    /// Whether the last catch-up failed (a full disk): logged once, not once per batch.
    catch_up_failing: bool,
    /// The exclusive lock on the database's sidecar lock file. Declared after `conn` so that it
    /// is released only once the connection is closed.
    _lock: File,
}

impl Writer {
    /// A writer on `conn`. `checkpoints`, a second read-write connection to the same database,
    /// goes to the thread that checkpoints the WAL in the background.
    pub(super) fn new(
        mut conn: Connection,
        head: ChainHead,
        lock: File,
        checkpoints: Connection,
    ) -> Result<Self, LedgerError> {
        let checkpointer = Checkpointer::start(checkpoints)?;
        let wal = wal::watch(&mut conn, &checkpointer)?;
        Ok(Writer { conn, head, wal, _checkpointer: checkpointer, catch_up_failing: false, _lock: lock })
    }

    /// Starts the writer thread. It runs until every sender is dropped.
    pub(super) fn spawn(self, rx: mpsc::Receiver<Command>) -> Result<JoinHandle<()>, LedgerError> {
        std::thread::Builder::new()
            .name("latchkey-ledger-writer".into())
            .spawn(move || self.run(rx))
            .map_err(|e| LedgerError::Unavailable(format!("cannot start the ledger writer: {e}")))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        let mut answers = Vec::with_capacity(MAX_BATCH);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            // Whatever queued up while the previous batch was being committed goes in this one:
            // that is the group commit.
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(cmd) => batch.push(cmd),
                    Err(_) => break,
                }
            }
            self.run_batch(&mut batch, &mut answers, || rx.try_recv().ok());
            self.catch_up();
        }
    }

    /// Between two batches, once the WAL is long and the checkpointer has copied nearly all of
    /// it: checkpoints the rest, so that the next transaction starts the WAL over ([`wal`]).
    pub(super) fn catch_up(&mut self) {
        if !self.wal.catch_up_due() {
            return;
        }
        let result = wal::checkpoint(&self.conn);
        if let Ok(Some(copied)) = result {
            self.wal.checkpointed(copied);
        }
        match result {
            Err(e) if !self.catch_up_failing => {
                self.catch_up_failing = true;
                tracing::warn!(error = %e, "ledger.checkpoint_failed");
            }
            Ok(_) if self.catch_up_failing => {
                self.catch_up_failing = false;
                tracing::info!("ledger.checkpoint_recovered");
            }
            _ => {}
        }
    }

    #[cfg(test)]
    pub(super) fn head_for_tests(&self) -> ChainHead {
        self.head
    }

    #[cfg(test)]
    pub(super) fn conn_for_tests(&self) -> &Connection {
        &self.conn
    }

    /// Starts a batch's transaction. A transaction still open here is one whose ROLLBACK failed
    /// (an I/O error): it is rolled back first, or every later batch would fail to begin.
    fn begin(&self) -> Result<(), LedgerError> {
        if !self.conn.is_autocommit() {
            tracing::warn!("ledger.stale_transaction_rolled_back");
            self.control("ROLLBACK")?;
        }
        self.control("BEGIN IMMEDIATE")
    }

    fn control(&self, sql: &str) -> Result<(), LedgerError> {
        self.conn.prepare_cached(sql).and_then(|mut s| s.execute([])).map(|_| ()).map_err(db_err)
    }

    pub(super) fn run_batch(
        &mut self,
        batch: &mut Vec<Command>,
        answers: &mut Vec<(ReplyTx, Result<Reply, LedgerError>)>,
        more: impl FnMut() -> Option<Command>,
    ) {
        if !self.run_unguarded(batch, more) {
            self.run_guarded(batch, answers);
        }
    }

    /// Runs the batch in one transaction without savepoints, and answers it. Commands that
    /// arrive (`more`) while it runs join it before the COMMIT, up to [`MAX_BATCH`]: they share
    /// its fsync instead of waiting for the next. Returns false, with nothing changed and no
    /// command answered, as soon as a command fails or undoes itself (or the transaction cannot
    /// begin): the batch (with the commands that joined it) must then run guarded.
    fn run_unguarded(&mut self, batch: &mut Vec<Command>, mut more: impl FnMut() -> Option<Command>) -> bool {
        let start = self.head;
        if self.begin().is_err() {
            return false;
        }
        let mut replies = Vec::with_capacity(batch.len());
        let mut next = 0;
        loop {
            if next == batch.len() {
                match (batch.len() < MAX_BATCH).then(&mut more).flatten() {
                    Some(cmd) => batch.push(cmd),
                    None => break,
                }
            }
            let cmd = &batch[next];
            next += 1;
            let mut tx = Tx { conn: &self.conn, head: &mut self.head };
            match catch_unwind(AssertUnwindSafe(|| tx.apply(&cmd.op))) {
                Ok(Ok(applied)) if applied.keep => replies.push(applied.reply),
                _ => {
                    if !self.conn.is_autocommit() {
                        let _ = self.control("ROLLBACK");
                    }
                    self.head = start;
                    return false;
                }
            }
        }
        match self.control("COMMIT") {
            Ok(()) => {
                for (cmd, reply) in batch.drain(..).zip(replies) {
                    let _ = cmd.reply.send(Ok(reply));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = batch.len(), "ledger.commit_failed");
                if !self.conn.is_autocommit() {
                    let _ = self.control("ROLLBACK");
                }
                self.head = start;
                for cmd in batch.drain(..) {
                    let _ = cmd.reply.send(Err(copy_err(&e)));
                }
            }
        }
        true
    }

    /// Runs the batch with each command in its own savepoint, and answers it.
    fn run_guarded(&mut self, batch: &mut Vec<Command>, answers: &mut Vec<(ReplyTx, Result<Reply, LedgerError>)>) {
        let mut start = self.head;
        if let Err(e) = self.begin() {
            for cmd in batch.drain(..) {
                let _ = cmd.reply.send(Err(copy_err(&e)));
            }
            return;
        }
        let mut commands = batch.drain(..);
        while let Some(cmd) = commands.next() {
            let before = self.head;
            let result = self.control("SAVEPOINT command").and_then(|()| {
                let mut tx = Tx { conn: &self.conn, head: &mut self.head };
                // A panic in one command (a bug, never expected) must not take the writer, and
                // with it the whole ledger, down: it fails that command alone.
                catch_unwind(AssertUnwindSafe(|| tx.apply(&cmd.op)))
                    .unwrap_or_else(|_| Err(LedgerError::Unavailable("internal error in the ledger writer".into())))
            });
            let keep = matches!(&result, Ok(applied) if applied.keep);
            let closed = if keep {
                self.control("RELEASE command")
            } else {
                self.head = before;
                self.control("ROLLBACK TO command").and_then(|()| self.control("RELEASE command"))
            };
            answers.push((cmd.reply, result.map(|a| a.reply)));

            // Some errors (I/O, disk full) make SQLite roll the whole transaction back by itself.
            // Everything this batch did so far is then gone: its commands are answered with the
            // error and the rest of the batch starts a new transaction.
            if closed.is_err() || self.conn.is_autocommit() {
                let why = match closed {
                    Err(e) => e.to_string(),
                    Ok(()) => "the transaction was rolled back by the store".to_owned(),
                };
                if !self.conn.is_autocommit() {
                    let _ = self.control("ROLLBACK");
                }
                self.head = start;
                for (reply, result) in answers.drain(..) {
                    let result = match result {
                        Ok(_) => Err(LedgerError::Unavailable(why.clone())),
                        err => err,
                    };
                    let _ = reply.send(result);
                }
                if let Err(e) = self.begin() {
                    for cmd in commands.by_ref() {
                        let _ = cmd.reply.send(Err(copy_err(&e)));
                    }
                    return;
                }
                start = self.head;
            }
        }
        drop(commands);

        match self.control("COMMIT") {
            Ok(()) => {
                for (reply, result) in answers.drain(..) {
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, commands = answers.len(), "ledger.commit_failed");
                if !self.conn.is_autocommit() {
                    let _ = self.control("ROLLBACK");
                }
                self.head = start;
                for (reply, _) in answers.drain(..) {
                    let _ = reply.send(Err(copy_err(&e)));
                }
            }
        }
    }
}
