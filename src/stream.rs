//! The audit stream: every audit event, as one JSON line, to stdout or a file, for a SIEM.
//!
//! A line is exactly an item of `GET /v1/audit` (`{"seq", "hash", "prev_hash", "event": {…}}`),
//! so the stream, the API and `latchkey audit verify --checkpoints` share one schema
//! (`docs/AUDIT.md`).
//!
//! Delivery is at least once, in chain order: the stream reads committed events from the store
//! (it never sees a change that was rolled back), writes and flushes them, and only then records
//! the last sequence number delivered in the store. A restart resumes after that; a crash between
//! the write and the record repeats a few lines, which a SIEM drops by `seq`.
//!
//! Log rotation: before each batch the file's path is checked; when the file was moved or
//! deleted (its device/inode changed, or it is gone), a new one is opened at the path. SIGHUP
//! forces a reopen too.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::app::{App, AppState};
use crate::records::EventView;

/// How often the store is polled for new events.
const POLL: Duration = Duration::from_millis(250);
/// Events per batch.
const BATCH: usize = 1000;

/// Where the lines go.
#[derive(Debug)]
pub enum Sink {
    Stdout,
    File(FileSink),
}

impl Sink {
    /// `"stdout"`, or a file path (relative paths already resolved).
    pub fn open(target: &str, resolve: impl Fn(&Path) -> PathBuf) -> std::io::Result<Sink> {
        if target == "stdout" || target == "-" {
            return Ok(Sink::Stdout);
        }
        FileSink::open(resolve(Path::new(target))).map(Sink::File)
    }

    /// The name the stream's position is kept under.
    pub fn name(&self) -> String {
        match self {
            Sink::Stdout => "stdout".into(),
            Sink::File(f) => format!("file:{}", f.path.display()),
        }
    }

    /// Writes whole lines and flushes them (to disk, for a file).
    pub fn write_batch(&mut self, text: &str) -> std::io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(text.as_bytes())?;
                out.flush()
            }
            Sink::File(f) => f.write_batch(text),
        }
    }

    pub fn reopen(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout => Ok(()),
            Sink::File(f) => f.reopen(),
        }
    }
}

/// An append-only file that follows log rotation.
#[derive(Debug)]
pub struct FileSink {
    path: PathBuf,
    file: File,
}

impl FileSink {
    pub fn open(path: PathBuf) -> std::io::Result<FileSink> {
        let file = open_append(&path)?;
        Ok(FileSink { path, file })
    }

    fn reopen(&mut self) -> std::io::Result<()> {
        self.file = open_append(&self.path)?;
        Ok(())
    }

    /// Whether the path still names the open file.
    fn still_ours(&self) -> bool {
        let Ok(on_disk) = std::fs::metadata(&self.path) else { return false };
        let Ok(open) = self.file.metadata() else { return false };
        same_file(&on_disk, &open)
    }

    pub fn write_batch(&mut self, text: &str) -> std::io::Result<()> {
        if !self.still_ours() {
            tracing::info!(path = %self.path.display(), "audit.stream_reopened");
            self.reopen()?;
        }
        self.file.write_all(text.as_bytes())?;
        self.file.sync_data()
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    a.len() == b.len()
}

/// Delivers every event after the stored position; returns how many.
pub async fn pump(app: &App, sink: &mut Sink) -> Result<usize, String> {
    let name = sink.name();
    let mut after = app.ledger.stream_position(&name).await.map_err(|e| e.to_string())?.unwrap_or(0);
    let mut delivered = 0;
    loop {
        let events = app.ledger.events(after, BATCH).await.map_err(|e| e.to_string())?;
        let Some(last) = events.last().map(|e| e.seq) else { return Ok(delivered) };
        let mut text = String::new();
        for e in &events {
            let line = serde_json::to_string(&EventView::from(e)).map_err(|e| e.to_string())?;
            text.push_str(&line);
            text.push('\n');
        }
        sink.write_batch(&text).map_err(|e| format!("writing the audit stream: {e}"))?;
        app.ledger.set_stream_position(&name, last).await.map_err(|e| e.to_string())?;
        delivered += events.len();
        after = last;
        if events.len() < BATCH {
            return Ok(delivered);
        }
    }
}

/// Starts the stream when `[audit] stream` is set. Fails only when the file cannot be opened.
pub fn spawn(app: &AppState) -> anyhow::Result<()> {
    let Some(target) = app.config.audit.stream.clone() else { return Ok(()) };
    let mut sink = Sink::open(&target, |p| app.config.resolve(p))
        .map_err(|e| anyhow::anyhow!("cannot open the audit stream {target}: {e}"))?;
    let app = app.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            {
                let hangup = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = hangup => {
                        if let Err(e) = sink.reopen() {
                            tracing::warn!(error = %e, "audit.stream_reopen_failed");
                        }
                    }
                }
            }
            #[cfg(not(unix))]
            tick.tick().await;
            if let Err(e) = pump(&app, &mut sink).await {
                // Nothing is lost: the position only moves past what was written.
                tracing::warn!(error = %e, "audit.stream_failed");
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_or_deleted_file_is_reopened_at_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let mut sink = FileSink::open(path.clone()).unwrap();
        sink.write_batch("1\n").unwrap();
        std::fs::rename(&path, dir.path().join("audit.jsonl.1")).unwrap();
        sink.write_batch("2\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        sink.write_batch("3\n").unwrap();
        sink.write_batch("4\n").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("audit.jsonl.1")).unwrap(), "1\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "3\n4\n");
    }
}
