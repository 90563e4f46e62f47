//! `latchkey-bench`: how many token exchanges a `latchkey serve` sustains, and how fast.
//!
//! The benchmark is an outside client: it never links latchkey's library, it runs the binary.
//! It plays the OIDC issuer (discovery + JWKS, ES256, or RS256 as GitHub Actions signs), writes a configuration with the SQLite
//! ledger and one `jwt` capability, runs `latchkey migrate` and `latchkey serve`, pre-mints one
//! subject token per exchange (single use is on, so a token cannot be sent twice), and then
//! drives `POST /v1/token` in a closed loop over `--concurrency` keep-alive connections while it
//! samples the server's memory and CPU from `/proc`.
//!
//! With `--backend aws --moto URL` the capability grants an STS session from moto instead, and
//! a second load, in the same run, calls moto's `AssumeRole` directly with what latchkey sends:
//! the difference is what latchkey adds to the backend. See docs/BENCHMARKS.md.

#[path = "loadgen/http1.rs"]
mod http1;
#[path = "loadgen/issuer.rs"]
mod issuer;
#[path = "loadgen/load.rs"]
mod load;
#[path = "loadgen/metrics.rs"]
mod metrics;
#[path = "loadgen/moto.rs"]
mod moto;
#[path = "loadgen/procfs.rs"]
mod procfs;
#[path = "loadgen/report.rs"]
mod report;
#[path = "loadgen/server.rs"]
mod server;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Parser;
use serde_json::Value;

use crate::issuer::{Alg, Issuer, TOKEN_LIFETIME_SECS};
use crate::load::Call;
use crate::report::{RunInfo, Targets};
use crate::server::{Grant, Server};

/// What the benchmark's capability grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    /// A latchkey JWT: latchkey alone.
    Jwt,
    /// An STS session from moto (`--moto`), compared with moto's `AssumeRole` called directly.
    Aws,
}

/// Measure `POST /v1/token` on a local `latchkey serve` (jwt backend, SQLite or PostgreSQL ledger).
#[derive(Debug, Parser)]
#[command(name = "latchkey-bench", version)]
struct Args {
    /// The latchkey binary to measure [default: `latchkey` beside this program, i.e. the build of
    /// the same profile].
    #[arg(long, value_name = "PATH")]
    latchkey: Option<PathBuf>,
    /// The store: the SQLite ledger in the working directory, or a PostgreSQL URL (an empty
    /// database or schema of the benchmark's own: it is migrated and written to).
    #[arg(long, default_value = "sqlite://latchkey.db", value_name = "URL")]
    store: String,
    /// What the capability grants. `aws` also runs the same load on moto's `AssumeRole` directly,
    /// after the exchanges, and reports what latchkey adds.
    #[arg(long, value_enum, default_value_t = Backend::Jwt)]
    backend: Backend,
    /// moto's URL (STS and IAM) for `--backend aws`. The AWS credentials of the environment sign
    /// every call, latchkey's and the direct ones alike.
    #[arg(long, value_name = "URL")]
    moto: Option<String>,
    /// Concurrent connections, each a closed loop (one request in flight).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
    /// Measured time, after the warm-up (`20s`, `1m`, `500ms`).
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    duration: Duration,
    /// Load before the measurement starts, not counted.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// The subject tokens' signature: ES256, or RS256 as GitHub Actions and GitLab sign (RSA
    /// signing makes pre-minting about ten times slower; the broker's cost is about the same).
    #[arg(long, value_enum, default_value_t = Alg::Es256)]
    alg: Alg,
    /// Tokens to pre-mint, one per exchange [default: per second of warm-up + duration, 8,000
    /// (jwt) or 1,000 (aws)].
    #[arg(long, value_name = "N")]
    tokens: Option<usize>,
    /// Print a JSON summary on stdout instead of the table (progress still goes to stderr).
    #[arg(long)]
    json: bool,
    /// Exit with status 1 when a target is missed (default: report FAIL, exit 0).
    #[arg(long)]
    strict: bool,
    /// Record a `perf` profile of the server over the measured window into FILE.
    #[arg(long, value_name = "FILE", num_args = 0..=1, default_missing_value = "perf.data")]
    profile: Option<PathBuf>,
    /// Keep the working directory (config, ledger, server log) and print where it is.
    #[arg(long)]
    keep: bool,
    /// Runtime threads of the load generator. One keeps most of a small machine for the server;
    /// raise it when the report says the load generator was the bottleneck.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
    client_threads: u16,
    /// Throughput target, exchanges per second.
    #[arg(long, default_value_t = 3000.0)]
    target_rate: f64,
    /// p99 latency target, milliseconds.
    #[arg(long, default_value_t = 20.0)]
    target_p99_ms: f64,
    /// Server resident memory target, MB (MiB).
    #[arg(long, default_value_t = 150.0)]
    target_rss_mb: f64,
}

/// `20s`, `1.5s`, `500ms`, `2m`, or a bare number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60.0)
    } else {
        (text, 1.0)
    };
    let value: f64 = number.trim().parse().map_err(|_| format!("{text:?} is not a duration (try 20s, 500ms, 1m)"))?;
    if !value.is_finite() || value < 0.0 {
        return Err(format!("{text:?} is not a duration"));
    }
    Ok(Duration::from_secs_f64(value * scale))
}

/// The run ends with the report's verdict, or an error before there was one.
enum Verdict {
    Pass,
    Fail,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.client_threads))
        .thread_name("bench")
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // On ctrl-c the run future is dropped: that kills `latchkey serve` (kill_on_drop) and
    // removes the working directory.
    let result = runtime.block_on(async {
        tokio::select! {
            r = run(&args) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(2));
    match result {
        Ok(Verdict::Pass) => ExitCode::SUCCESS,
        Ok(Verdict::Fail) if args.strict => ExitCode::from(1),
        Ok(Verdict::Fail) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<Verdict> {
    let total = args.warmup + args.duration;
    if args.duration.is_zero() {
        bail!("--duration must be more than zero");
    }
    // Tokens are minted before the load and live TOKEN_LIFETIME_SECS; keep a margin for minting
    // and start-up.
    if total > Duration::from_secs((TOKEN_LIFETIME_SECS - 60) as u64) {
        bail!(
            "--warmup + --duration must stay under {} minutes: the pre-minted tokens expire",
            TOKEN_LIFETIME_SECS / 60 - 1
        );
    }
    let concurrency = usize::from(args.concurrency);
    // An exchange that waits for STS is far slower than one that signs a JWT.
    let per_second = match args.backend {
        Backend::Jwt => 8000.0,
        Backend::Aws => 1000.0,
    };
    let token_count = args.tokens.unwrap_or_else(|| (total.as_secs_f64() * per_second).ceil() as usize);
    if token_count < concurrency + 2 {
        bail!("--tokens must be at least --concurrency + 2");
    }
    let latchkey = latchkey_binary(args.latchkey.as_deref())?;
    let profile = match &args.profile {
        Some(path) if load::perf_available().await => Some(std::path::absolute(path)?),
        Some(_) => {
            eprintln!("warning: --profile needs `perf` (Debian: apt-get install linux-perf); running without it");
            None
        }
        None => None,
    };

    let dir = tempfile::Builder::new().prefix("latchkey-bench-").tempdir().context("creating a working directory")?;
    let (dir, _cleanup) = if args.keep { (dir.keep(), None) } else { (dir.path().to_owned(), Some(dir)) };
    if args.keep {
        eprintln!("working directory (kept): {}", dir.display());
    }

    let issuer = Issuer::start(args.alg).await?;
    // With `--backend aws`: moto's URL, and a role there for both loads to assume.
    let aws = match (args.backend, &args.moto) {
        (Backend::Aws, Some(url)) => Some((url.as_str(), moto::create_role(url).await?)),
        (Backend::Aws, None) => bail!("--backend aws needs --moto URL"),
        (Backend::Jwt, Some(_)) => bail!("--moto goes with --backend aws"),
        (Backend::Jwt, None) => None,
    };
    let grant = match &aws {
        Some((endpoint, role_arn)) => Grant::Aws { endpoint, role_arn },
        None => Grant::Jwt,
    };
    let files = server::write_files(&dir, &issuer.url, &args.store, &grant)?;
    eprintln!("issuer {}; latchkey will listen on {}", issuer.url, files.listen);
    server::migrate(&latchkey, &files).await?;
    let mut server = Server::start(&latchkey, &files).await?;
    server.wait_healthy(Duration::from_secs(30)).await?;
    eprintln!("latchkey serve is up (pid {})", server.pid);

    eprintln!("minting {token_count} subject tokens on every core...");
    let minting = Instant::now();
    let now = chrono::Utc::now().timestamp();
    let minter = issuer.minter.clone();
    let mut bodies = tokio::task::spawn_blocking(move || minter.mint(token_count, now)).await??;
    let mint_s = minting.elapsed().as_secs_f64();
    if let (Some(first), Some(last)) = (bodies.first(), bodies.last()) {
        issuer.minter.check(first)?;
        issuer.minter.check(last)?;
    }

    let token_url = format!("{}/v1/token", server.url);
    preflight(&token_url, &mut bodies, grant.backend()).await?;
    if let Some(status) = server.exited() {
        bail!(
            "latchkey serve exited after the first exchange ({status}); its log:\n{}",
            server::log_tail(&server.log, 30)
        );
    }
    eprintln!(
        "load: {concurrency} connections, {:.1} s warm-up + {:.1} s measured",
        args.warmup.as_secs_f64(),
        args.duration.as_secs_f64()
    );

    let mut plan = load::Plan {
        call: Call::Exchange(token_url.into()),
        base_url: server.url.clone(),
        concurrency,
        warmup: args.warmup,
        duration: args.duration,
        server_pid: server.pid,
        profile,
        profile_log: dir.join("perf.log"),
        progress: true,
    };
    let outcome = load::run(&plan, bodies).await?;
    // The same load on the backend alone, right after, on the same moto. latchkey stays up, idle,
    // so that the server checks of the run still hold.
    let direct = match &aws {
        Some((url, role_arn)) => {
            eprintln!(
                "load: the same on moto's AssumeRole directly, {concurrency} connections, {:.1} s warm-up + {:.1} s measured",
                args.warmup.as_secs_f64(),
                args.duration.as_secs_f64()
            );
            plan.call = Call::AssumeRole(std::sync::Arc::new(moto::AssumeRole::new(url, role_arn).await));
            plan.profile = None;
            Some(load::run(&plan, Vec::new()).await?)
        }
        None => None,
    };

    let info = RunInfo {
        latchkey: latchkey.display().to_string(),
        store: args.store.split_once("://").map_or("?", |(scheme, _)| scheme).replace("postgresql", "postgres"),
        concurrency,
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        tokens_minted: token_count,
        token_alg: args.alg.name(),
        mint_s,
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        client_threads: usize::from(args.client_threads),
        debug_build: latchkey.components().any(|c| c.as_os_str() == "debug"),
        server_log_lines: server::log_lines(&server.log),
        server_log: server.log.display().to_string(),
        server_exited: server.exited().map(|s| s.to_string()),
    };
    let targets = match args.backend {
        Backend::Jwt => {
            Targets { min_rate: args.target_rate, max_p99_ms: args.target_p99_ms, max_rss_mb: args.target_rss_mb }
        }
        // The targets are latchkey's own; behind moto only failures and the server's memory count.
        Backend::Aws => Targets { min_rate: 0.0, max_p99_ms: f64::INFINITY, max_rss_mb: args.target_rss_mb },
    };
    let summary = report::summarize(&outcome, &info, &targets);
    let direct = direct.map(|o| {
        let info = RunInfo { tokens_minted: 0, debug_build: false, ..info.clone() };
        let s = report::summarize(&o, &info, &targets);
        (s, o)
    });
    if info.server_log_lines > 0 {
        eprintln!("server log ({} lines), last lines:\n{}", info.server_log_lines, server::log_tail(&server.log, 10));
    }
    server.stop().await;
    drop(issuer);

    let pass = summary.pass() && direct.as_ref().is_none_or(|(s, _)| s.pass());
    match (&direct, args.json) {
        (None, false) => report::print_human(&summary, &outcome, &info),
        (None, true) => {
            println!("{}", serde_json::to_string_pretty(&report::to_json(&summary, &outcome, &info, &targets))?)
        }
        (Some((ds, d)), false) => report::print_comparison((&summary, &outcome), (ds, d), &info),
        (Some((ds, d)), true) => {
            let json = report::comparison_json((&summary, &outcome), (ds, d), &info, &targets);
            println!("{}", serde_json::to_string_pretty(&json)?)
        }
    }
    if args.keep {
        eprintln!("working directory kept: {}", dir.display());
    }
    Ok(if pass { Verdict::Pass } else { Verdict::Fail })
}

/// `--latchkey`, else `latchkey` beside this executable (`target/release/` for a release build).
fn latchkey_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(p) => p.to_owned(),
        None => std::env::current_exe()?.with_file_name("latchkey"),
    };
    if !path.is_file() {
        bail!("{} does not exist: build it (cargo build --release --bin latchkey) or pass --latchkey", path.display());
    }
    Ok(std::path::absolute(&path)?)
}

/// One exchange before the load, to fail fast with the server's answer instead of a run of
/// errors, and one replay of the same token, which single use must refuse: otherwise the run
/// would not be measuring the durable `jti` spend it claims to.
async fn preflight(url: &str, bodies: &mut Vec<Vec<u8>>, backend: &str) -> anyhow::Result<()> {
    let body = bodies.pop().ok_or_else(|| anyhow!("no tokens"))?;
    let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(30)).build()?;
    let send = |body: Vec<u8>| {
        client.post(url).header(reqwest::header::CONTENT_TYPE, "application/x-www-form-urlencoded").body(body).send()
    };
    let response = send(body.clone()).await.context("the first exchange")?;
    let status = response.status();
    let text = response.text().await?;
    if status != reqwest::StatusCode::OK {
        bail!("the first exchange answered {status}: {text}");
    }
    let answer: Value = serde_json::from_str(&text).context("the first exchange's answer is not JSON")?;
    let credential = &answer["credentials"][0];
    if answer["access_token"].as_str().is_none_or(str::is_empty) || credential["backend"] != backend {
        // Print the shape only: the answer holds a live credential.
        let keys: Vec<&String> = answer.as_object().map(|o| o.keys().collect()).unwrap_or_default();
        bail!("the first exchange answered 200 without an access_token and a {backend} credential (fields: {keys:?})");
    }
    let replay = send(body).await.context("the replayed exchange")?;
    let replay_status = replay.status();
    let replay_text = replay.text().await.unwrap_or_default();
    if replay_status != reqwest::StatusCode::BAD_REQUEST || !replay_text.contains("invalid_grant") {
        eprintln!(
            "warning: a replayed subject token was not refused with 400 invalid_grant ({replay_status}: {replay_text}); \
             single use is not in effect"
        );
    }
    eprintln!(
        "preflight: exchange OK ({} credential, capability {}), replay refused",
        credential["backend"], answer["capability"]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn arguments_parse_with_their_defaults() {
        let args = Args::try_parse_from(["latchkey-bench"]).expect("defaults");
        assert_eq!(args.concurrency, 16);
        assert_eq!(args.duration, Duration::from_secs(20));
        assert_eq!(args.warmup, Duration::from_secs(3));
        assert_eq!(args.profile, None);
        let args = Args::try_parse_from(["latchkey-bench", "--profile", "--json"]).expect("profile");
        assert_eq!(args.profile, Some(PathBuf::from("perf.data")));
        assert!(args.json);
    }
}
