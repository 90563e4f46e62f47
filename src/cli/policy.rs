//! `latchkey policy check|test|explain`: policies without a server.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{Map, Value};

use crate::config::{Config, IssuerKind};
use crate::oidc::Claims;
use crate::policy::{BackendKind, IssuerInfo, LoadContext, PolicySet};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    /// The configuration that names the issuers and backends (default: ./latchkey.toml if it
    /// exists, else the development defaults: issuer `github-actions`, every backend).
    #[arg(long, short, global = true, env = "LATCHKEY_CONFIG")]
    config: Option<PathBuf>,
    /// The policy directory (default: the config's, else ./policies).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Load every policy; print errors and warnings; exit non-zero on errors.
    Check,
    /// Run the table tests (`*.test.toml`) kept beside the policies.
    Test,
    /// Print the decision trace for a capability and a set of claims.
    Explain {
        #[arg(long)]
        capability: String,
        /// A JSON file holding the claims (`-` for standard input).
        #[arg(long)]
        claims: PathBuf,
        /// The issuer id the claims come from (default: the policy's).
        #[arg(long)]
        issuer: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

struct Loaded {
    config: Option<Config>,
    ctx: LoadContext,
    dir: PathBuf,
}

fn load_context(args: &Args) -> anyhow::Result<Loaded> {
    let config = super::find_config(args.config.as_deref())?;
    let ctx = match &config {
        Some(c) => crate::server::policy_context(c),
        None => LoadContext {
            issuers: [(
                super::dev::DEV_ISSUER_ID.to_owned(),
                IssuerInfo { kind: IssuerKind::Github, required_claims: Vec::new() },
            )]
            .into(),
            backends: vec![BackendKind::Github, BackendKind::Aws, BackendKind::Vault, BackendKind::Jwt],
            github_apps: vec!["default".into()],
            vault_policies: None,
        },
    };
    let dir = match (&args.dir, &config) {
        (Some(d), _) => d.clone(),
        (None, Some(c)) => c.resolve(&c.policies.dir),
        (None, None) => PathBuf::from("policies"),
    };
    Ok(Loaded { config, ctx, dir })
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = load_context(&args)?;
    let set = match PolicySet::load_dir(&loaded.dir, &loaded.ctx) {
        Ok(set) => set,
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("{} error(s) in {}", errors.len(), loaded.dir.display());
            return Ok(ExitCode::FAILURE);
        }
    };
    match args.command {
        Command::Check => {
            let warnings = set.lint();
            for w in &warnings {
                println!("warning: {}: {}", w.capability, w.message);
            }
            println!("{} policies OK, {} warning(s)", set.policies.len(), warnings.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Test => {
            let report = crate::policy::run_table_tests(&loaded.dir, &set, &loaded.ctx).map_err(|errors| {
                anyhow::anyhow!(errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))
            })?;
            print!("{report}");
            Ok(if report.all_passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Explain { capability, claims, issuer, json } => {
            let claims = read_claims(&claims)?;
            let issuer = issuer
                .or_else(|| set.policies.get(&capability).map(|p| p.issuer.clone()))
                .unwrap_or_else(|| super::dev::DEV_ISSUER_ID.to_owned());
            let claims = to_claims(loaded.config.as_ref(), &loaded.ctx, &issuer, claims);
            let decision = set.decide(&capability, &claims, None);
            let body = crate::http::explain_body(&decision);
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                print_trace(&body);
            }
            Ok(if body["decision"] == "allow" { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
    }
}

fn read_claims(path: &Path) -> anyhow::Result<Map<String, Value>> {
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    serde_json::from_str(&text).context("the claims file must hold a JSON object")
}

fn to_claims(config: Option<&Config>, ctx: &LoadContext, issuer: &str, map: Map<String, Value>) -> Claims {
    if let Some(i) = config.and_then(|c| c.issuers.iter().find(|i| i.id == issuer)) {
        return Claims::from_map_with(&i.id, i.kind, i.repository_claim.as_deref(), i.workflow_claim.as_deref(), map);
    }
    let kind = ctx.issuers.get(issuer).map(|i| i.kind).unwrap_or(IssuerKind::Generic);
    Claims::from_map(issuer, kind, map)
}

fn print_trace(body: &Value) {
    println!("capability: {}", body["capability"].as_str().unwrap_or(""));
    println!("decision:   {}", body["decision"].as_str().unwrap_or(""));
    if !body["reason"].is_null() {
        println!("reason:     {}", body["reason"].as_str().unwrap_or(""));
    }
    if let Some(hash) = body["policy_sha256"].as_str() {
        println!("policy:     sha256 {hash}");
    }
    println!("trace:");
    for step in body["trace"].as_array().into_iter().flatten() {
        let mark = if step["passed"] == true { "pass" } else { "FAIL" };
        let mut line = format!("  {mark}  {}", step["rule"].as_str().unwrap_or(""));
        if let Some(c) = step.get("claim").and_then(Value::as_str) {
            line.push_str(&format!("  claim {c} = {}", step.get("value").unwrap_or(&Value::Null)));
        }
        if let Some(e) = step.get("expected") {
            line.push_str(&format!("  expected {e}"));
        }
        if let Some(n) = step.get("note").and_then(Value::as_str) {
            line.push_str(&format!("  ({n})"));
        }
        println!("{line}");
    }
}
