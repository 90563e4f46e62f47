//! WAL checkpoints off the writer's path.
//!
//! A checkpoint copies the pages that commits appended to the WAL back into the database file
//! and syncs it. SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold,
//! so that batch's callers wait for it: about 5 ms for 1,000 pages on a small VM, several times
//! a second under load, a fifth of the writer's time and most of the exchange's p99. Instead:
//!
//! * the writer's WAL hook (which replaces the automatic checkpoint) records the WAL's length
//!   after each commit and wakes the [`Checkpointer`], a thread with a connection of its own,
//!   every [`BACKGROUND_FRAMES`] frames. Its checkpoints are `PASSIVE`: they copy what no reader
//!   still needs and never wait for, nor block, the writer or a reader;
//! * the WAL starts over from its beginning (instead of growing) only after a checkpoint has
//!   copied all of it, which cannot happen while the writer keeps appending. So once the WAL is
//!   [`CATCH_UP_FRAMES`] long, the writer checkpoints itself between two batches, after the first
//!   batch's callers have their answers ([`WalLength::needs_catch_up`]): only what the
//!   checkpointer has not copied yet is left, and the writer's next transaction starts the WAL
//!   over.
//!
//! Durability does not change: a checkpoint only ever copies committed frames and syncs the
//! database file before the WAL may be reused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::codec::db_err;
use crate::ledger::LedgerError;

/// WAL frames (pages) appended between two wake-ups of the checkpointer: SQLite's own default
/// threshold for its automatic checkpoint.
pub(super) const BACKGROUND_FRAMES: u32 = 1_000;

/// The WAL length (16 MiB of 4 KiB pages) at which the writer catches up itself, so that the WAL
/// restarts. Larger means fewer catch-ups but a longer WAL for readers to search.
pub(super) const CATCH_UP_FRAMES: u32 = 4_000;

/// The WAL's length after the writer's last commit, shared by the writer's WAL hook (which sets
/// it) and the writer's loop (which reads it).
#[derive(Debug, Clone, Default)]
pub(super) struct WalLength(Arc<AtomicU32>);

impl WalLength {
    /// Whether the writer should checkpoint itself before its next batch.
    pub(super) fn needs_catch_up(&self) -> bool {
        self.0.load(Ordering::Relaxed) >= CATCH_UP_FRAMES
    }
}

/// Makes `conn` (the writer's connection) report its WAL's length after each commit and wake
/// `checkpointer` every [`BACKGROUND_FRAMES`] frames. SQLite's automatic checkpoint is itself a
/// WAL hook, so this hook replaces it.
pub(super) fn watch(conn: &mut Connection, checkpointer: &Checkpointer) -> Result<WalLength, LedgerError> {
    let length = WalLength::default();
    let seen = length.clone();
    let wake = checkpointer.wake.clone();
    let mut woken_at = 0u32;
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
        let frames = u32::try_from(frames).unwrap_or(0);
        seen.0.store(frames, Ordering::Relaxed);
        // A shorter WAL than at the last wake-up has started over.
        if frames < woken_at {
            woken_at = 0;
        }
        if frames - woken_at >= BACKGROUND_FRAMES {
            woken_at = frames;
            // A full channel means a wake-up is already pending: that one will do.
            let _ = wake.try_send(());
        }
        Ok(())
    }))
    .map_err(db_err)?;
    Ok(length)
}

/// Runs a `PASSIVE` checkpoint on `conn`: copies every frame no reader still needs.
pub(super) fn checkpoint(conn: &Connection) -> Result<(), LedgerError> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())).map_err(db_err)
}

/// The checkpointer thread. Dropping it stops the thread and waits for it, so that its
/// connection is closed when the ledger is.
pub(super) struct Checkpointer {
    wake: SyncSender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on `conn`, a read-write connection to the ledger's database.
    pub(super) fn start(conn: Connection) -> Result<Checkpointer, LedgerError> {
        let (wake, woken) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name("latchkey-ledger-checkpointer".into())
            .spawn(move || run(&conn, &woken, &stopping))
            .map_err(|e| LedgerError::Unavailable(format!("cannot start the WAL checkpointer: {e}")))?;
        Ok(Checkpointer { wake, stop, thread: Some(thread) })
    }
}

fn run(conn: &Connection, woken: &Receiver<()>, stop: &AtomicBool) {
    while woken.recv().is_ok() && !stop.load(Ordering::Relaxed) {
        if let Err(e) = checkpoint(conn) {
            // The writer's own catch-up and the next wake-up try again; nothing is lost.
            tracing::warn!(error = %e, "ledger.checkpoint_failed");
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A full channel already holds a wake-up, which the thread sees before it stops.
        let _ = self.wake.try_send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
