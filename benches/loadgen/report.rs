//! The figures, the verdict against the targets, and how they are printed (a table for people,
//! `--json` for scripts).

use serde_json::{Value, json};

use crate::load::Outcome;

/// What the run is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    pub min_rate: f64,
    pub max_p99_ms: f64,
    pub max_rss_mb: f64,
}

/// Context the report prints beside the figures.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub latchkey: String,
    /// The store's kind (`sqlite`, `postgres`): the URL's scheme, never the rest of it.
    pub store: String,
    pub concurrency: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub tokens_minted: usize,
    /// `RS256` or `ES256`.
    pub token_alg: &'static str,
    pub mint_s: f64,
    pub cores: usize,
    pub client_threads: usize,
    pub debug_build: bool,
    /// Lines the broker logged at warn or above.
    pub server_log_lines: usize,
    pub server_log: String,
    pub server_exited: Option<String>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

/// Nearest-rank percentile of sorted values: the smallest value with at least `q` of the
/// values at or below it.
pub fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn latency(sorted_ns: &[u64]) -> Latency {
    let ms = |q: f64| percentile(sorted_ns, q) as f64 / 1e6;
    Latency { p50: ms(0.50), p90: ms(0.90), p99: ms(0.99), p999: ms(0.999), max: ms(1.0) }
}

/// One target and how the run did.
#[derive(Debug)]
pub struct Check {
    pub name: String,
    pub value: String,
    pub pass: bool,
}

/// The computed summary of a run.
#[derive(Debug)]
pub struct Summary {
    pub ok: u64,
    pub errors: u64,
    pub rate: f64,
    pub latency: Latency,
    pub rss_max_mb: f64,
    pub hwm_mb: f64,
    pub checks: Vec<Check>,
    pub warnings: Vec<String>,
}

impl Summary {
    pub fn pass(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }
}

pub fn summarize(outcome: &Outcome, info: &RunInfo, targets: &Targets) -> Summary {
    let ok = outcome.latencies_ns.len() as u64;
    let errors: u64 = outcome.errors.values().sum();
    let window = outcome.window.as_secs_f64();
    let rate = if window > 0.0 { ok as f64 / window } else { 0.0 };
    let latency = latency(&outcome.latencies_ns);
    let mb = |kib: u64| kib as f64 / 1024.0;
    let rss_max_mb = mb(outcome.rss_max_kib);
    let hwm_mb = mb(outcome.hwm_kib);
    // The peak counts: VmHWM also sees a spike between two samples.
    let rss_judged = rss_max_mb.max(hwm_mb);
    let checks = vec![
        Check {
            name: format!("throughput >= {} exchanges/s", targets.min_rate),
            value: format!("{rate:.0}/s"),
            pass: rate >= targets.min_rate,
        },
        Check {
            name: format!("p99 <= {} ms", targets.max_p99_ms),
            value: format!("{:.2} ms", latency.p99),
            pass: ok > 0 && latency.p99 <= targets.max_p99_ms,
        },
        Check {
            name: format!("server RSS < {} MB", targets.max_rss_mb),
            value: format!("{rss_judged:.1} MB"),
            pass: outcome.hwm_kib > 0 && rss_judged < targets.max_rss_mb,
        },
        // "Sustained" means over the whole window: a run cut short by too few tokens is not one.
        Check {
            name: "whole window measured".into(),
            value: format!("{window:.1} of {:.1} s", info.duration_s),
            pass: !outcome.exhausted,
        },
        // Failed requests are usually fast: a run with errors would flatter both figures above.
        Check { name: "no failed requests".into(), value: errors.to_string(), pass: errors == 0 },
        Check {
            name: "server alive at the end".into(),
            value: info.server_exited.clone().unwrap_or_else(|| "yes".into()),
            pass: info.server_exited.is_none(),
        },
    ];
    let mut warnings = Vec::new();
    if outcome.exhausted {
        warnings.push(format!(
            "the {} pre-minted tokens ran out after {:.1} s of the {:.0} s window: rerun with a larger --tokens",
            info.tokens_minted, window, info.duration_s
        ));
    }
    if info.debug_build {
        warnings.push(format!("{} looks like a debug build: figures are not representative", info.latchkey));
    }
    if outcome.cores.loadgen >= 0.9 * info.client_threads as f64 {
        warnings.push(format!(
            "the load generator used {:.2} of its {} thread(s): it may be the bottleneck (try --client-threads)",
            outcome.cores.loadgen, info.client_threads
        ));
    }
    if outcome.cores.others >= 0.25 {
        warnings.push(format!(
            "other processes used {:.2} cores during the window: the machine was not quiet",
            outcome.cores.others
        ));
    }
    if info.server_log_lines > 0 {
        warnings.push(format!(
            "the server logged {} line(s) at warn or above (its last lines are on stderr; --keep keeps {})",
            info.server_log_lines, info.server_log
        ));
    }
    if outcome.profile.is_some() {
        warnings.push("perf was recording during the window: figures are perturbed by profiling".into());
    }
    Summary { ok, errors, rate, latency, rss_max_mb, hwm_mb, checks, warnings }
}

fn per_second_range(per_second: &[u64]) -> Option<(u64, u64)> {
    Some((*per_second.iter().min()?, *per_second.iter().max()?))
}

pub fn print_human(summary: &Summary, outcome: &Outcome, info: &RunInfo) {
    let l = &summary.latency;
    println!();
    println!(
        "latchkey exchange benchmark: {} connections, closed loop, {:.0} s measured after {:.0} s warm-up",
        info.concurrency, info.duration_s, info.warmup_s
    );
    println!("  binary        {}", info.latchkey);
    println!("  store         {}", info.store);
    println!(
        "  tokens        {} pre-minted ({}) in {:.1} s; {} used",
        info.tokens_minted, info.token_alg, info.mint_s, outcome.tokens_used
    );
    println!(
        "  exchanges     {} ok in {:.2} s; {} failed; {} more outside the window",
        summary.ok,
        outcome.window.as_secs_f64(),
        summary.errors,
        outcome.uncounted_ok
    );
    let range = per_second_range(&outcome.per_second)
        .map(|(lo, hi)| format!(" (per second: min {lo}, max {hi})"))
        .unwrap_or_default();
    println!("  throughput    {:.0} exchanges/s{range}", summary.rate);
    println!(
        "  latency ms    p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        l.p50, l.p90, l.p99, l.p999, l.max
    );
    println!("  server RSS    max {:.1} MB sampled, peak (VmHWM) {:.1} MB", summary.rss_max_mb, summary.hwm_mb);
    println!(
        "  CPU (cores)   server {:.2}, load generator {:.2}, other processes {:.2}; machine has {}",
        outcome.cores.server, outcome.cores.loadgen, outcome.cores.others, info.cores
    );
    if let Some((mean_ms, count)) = outcome.server_side {
        println!("  server-side   mean {mean_ms:.2} ms inside the broker over {count} exchanges (its /metrics)");
    }
    if summary.errors > 0 {
        println!("  failures      {}", fmt_errors(outcome));
    }
    for (i, e) in outcome.first_errors.iter().enumerate() {
        println!("  failure #{}    {e}", i + 1);
    }
    if let Some(p) = &outcome.profile {
        println!("  profile       {} (perf report -i {} --no-children)", p.display(), p.display());
    }
    println!("targets");
    for c in &summary.checks {
        println!("  {:<34} {:>12}   {}", c.name, c.value, if c.pass { "PASS" } else { "FAIL" });
    }
    for w in &summary.warnings {
        println!("warning: {w}");
    }
    println!("result: {}", if summary.pass() { "PASS" } else { "FAIL" });
}

fn fmt_errors(outcome: &Outcome) -> String {
    outcome.errors.iter().map(|(k, n)| format!("{k} x{n}")).collect::<Vec<_>>().join(", ")
}

pub fn to_json(summary: &Summary, outcome: &Outcome, info: &RunInfo, targets: &Targets) -> Value {
    let l = &summary.latency;
    json!({
        "result": if summary.pass() { "PASS" } else { "FAIL" },
        "binary": info.latchkey,
        "store": info.store,
        "concurrency": info.concurrency,
        "warmup_s": info.warmup_s,
        "duration_s": info.duration_s,
        "window_s": outcome.window.as_secs_f64(),
        "tokens": {"minted": info.tokens_minted, "alg": info.token_alg, "used": outcome.tokens_used, "mint_s": info.mint_s, "ran_out": outcome.exhausted},
        "exchanges": {"ok": summary.ok, "failed": summary.errors, "outside_window": outcome.uncounted_ok, "failures": outcome.errors, "first_failures": outcome.first_errors},
        "throughput_per_s": summary.rate,
        "per_second": outcome.per_second,
        "latency_ms": {"p50": l.p50, "p90": l.p90, "p99": l.p99, "p99_9": l.p999, "max": l.max},
        "server": {"exchange_mean_ms": outcome.server_side.map(|s| s.0), "exchanges_seen": outcome.server_side.map(|s| s.1), "rss_max_mb": summary.rss_max_mb, "rss_peak_mb": summary.hwm_mb, "cpu_cores": outcome.cores.server, "exited": info.server_exited, "log_lines": info.server_log_lines},
        "loadgen": {"cpu_cores": outcome.cores.loadgen, "threads": info.client_threads},
        "machine": {"cores": info.cores, "other_cpu_cores": outcome.cores.others},
        "targets": {"min_throughput_per_s": targets.min_rate, "max_p99_ms": targets.max_p99_ms, "max_rss_mb": targets.max_rss_mb},
        "checks": summary.checks.iter().map(|c| json!({"name": c.name, "value": c.value, "pass": c.pass})).collect::<Vec<_>>(),
        "warnings": summary.warnings,
        "profile": outcome.profile,
    })
}

/// What latchkey adds to the backend (`--backend aws`): the exchange through latchkey against
/// the backend's own call, at the same concurrency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Overhead {
    /// Exchange median / direct median.
    pub p50_ratio: f64,
    pub p50_added_ms: f64,
    pub p99_added_ms: f64,
    /// Exchanges per second / direct calls per second.
    pub throughput_ratio: f64,
}

pub fn overhead(latchkey: &Summary, direct: &Summary) -> Overhead {
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    Overhead {
        p50_ratio: ratio(latchkey.latency.p50, direct.latency.p50),
        p50_added_ms: latchkey.latency.p50 - direct.latency.p50,
        p99_added_ms: latchkey.latency.p99 - direct.latency.p99,
        throughput_ratio: ratio(latchkey.rate, direct.rate),
    }
}

/// `--backend aws`: both loads side by side, and the difference.
pub fn print_comparison(latchkey: (&Summary, &Outcome), direct: (&Summary, &Outcome), info: &RunInfo) {
    println!();
    println!(
        "latchkey's aws backend against moto's AssumeRole alone: {} connections each, closed loop, {:.0} s measured after {:.0} s warm-up",
        info.concurrency, info.duration_s, info.warmup_s
    );
    println!("  binary        {}", info.latchkey);
    println!("  store         {}", info.store);
    println!();
    println!(
        "  {:<22} {:>8} {:>8} {:>8} {:>8} {:>9} {:>7} {:>9} {:>9} {:>9}",
        "", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "failed", "latchkey", "loadgen", "others"
    );
    for (name, (s, o)) in [("exchange via latchkey", latchkey), ("AssumeRole direct", direct)] {
        let l = &s.latency;
        println!(
            "  {name:<22} {:>8.1} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>7} {:>9.2} {:>9.2} {:>9.2}",
            s.rate, l.p50, l.p90, l.p99, l.p999, s.errors, o.cores.server, o.cores.loadgen, o.cores.others
        );
    }
    println!("  (CPU in cores over each window; \"others\" is mostly moto, which is single-threaded Python)");
    let o = overhead(latchkey.0, direct.0);
    println!();
    println!(
        "  latchkey adds {:+.2} ms at p50 ({:.2}x the direct median) and {:+.2} ms at p99; throughput {:.2}x the direct calls'",
        o.p50_added_ms, o.p50_ratio, o.p99_added_ms, o.throughput_ratio
    );
    if let Some((mean_ms, count)) = latchkey.1.server_side {
        println!("  server-side   mean {mean_ms:.2} ms inside the broker over {count} exchanges (its /metrics)");
    }
    let mut pass = true;
    for (name, (s, o)) in [("exchange", latchkey), ("direct", direct)] {
        for c in s.checks.iter().filter(|c| !c.pass) {
            println!("  {name}: {:<34} {:>12}   FAIL", c.name, c.value);
            pass = false;
        }
        if s.errors > 0 {
            println!("  {name} failures: {}", fmt_errors(o));
        }
        for (i, e) in o.first_errors.iter().enumerate() {
            println!("  {name} failure #{}    {e}", i + 1);
        }
        for w in &s.warnings {
            println!("warning: {name}: {w}");
        }
    }
    println!("result: {}", if pass { "PASS" } else { "FAIL" });
}

pub fn comparison_json(
    latchkey: (&Summary, &Outcome),
    direct: (&Summary, &Outcome),
    info: &RunInfo,
    targets: &Targets,
) -> Value {
    let o = overhead(latchkey.0, direct.0);
    let pass = latchkey.0.pass() && direct.0.pass();
    let direct_info = RunInfo { tokens_minted: 0, ..info.clone() };
    json!({
        "result": if pass { "PASS" } else { "FAIL" },
        "backend": "aws",
        "overhead": {"p50_ratio": o.p50_ratio, "p50_added_ms": o.p50_added_ms, "p99_added_ms": o.p99_added_ms, "throughput_ratio": o.throughput_ratio},
        "latchkey": to_json(latchkey.0, latchkey.1, info, targets),
        "direct": to_json(direct.0, direct.1, &direct_info, targets),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::procfs::CoresUsed;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&v, 1.0), 1000);
        assert_eq!(percentile(&[7], 0.99), 7);
        assert_eq!(percentile(&[], 0.99), 0);
        // With 10 values, p99 is the largest: one slow answer in ten is not hidden.
        let ten: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&ten, 0.99), 10);
    }

    fn info() -> RunInfo {
        RunInfo {
            store: "sqlite".into(),
            latchkey: "target/release/latchkey".into(),
            concurrency: 16,
            warmup_s: 3.0,
            duration_s: 20.0,
            tokens_minted: 100_000,
            token_alg: "ES256",
            mint_s: 1.0,
            cores: 2,
            client_threads: 1,
            debug_build: false,
            server_log_lines: 0,
            server_log: "latchkey.log".into(),
            server_exited: None,
        }
    }

    fn outcome(ok: u64, latency_ms: u64, rss_mib: u64) -> Outcome {
        Outcome {
            latencies_ns: vec![latency_ms * 1_000_000; ok as usize],
            window: Duration::from_secs(20),
            rss_max_kib: rss_mib * 1024,
            hwm_kib: rss_mib * 1024,
            cores: CoresUsed { server: 1.3, loadgen: 0.5, others: 0.0 },
            ..Outcome::default()
        }
    }

    const TARGETS: Targets = Targets { min_rate: 3000.0, max_p99_ms: 20.0, max_rss_mb: 150.0 };

    #[test]
    fn a_run_within_targets_passes() {
        let s = summarize(&outcome(70_000, 5, 60), &info(), &TARGETS);
        assert_eq!(s.rate, 3500.0);
        assert!(s.pass(), "{:?}", s.checks);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    }

    #[test]
    fn each_target_can_fail_the_run() {
        let slow = summarize(&outcome(70_000, 25, 60), &info(), &TARGETS);
        assert!(!slow.pass());
        let few = summarize(&outcome(50_000, 5, 60), &info(), &TARGETS);
        assert!(!few.pass());
        let fat = summarize(&outcome(70_000, 5, 150), &info(), &TARGETS);
        assert!(!fat.pass());
        let mut failing = outcome(70_000, 5, 60);
        failing.errors.insert("400".into(), 1);
        assert!(!summarize(&failing, &info(), &TARGETS).pass());
        let crashed = RunInfo { server_exited: Some("signal 6".into()), ..info() };
        assert!(!summarize(&outcome(70_000, 5, 60), &crashed, &TARGETS).pass());
    }

    #[test]
    fn running_out_of_tokens_is_reported_and_rated_over_the_real_window() {
        let mut o = outcome(30_000, 5, 60);
        o.exhausted = true;
        o.window = Duration::from_secs(10);
        let s = summarize(&o, &info(), &TARGETS);
        assert_eq!(s.rate, 3000.0);
        assert!(s.warnings.iter().any(|w| w.contains("--tokens")));
        assert!(!s.pass(), "a cut-short run does not show a sustained rate");
    }

    #[test]
    fn overhead_is_the_difference_and_the_ratio_of_medians() {
        let through = summarize(&outcome(1_000, 12, 60), &info(), &TARGETS);
        let direct = summarize(&outcome(2_000, 8, 60), &info(), &TARGETS);
        let o = overhead(&through, &direct);
        assert_eq!(o, Overhead { p50_ratio: 1.5, p50_added_ms: 4.0, p99_added_ms: 4.0, throughput_ratio: 0.5 });
        let j =
            comparison_json((&through, &outcome(1_000, 12, 60)), (&direct, &outcome(2_000, 8, 60)), &info(), &TARGETS);
        assert_eq!(j["overhead"]["p50_ratio"], 1.5);
        assert_eq!(j["latchkey"]["latency_ms"]["p50"], 12.0);
        assert_eq!(j["direct"]["latency_ms"]["p50"], 8.0);
    }

    #[test]
    fn json_summary_has_the_figures() {
        let o = outcome(70_000, 5, 60);
        let s = summarize(&o, &info(), &TARGETS);
        let j = to_json(&s, &o, &info(), &TARGETS);
        assert_eq!(j["result"], "PASS");
        assert_eq!(j["exchanges"]["ok"], 70_000);
        assert_eq!(j["latency_ms"]["p99"], 5.0);
        assert_eq!(j["server"]["rss_peak_mb"], 60.0);
    }
}
