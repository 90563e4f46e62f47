//! `latchkey serve`: run the broker from a configuration file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::app::SystemClock;
use crate::config::Config;
use crate::seal::Sealer;
use crate::server::{self, Options};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short, env = "LATCHKEY_CONFIG", default_value = "latchkey.toml")]
    config: PathBuf,
    /// Validate the configuration, sealing key and policies, then exit.
    #[arg(long)]
    check: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args.config)?;
    if args.check {
        return check(&config);
    }
    let options =
        Options { clock: Arc::new(SystemClock), migrate: false, dev_issuer: None, sealer: None, backends: Vec::new() };
    let app = server::build(config, options).await?;
    let running = server::start(app, None, true).await?;
    tracing::info!(url = %running.url(), admin = ?running.admin_addr, "latchkey is serving");
    let handle = running.handle();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        handle.graceful_shutdown(Some(std::time::Duration::from_secs(10)));
    });
    running.wait().await?;
    Ok(ExitCode::SUCCESS)
}

fn check(config: &Config) -> anyhow::Result<ExitCode> {
    Sealer::load(
        &config.resolve(&config.sealing.key_file),
        &config.sealing.previous_key_files.iter().map(|p| config.resolve(p)).collect::<Vec<_>>(),
    )
    .context("sealing key")?;
    for file in [&config.server.tls_cert_file, &config.server.tls_key_file].into_iter().flatten() {
        let path = config.resolve(file);
        std::fs::metadata(&path).with_context(|| format!("TLS file {}", path.display()))?;
    }
    let dir = config.resolve(&config.policies.dir);
    match crate::policy::PolicySet::load_dir(&dir, &server::policy_context(config)) {
        Ok(set) => {
            println!("configuration OK: {} issuer(s), {} policy file(s)", config.issuers.len(), set.policies.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => return std::future::pending().await,
        };
        tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
