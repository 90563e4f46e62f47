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
//!   still needs and never wait for, nor block, the writer or a reader. It records how much of
//!   the WAL is copied, and syncs the database file after each checkpoint: SQLite syncs it only
//!   after a checkpoint that reached the WAL's end, which one racing the writer rarely does;
//! * the WAL starts over from its beginning (instead of growing) only after a checkpoint has
//!   copied all of it, which cannot happen while the writer keeps appending. So once the WAL is
//!   [`CATCH_UP_FRAMES`] long, the writer checkpoints itself between two batches, after the first
//!   batch's callers have their answers, and its next transaction starts the WAL over. Every
//!   caller waiting meanwhile waits for that checkpoint, so the writer does it when it is short:
//!   just after the checkpointer has copied and synced all but [`CHEAP_FRAMES`] of the WAL
//!   ([`WalState::catch_up_due`]). Copying and syncing everything since the last sync itself
//!   took 3 to 10 ms, ten times a second at 5,000 exchanges/s, and set the exchange's p99.
//!   Should the checkpointer fall behind for good, the writer catches up anyway at
//!   [`FORCE_FRAMES`].
//!
//! Durability does not change: a checkpoint only ever copies committed frames and syncs the
//! database file before the WAL may be reused.

use std::fs::File;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use rusqlite::Connection;

use super::codec::db_err;
use crate::ledger::LedgerError;

/// WAL frames (pages) appended between two wake-ups of the checkpointer. Smaller steps spread
/// its writes and syncs, which share the disk with the writer's commits (500 gave a lower p99
/// than SQLite's default of 1,000 at 32 connections, docs/BENCHMARKS.md).
pub(super) const BACKGROUND_FRAMES: u32 = 500;

/// The WAL length (about 60 MiB of 4 KiB pages) from which the writer catches up itself, so that
/// the WAL restarts. Each catch-up pauses the writer for 2 to 3 ms, so longer means fewer pauses
/// (at 15,000 pages about three a second at 6,000 exchanges/s, against twelve at 4,000 pages, and
/// a lower p99, docs/BENCHMARKS.md) but a longer WAL for readers to search.
pub(super) const CATCH_UP_FRAMES: u32 = 15_000;

/// At most this many frames left to copy make a catch-up short enough to run at once (2 to 3 ms
/// on the development VM, most of it the database file's sync).
pub(super) const CHEAP_FRAMES: u32 = 400;

/// The WAL length (about 120 MiB) at which the writer catches up whatever is left to copy. It
/// stays under [`WAL_SIZE_LIMIT`].
pub(super) const FORCE_FRAMES: u32 = 30_000;

/// The WAL file's size once the WAL starts over (`journal_size_limit`): larger than the longest
/// WAL, so that the file is overwritten in place. A WAL growing past the file's end makes each
/// commit's `fdatasync` also commit the file's new size and blocks to the filesystem journal
/// (a catch-up at 30,000 pages with a 64 MiB limit doubled the p99).
pub(super) const WAL_SIZE_LIMIT: i64 = 128 * 1024 * 1024;

/// What the writer and the checkpointer know of the WAL: its length after the writer's last
/// commit (set by the writer's WAL hook) and how many of its frames the last checkpoint copied.
#[derive(Debug, Clone, Default)]
pub(super) struct WalState(Arc<Counts>);

#[derive(Debug, Default)]
struct Counts {
    length: AtomicU32,
    copied: AtomicU32,
}

impl WalState {
    /// Whether the writer should checkpoint itself before its next batch.
    pub(super) fn catch_up_due(&self) -> bool {
        catch_up_due(self.0.length.load(Ordering::Relaxed), self.0.copied.load(Ordering::Relaxed))
    }

    /// Records that the first `copied` frames of the WAL are in the database file.
    pub(super) fn checkpointed(&self, copied: u32) {
        self.0.copied.store(copied, Ordering::Relaxed);
    }
}

/// The catch-up rule on a WAL `length` frames long of which `copied` are in the database file.
pub(super) fn catch_up_due(length: u32, copied: u32) -> bool {
    length >= FORCE_FRAMES || (length >= CATCH_UP_FRAMES && length.saturating_sub(copied) <= CHEAP_FRAMES)
}

/// Makes `conn` (the writer's connection) report its WAL's length after each commit and wake
/// `checkpointer` every [`BACKGROUND_FRAMES`] frames. SQLite's automatic checkpoint is itself a
/// WAL hook, so this hook replaces it.
pub(super) fn watch(conn: &mut Connection, checkpointer: &Checkpointer) -> Result<WalState, LedgerError> {
    let state = checkpointer.state.clone();
    let seen = state.clone();
    let wake = checkpointer.wake.clone();
    let mut woken_at = 0u32;
    conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int| {
        let frames = u32::try_from(frames).unwrap_or(0);
        seen.0.length.store(frames, Ordering::Relaxed);
        // A shorter WAL than at the last wake-up has started over: none of it is copied yet.
        // (A count of the previous WAL may still land after this one, from a checkpoint that was
        // syncing when the WAL started over; the checkpointer's next pass, 500 frames on, long
        // before this WAL is long enough for a catch-up, replaces it.)
        if frames < woken_at {
            woken_at = 0;
            seen.0.copied.store(0, Ordering::Relaxed);
        }
        if frames - woken_at >= BACKGROUND_FRAMES {
            woken_at = frames;
            // A full channel means a wake-up is already pending: that one will do.
            let _ = wake.try_send(());
        }
        Ok(())
    }))
    .map_err(db_err)?;
    Ok(state)
}

/// Runs a `PASSIVE` checkpoint on `conn`, which copies every frame no reader still needs.
/// Returns how many frames of the WAL are now copied, or `None` when another checkpoint was
/// running.
pub(super) fn checkpoint(conn: &Connection) -> Result<Option<u32>, LedgerError> {
    // (busy, frames in the WAL, frames copied); -1 when the checkpoint could not run because
    // another one was running.
    let copied = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(2)).map_err(db_err)?;
    Ok(u32::try_from(copied).ok())
}

/// The checkpointer thread. Dropping it stops the thread and waits for it, so that its
/// connection is closed when the ledger is.
pub(super) struct Checkpointer {
    state: WalState,
    wake: SyncSender<()>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread on `conn`, a read-write connection to the ledger's database.
    pub(super) fn start(conn: Connection) -> Result<Checkpointer, LedgerError> {
        let unavailable =
            |e: std::io::Error| LedgerError::Unavailable(format!("cannot start the WAL checkpointer: {e}"));
        let path = conn.path().map(std::path::PathBuf::from).unwrap_or_default();
        let db = File::open(path).map_err(unavailable)?;
        let (wake, woken) = sync_channel(1);
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let state = WalState::default();
        let counts = state.clone();
        let thread = std::thread::Builder::new()
            .name("latchkey-ledger-checkpointer".into())
            .spawn(move || run(&conn, &db, &counts, &woken, &stopping))
            .map_err(unavailable)?;
        Ok(Checkpointer { state, wake, stop, thread: Some(thread) })
    }
}

fn run(conn: &Connection, db: &File, state: &WalState, woken: &Receiver<()>, stop: &AtomicBool) {
    let mut synced = 0;
    while woken.recv().is_ok() && !stop.load(Ordering::Relaxed) {
        let copied = match checkpoint(conn) {
            Ok(copied) => copied,
            Err(e) => {
                // The writer's own catch-up and the next wake-up try again; nothing is lost.
                tracing::warn!(error = %e, "ledger.checkpoint_failed");
                None
            }
        };
        // SQLite syncs the database file only after a checkpoint that reached the WAL's end,
        // which a checkpoint racing the writer rarely does: what it copied would be synced by
        // the writer's catch-up, all at once, with every caller waiting. Syncing it here keeps
        // the catch-up down to the last few frames. Only synced frames count as copied.
        if let Some(copied) = copied.filter(|&c| c != synced) {
            match db.sync_data() {
                Ok(()) => {
                    synced = copied;
                    state.checkpointed(copied);
                }
                Err(e) => tracing::warn!(error = %e, "ledger.checkpoint_sync_failed"),
            }
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
