//! The load: a closed loop over `concurrency` keep-alive connections, each sending the next
//! pre-minted token as soon as the previous answer arrived, while `/proc` is sampled. With
//! `--backend aws` a second load calls STS `AssumeRole` directly, in the same loop.
//!
//! Measurement window: a request counts when it *completes* inside
//! `[start + warmup, start + warmup + duration]`. Requests that complete during the warm-up or
//! after the window are sent (they load the server) but not counted, so the window holds exactly
//! `duration` of steady-state work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::http1::{self, Http1, Http1Error};
use crate::procfs::{self, CoresUsed, CpuSnapshot};

/// How many error bodies are kept for the report.
const KEPT_ERRORS: usize = 5;
/// Every request has a deadline, so a stuck server cannot hang the benchmark.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Memory is sampled this often; a short spike between two samples is still caught by `VmHWM`.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

/// What each request of the loop is.
#[derive(Clone)]
pub enum Call {
    /// An exchange: the next pre-minted form, posted to latchkey's `/v1/token` at this URL.
    Exchange(Arc<str>),
    /// The backend alone: STS `AssumeRole`, no token needed.
    AssumeRole(Arc<crate::moto::AssumeRole>),
}

pub struct Plan {
    pub call: Call,
    /// `http://127.0.0.1:PORT`, for `/metrics`.
    pub base_url: String,
    pub concurrency: usize,
    pub warmup: Duration,
    pub duration: Duration,
    pub server_pid: u32,
    /// Record a `perf` profile of the server over the measured window into this file.
    pub profile: Option<PathBuf>,
    /// Where `perf`'s own output goes.
    pub profile_log: PathBuf,
    /// Print a progress line every few seconds (to stderr).
    pub progress: bool,
}

/// What the load measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Latency of every successful exchange that completed in the window, sorted, in ns.
    pub latencies_ns: Vec<u64>,
    /// Failed requests by kind (`"400"`, `"503"`, `"transport: timeout"`, …), in every phase.
    pub errors: BTreeMap<String, u64>,
    /// Successful exchanges during the warm-up and after the window (sent, not counted).
    pub uncounted_ok: u64,
    /// The measured window: `duration`, or less when the tokens ran out.
    pub window: Duration,
    /// Successful exchanges per whole second of the window.
    pub per_second: Vec<u64>,
    /// The pre-minted tokens ran out before the end.
    pub exhausted: bool,
    /// The server process died during the load, which was stopped there.
    pub server_died: bool,
    pub tokens_used: usize,
    /// The first few error answers, for the report.
    pub first_errors: Vec<String>,
    /// CPU over the window.
    pub cores: CoresUsed,
    /// Highest sampled `VmRSS` of the server during the load, and its `VmHWM` at the end.
    pub rss_max_kib: u64,
    pub hwm_kib: u64,
    /// Mean server-side exchange time (ms) and exchange count over the window, from the broker's
    /// `/metrics`, when it exports them.
    pub server_side: Option<(f64, u64)>,
    /// Set when a profile was recorded.
    pub profile: Option<PathBuf>,
}

struct Shared {
    tokens: Mutex<std::vec::IntoIter<Vec<u8>>>,
    taken: AtomicUsize,
    measure_from: Instant,
    stop_at: Instant,
    /// Set when the server died: the workers stop instead of spending tokens on refused
    /// connections.
    abort: AtomicBool,
    per_second: Vec<AtomicU64>,
    ok_total: AtomicU64,
    errors_total: AtomicU64,
    first_errors: Mutex<Vec<String>>,
}

impl Shared {
    fn next_body(&self) -> Option<Vec<u8>> {
        let body = self.tokens.lock().ok()?.next();
        if body.is_some() {
            self.taken.fetch_add(1, Ordering::Relaxed);
        }
        body
    }

    fn keep_error(&self, message: String) {
        if let Ok(mut kept) = self.first_errors.lock()
            && kept.len() < KEPT_ERRORS
        {
            kept.push(message);
        }
    }
}

#[derive(Default)]
struct WorkerStats {
    latencies_ns: Vec<u64>,
    uncounted_ok: u64,
    errors: BTreeMap<String, u64>,
    last_done: Option<Instant>,
    exhausted: bool,
}

/// One closed loop. An exchange loop has one keep-alive connection of its own ([`Http1`]).
async fn worker(call: Call, shared: Arc<Shared>) -> WorkerStats {
    let mut stats = WorkerStats { latencies_ns: Vec::with_capacity(64 * 1024), ..WorkerStats::default() };
    // What the loop calls: its own connection to latchkey, or moto's AssumeRole.
    enum Target {
        Latchkey(Http1),
        Moto(Arc<crate::moto::AssumeRole>),
    }
    let mut target = match call {
        Call::Exchange(url) => match Http1::new(&url) {
            Ok(c) => Target::Latchkey(c),
            Err(e) => {
                shared.keep_error(format!("{e:#}"));
                return stats;
            }
        },
        Call::AssumeRole(direct) => Target::Moto(direct),
    };
    loop {
        if Instant::now() >= shared.stop_at || shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let sent;
        let answer = match &mut target {
            Target::Latchkey(connection) => {
                let Some(body) = shared.next_body() else {
                    stats.exhausted = true;
                    break;
                };
                sent = Instant::now();
                exchange(connection, &body).await
            }
            Target::Moto(direct) => {
                shared.taken.fetch_add(1, Ordering::Relaxed);
                sent = Instant::now();
                direct.call().await
            }
        };
        let done = Instant::now();
        stats.last_done = Some(done);
        let in_window = done >= shared.measure_from && done <= shared.stop_at;
        match answer {
            Ok(()) => {
                shared.ok_total.fetch_add(1, Ordering::Relaxed);
                if in_window {
                    stats.latencies_ns.push(u64::try_from(done.duration_since(sent).as_nanos()).unwrap_or(u64::MAX));
                    let second = done.duration_since(shared.measure_from).as_secs() as usize;
                    if let Some(slot) = shared.per_second.get(second) {
                        slot.fetch_add(1, Ordering::Relaxed);
                    }
                } else {
                    stats.uncounted_ok += 1;
                }
            }
            Err(Failure { kind, message }) => {
                shared.errors_total.fetch_add(1, Ordering::Relaxed);
                *stats.errors.entry(kind).or_default() += 1;
                shared.keep_error(message);
            }
        }
    }
    stats
}

/// A failed request: its kind (`"400"`, `"transport: timeout"`, …) and what to show of it.
pub struct Failure {
    pub kind: String,
    pub message: String,
}

/// One exchange. Success is a 200 whose body carries an `access_token`; anything else is an
/// error, including a 200 without one.
async fn exchange(connection: &mut Http1, form: &[u8]) -> Result<(), Failure> {
    let answer = tokio::time::timeout(REQUEST_TIMEOUT, connection.post_form(form)).await;
    let (status, body) = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) => {
            let kind = if matches!(e, Http1Error::Connect(_)) { "transport: connect" } else { "transport: other" };
            return Err(Failure { kind: kind.into(), message: format!("{kind}: {e}") });
        }
        Err(_) => {
            // The connection is mid-request: the next one starts over.
            connection.reset();
            let kind = "transport: timeout";
            return Err(Failure { kind: kind.into(), message: format!("{kind}: no answer in {REQUEST_TIMEOUT:?}") });
        }
    };
    if status == 200 && http1::find(body, b"\"access_token\"").is_some() {
        return Ok(());
    }
    let kind = if status == 200 { "200 without access_token".into() } else { status.to_string() };
    let text = String::from_utf8_lossy(body);
    let shown: String = text.chars().take(400).collect();
    Err(Failure { kind, message: format!("HTTP {status}: {shown}") })
}

/// Runs the load with `bodies` (each a complete exchange form) and samples the server.
pub async fn run(plan: &Plan, bodies: Vec<Vec<u8>>) -> anyhow::Result<Outcome> {
    let ticks = procfs::clock_ticks_per_second();
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let stop_at = measure_from + plan.duration;
    let seconds = plan.duration.as_secs() as usize + 1;
    let shared = Arc::new(Shared {
        tokens: Mutex::new(bodies.into_iter()),
        taken: AtomicUsize::new(0),
        measure_from,
        stop_at,
        abort: AtomicBool::new(false),
        per_second: (0..seconds).map(|_| AtomicU64::new(0)).collect(),
        ok_total: AtomicU64::new(0),
        errors_total: AtomicU64::new(0),
        first_errors: Mutex::new(Vec::new()),
    });
    let handles: Vec<_> =
        (0..plan.concurrency).map(|_| tokio::spawn(worker(plan.call.clone(), shared.clone()))).collect();

    let mut sampler = tokio::time::interval_at(start.into(), SAMPLE_EVERY);
    sampler.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut outcome = Outcome::default();
    let mut before: Option<CpuSnapshot> = None;
    let metrics_client = reqwest::Client::builder().no_proxy().build()?;
    let mut metrics_before = None;
    let mut perf: Option<tokio::process::Child> = None;
    let mut last_progress = (start, 0u64);
    let after = loop {
        sampler.tick().await;
        let now = Instant::now();
        if let Some(m) = procfs::memory(plan.server_pid) {
            outcome.rss_max_kib = outcome.rss_max_kib.max(m.rss_kib);
            outcome.hwm_kib = outcome.hwm_kib.max(m.hwm_kib);
        }
        if before.is_none() && now >= measure_from {
            before = Some(CpuSnapshot::take(plan.server_pid));
            metrics_before = crate::metrics::scrape(&metrics_client, &plan.base_url).await;
            if let Some(out) = &plan.profile {
                perf = start_perf(plan.server_pid, plan.duration, out, &plan.profile_log);
            }
        }
        if plan.progress && now.duration_since(last_progress.0) >= Duration::from_secs(5) {
            let ok = shared.ok_total.load(Ordering::Relaxed);
            let rate = (ok - last_progress.1) as f64 / now.duration_since(last_progress.0).as_secs_f64();
            let phase = if now < measure_from { "warm-up" } else { "measuring" };
            eprintln!(
                "  {:>5.1} s  {phase:<9}  {rate:>8.0} exchanges/s  errors {}",
                now.duration_since(start).as_secs_f64(),
                shared.errors_total.load(Ordering::Relaxed)
            );
            last_progress = (now, ok);
        }
        if !procfs::alive(plan.server_pid) {
            outcome.server_died = true;
            shared.abort.store(true, Ordering::Relaxed);
        }
        if now >= stop_at || outcome.server_died || handles.iter().all(|h| h.is_finished()) {
            break CpuSnapshot::take(plan.server_pid);
        }
    };
    let before = before.unwrap_or(after);
    outcome.cores = procfs::cores_used(&before, &after, ticks);
    if let Some(m0) = metrics_before
        && let Some(m1) = crate::metrics::scrape(&metrics_client, &plan.base_url).await
    {
        outcome.server_side = crate::metrics::mean_between(m0, m1);
    }

    let mut last_done = measure_from;
    for handle in handles {
        let stats = handle.await?;
        outcome.latencies_ns.extend(stats.latencies_ns);
        outcome.uncounted_ok += stats.uncounted_ok;
        for (kind, n) in stats.errors {
            *outcome.errors.entry(kind).or_default() += n;
        }
        outcome.exhausted |= stats.exhausted;
        if let Some(t) = stats.last_done {
            last_done = last_done.max(t);
        }
    }
    if let Some(m) = procfs::memory(plan.server_pid) {
        outcome.hwm_kib = outcome.hwm_kib.max(m.hwm_kib);
    }
    outcome.latencies_ns.sort_unstable();
    // When the load stopped early, the window closes when the last answer came in.
    outcome.window = if outcome.exhausted || outcome.server_died {
        last_done.min(stop_at).saturating_duration_since(measure_from)
    } else {
        plan.duration
    };
    let whole_seconds = outcome.window.as_secs() as usize;
    outcome.per_second = shared.per_second.iter().take(whole_seconds).map(|c| c.load(Ordering::Relaxed)).collect();
    outcome.tokens_used = shared.taken.load(Ordering::Relaxed);
    outcome.first_errors = shared.first_errors.lock().map(|k| k.clone()).unwrap_or_default();
    if let Some(mut child) = perf {
        match tokio::time::timeout(Duration::from_secs(60), child.wait()).await {
            Ok(Ok(status)) if status.success() => outcome.profile = plan.profile.clone(),
            Ok(Ok(status)) => eprintln!(
                "warning: perf record failed ({status}); its output:\n{}",
                crate::server::log_tail(&plan.profile_log, 10)
            ),
            _ => {
                let _ = child.kill().await;
                eprintln!("warning: perf record did not finish; profile abandoned");
            }
        }
    }
    Ok(outcome)
}

/// Whether `perf` can be run at all.
pub async fn perf_available() -> bool {
    tokio::process::Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// `perf record` of the server for `duration`. DWARF call graphs, because Rust release builds
/// keep no frame pointers; a low sampling rate keeps the file to tens of MB.
fn start_perf(pid: u32, duration: Duration, out: &Path, log: &Path) -> Option<tokio::process::Child> {
    let log_file = std::fs::File::create(log).ok()?;
    let spawned = tokio::process::Command::new("perf")
        .args(["record", "-F", "299", "--call-graph", "dwarf,8192", "-p", &pid.to_string(), "-o"])
        .arg(out)
        .args(["--", "sleep", &format!("{:.1}", duration.as_secs_f64())])
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone().ok()?))
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn();
    match spawned {
        Ok(child) => Some(child),
        Err(e) => {
            eprintln!("warning: cannot start perf: {e}");
            None
        }
    }
}
