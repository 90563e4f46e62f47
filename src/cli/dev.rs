//! `latchkey dev`: a development broker in one command, like `vault server -dev`.
//!
//! SQLite under a temporary folder, a built-in OIDC issuer that mints GitHub-Actions-style
//! tokens, the `jwt` backend, the example policies, and a printed admin key. Nothing it makes
//! outlives it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::app::SystemClock;
use crate::config::{AdminKeyConfig, Config, IssuerConfig, IssuerKind, Role};
use crate::http::DevIssuer;
use crate::seal::Sealer;
use crate::server::{self, Options};

/// The dev issuer's id: the same as the usual GitHub Actions issuer id, so that the example
/// policies run unchanged against a real configuration.
pub const DEV_ISSUER_ID: &str = "github-actions";

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// Where the broker listens (loopback only).
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: SocketAddr,
    /// The policy directory.
    #[arg(long, default_value = "policies")]
    policies: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Mint a development subject token from a running `latchkey dev`.
    Token {
        /// Claims that replace the GitHub-Actions-style defaults (JSON object; null removes).
        #[arg(long, default_value = "{}")]
        claims: String,
        #[arg(long, env = "LATCHKEY_URL", default_value = "http://127.0.0.1:8443")]
        url: String,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Some(Command::Token { claims, url }) => token(&claims, &url).await,
        None => serve(args.listen, args.policies).await,
    }
}

async fn token(claims: &str, url: &str) -> anyhow::Result<ExitCode> {
    let claims: Map<String, Value> = serde_json::from_str(claims).context("--claims must be a JSON object")?;
    let response = reqwest::Client::new()
        .post(format!("{}/dev/token", url.trim_end_matches('/')))
        .json(&serde_json::json!({ "claims": claims }))
        .send()
        .await
        .with_context(|| format!("is `latchkey dev` running at {url}?"))?;
    if !response.status().is_success() {
        anyhow::bail!("{url}/dev/token answered {}", response.status());
    }
    let body: Value = response.json().await?;
    println!("{}", body["token"].as_str().unwrap_or_default());
    Ok(ExitCode::SUCCESS)
}

async fn serve(mut listen: SocketAddr, policies: PathBuf) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(listen.ip().is_loopback(), "latchkey dev listens on loopback addresses only");
    if listen.port() == 0 {
        // The issuer URL names the port, so pick it before the server starts.
        listen = std::net::TcpListener::bind(listen)?.local_addr()?;
    }
    let dir = tempfile::Builder::new().prefix("latchkey-dev-").tempdir()?;
    let base = format!("http://{listen}");
    let dev_issuer = DevIssuer::new(&format!("{base}/dev/oidc"), &base);
    let (admin_key, admin_hash) = crate::app::new_admin_key();
    let policies = std::fs::canonicalize(&policies).with_context(|| {
        format!("policy directory {} (run from the repository root or pass --policies)", policies.display())
    })?;
    let mut config = dev_config(listen, &base, dev_issuer.url(), dir.path(), &policies, admin_hash)?;
    // The checkpoint key lives beside the store, as a file, like a real deployment's.
    crate::checkpoint::generate_key_file(&dir.path().join("checkpoint.key"))?;
    config.audit.checkpoint_key_file = Some(dir.path().join("checkpoint.key"));
    let mut key = [0u8; 32];
    aws_lc_rs::rand::fill(&mut key).expect("the system random source works");
    let options = Options {
        clock: Arc::new(SystemClock),
        migrate: true,
        dev_issuer: Some(dev_issuer.clone()),
        sealer: Some(Sealer::from_bytes(&key)),
        backends: Vec::new(),
    };
    let app = server::build(config, options).await?;
    let capabilities: Vec<String> = app.policies.get().policies.keys().cloned().collect();
    let running = server::start(app, Some(dev_issuer), true).await?;
    print_banner(&running.url(), &admin_key, dir.path(), &policies, &capabilities);
    super::serve::shutdown_signal().await;
    running.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

fn dev_config(
    listen: SocketAddr,
    base: &str,
    issuer_url: &str,
    dir: &std::path::Path,
    policies: &std::path::Path,
    admin_hash: String,
) -> anyhow::Result<Config> {
    let text = format!(
        "[server]\nlisten = \"{listen}\"\naudience = \"{base}\"\n[store]\nurl = \"sqlite://{}\"\n[policies]\ndir = {}\nreload_interval = \"1s\"\n",
        dir.join("latchkey.db").display(),
        toml::Value::String(policies.display().to_string()),
    );
    let mut config = Config::parse(&text, std::path::Path::new("<dev>"))?;
    config.issuers.push(IssuerConfig {
        id: DEV_ISSUER_ID.into(),
        kind: IssuerKind::Github,
        url: issuer_url.into(),
        algorithms: vec!["ES256".into()],
        max_token_age: Some(std::time::Duration::from_secs(600)),
        single_use: true,
        required_claims: Default::default(),
        jwks_uri: None,
        audience: None,
        repository_claim: None,
        workflow_claim: None,
    });
    config.admin_keys.push(AdminKeyConfig { name: "dev-admin".into(), role: Role::Admin, sha256: admin_hash });
    config.dev_mode = true;
    config.base_dir = dir.to_owned();
    config.validate()?;
    Ok(config)
}

fn print_banner(url: &str, admin_key: &str, dir: &std::path::Path, policies: &std::path::Path, caps: &[String]) {
    // The sample claims below are shaped for the pr-review example policy.
    let first = if caps.iter().any(|c| c == "pr-review") {
        "pr-review"
    } else {
        caps.first().map_or("pr-review", String::as_str)
    };
    println!(
        r#"
latchkey dev is running at {url}
  store:     {store} (deleted on exit)
  policies:  {policies} ({caps})
  issuer:    built-in, id "github-actions", tokens shaped like GitHub Actions'

This is a development server: its keys and ledger live in memory and a temporary folder.

Ready-to-paste commands:

  export LATCHKEY_URL={url}
  export LATCHKEY_ADMIN_KEY={admin_key}

  # a subject token, as a CI job would get it
  TOKEN=$(latchkey dev token --claims '{{"repository":"acme/widgets","event_name":"pull_request","ref":"refs/pull/7/merge"}}')

  # exchange it for the {first} capability
  curl -s $LATCHKEY_URL/v1/token \
    -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt \
    -d subject_token=$TOKEN -d scope={first}

  # a denial: another repository
  EVIL=$(latchkey dev token --claims '{{"repository":"acme/widgets-evil","event_name":"pull_request","ref":"refs/pull/7/merge"}}')
  curl -s $LATCHKEY_URL/v1/token \
    -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
    -d subject_token_type=urn:ietf:params:oauth:token-type:jwt \
    -d subject_token=$EVIL -d scope={first}

  # why it was denied: the exchanges with their reasons, and the audit trail
  latchkey audit exchanges --decision denied
  latchkey audit events --follow

  # sign a checkpoint of the audit chain, and verify the chain
  latchkey audit checkpoint
  latchkey audit verify

  # is a latchkey JWT still active?
  curl -s -H "Authorization: Bearer $LATCHKEY_ADMIN_KEY" $LATCHKEY_URL/v1/introspect -d token=<access_token>

Press Ctrl-C to stop.
"#,
        store = dir.join("latchkey.db").display(),
        policies = policies.display(),
        caps = caps.join(", "),
    );
}
