//! `latchkey backup`: an online copy of a SQLite store, taken while the broker runs.
//!
//! A PostgreSQL store is backed up with PostgreSQL's own tools (`pg_dump`, base backups and WAL
//! archiving); see `docs/OPERATIONS.md`, "Backups".

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The configuration whose store to copy.
    #[arg(long, short, env = "LATCHKEY_CONFIG", conflicts_with = "store")]
    config: Option<PathBuf>,
    /// The store to copy instead (`sqlite://PATH`).
    #[arg(long)]
    store: Option<String>,
    /// The new file to write; never overwritten.
    #[arg(long)]
    to: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = match (&args.store, &args.config) {
        (Some(url), _) => url.clone(),
        (None, Some(path)) => crate::server::resolve_store_url(&crate::config::Config::load(path)?),
        (None, None) => match super::find_config(None)? {
            Some(config) => crate::server::resolve_store_url(&config),
            None => bail!("give --config FILE or --store sqlite://PATH"),
        },
    };
    let Some(path) = url.strip_prefix("sqlite://") else {
        bail!(
            "latchkey backup copies SQLite stores; back up a PostgreSQL store with pg_dump \
             (see docs/OPERATIONS.md, \"Backups\")"
        );
    };
    let (from, to) = (PathBuf::from(path), args.to.clone());
    let report = tokio::task::spawn_blocking(move || crate::ledger::sqlite::backup(&from, &to))
        .await
        .context("the backup task failed")?
        .with_context(|| format!("backing up {path}"))?;
    println!(
        "backed up {path} to {} (audit chain: {} events, head {})",
        args.to.display(),
        report.events,
        report.head_hash
    );
    println!("check it with: latchkey audit verify --store sqlite://{}", args.to.display());
    Ok(ExitCode::SUCCESS)
}
