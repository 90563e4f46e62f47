//! `latchkey release`: give an exchange's credentials back before they expire.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use secrecy::SecretString;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The exchange to release (`exchange_id` of the exchange's answer).
    #[arg(env = "LATCHKEY_EXCHANGE_ID")]
    exchange_id: String,
    /// The broker's URL.
    #[arg(long, env = "LATCHKEY_URL")]
    url: String,
    /// Read the release token from this file (`-` for standard input); otherwise from
    /// LATCHKEY_RELEASE_TOKEN. Never on the command line, where `ps` would show it.
    #[arg(long)]
    token_file: Option<PathBuf>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let token = match &args.token_file {
        Some(path) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading standard input")?;
            text
        }
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
        None => std::env::var("LATCHKEY_RELEASE_TOKEN").unwrap_or_default(),
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("no release token: pass --token-file FILE or set LATCHKEY_RELEASE_TOKEN");
    }
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let url = args.url.trim_end_matches('/');
    super::exchange::release(&http, url, &args.exchange_id, &SecretString::from(token)).await?;
    eprintln!("latchkey: released exchange {}", args.exchange_id);
    Ok(ExitCode::SUCCESS)
}
