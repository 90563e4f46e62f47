//! `latchkey migrate`: apply the store's pending migrations.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long, short, env = "LATCHKEY_CONFIG", default_value = "latchkey.toml")]
    config: PathBuf,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let config = crate::config::Config::load(&args.config)?;
    let url = match config.store.url.strip_prefix("sqlite://") {
        Some(p) => format!("sqlite://{}", config.resolve(std::path::Path::new(p)).display()),
        None => config.store.url.clone(),
    };
    crate::ledger::open(&url, true, &config.store.postgres()).await.context("migrating the store")?;
    println!("store is up to date");
    Ok(ExitCode::SUCCESS)
}
