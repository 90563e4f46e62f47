//! `latchkey kill`: create a kill rule (or dry-run one) and optionally wait for its revocations.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Map, Value, json};

use super::client::{AdminClient, ServerArgs, print_json, print_report, selector_text};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Agent name (glob), as the policies name it.
    #[arg(long)]
    agent: Option<String>,
    /// Capability name (glob).
    #[arg(long)]
    capability: Option<String>,
    /// Repository, e.g. `acme/widgets` (glob).
    #[arg(long)]
    repository: Option<String>,
    /// Workflow: GitHub `job_workflow_ref`, GitLab `ci_config_ref_uri` (glob).
    #[arg(long)]
    workflow: Option<String>,
    /// Token subject (glob).
    #[arg(long)]
    subject: Option<String>,
    /// Issuer id from the configuration (exact).
    #[arg(long)]
    issuer: Option<String>,
    /// A claim that must match, as NAME=GLOB; repeatable.
    #[arg(long = "claim", value_name = "NAME=GLOB", value_parser = parse_claim)]
    claims: Vec<(String, String)>,
    /// One credential id: the exchange that holds it.
    #[arg(long)]
    credential: Option<uuid::Uuid>,
    /// Every identity: stops all issuance and revokes everything.
    #[arg(long)]
    all: bool,
    /// Why: recorded in the rule and the audit trail.
    #[arg(long)]
    reason: String,
    /// Report what the rule would match and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Let the rule lapse by itself after this long (e.g. `2h`).
    #[arg(long, value_name = "DURATION")]
    expires_in: Option<String>,
    /// Wait until no revocation is pending; exit non-zero if any failed or the wait times out.
    #[arg(long)]
    wait: bool,
    /// How long `--wait` waits.
    #[arg(long, value_name = "DURATION", default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    server: ServerArgs,
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((name, glob)) if !name.trim().is_empty() => Ok((name.trim().to_owned(), glob.to_owned())),
        _ => Err(format!("{s:?} is not NAME=GLOB (for example --claim actor=octocat)")),
    }
}

impl Args {
    fn selector(&self) -> Value {
        let mut s = Map::new();
        let globs = [
            ("agent", &self.agent),
            ("capability", &self.capability),
            ("repository", &self.repository),
            ("workflow", &self.workflow),
            ("subject", &self.subject),
            ("issuer", &self.issuer),
        ];
        for (field, value) in globs {
            if let Some(v) = value {
                s.insert(field.into(), json!(v));
            }
        }
        if !self.claims.is_empty() {
            s.insert("claims".into(), self.claims.iter().map(|(k, v)| (k.clone(), json!(v))).collect());
        }
        if let Some(c) = self.credential {
            s.insert("credential".into(), json!(c));
        }
        if self.all {
            s.insert("all".into(), json!(true));
        }
        Value::Object(s)
    }
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let selector = args.selector();
    if selector.as_object().is_some_and(Map::is_empty) {
        bail!(
            "name what to kill: --agent, --capability, --repository, --workflow, --subject, --issuer, \
             --claim, --credential or --all"
        );
    }
    if args.wait && args.dry_run {
        bail!("--wait has nothing to wait for with --dry-run");
    }
    let client = AdminClient::new(&args.server)?;
    let mut body = json!({ "selector": selector, "reason": args.reason, "dry_run": args.dry_run });
    if let Some(e) = &args.expires_in {
        body["expires_in"] = json!(e);
    }
    let (_, mut rule) = client.post("/v1/kills", &body).await?;
    if args.dry_run {
        if args.server.json {
            print_json(&rule)?;
        } else {
            print_dry_run(&rule);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let id = rule["id"].as_str().unwrap_or_default().to_owned();
    if !args.server.json {
        println!("kill rule {id} is in force: new exchanges of {} are refused", selector_text(&rule["selector"]));
    }
    let mut timed_out = false;
    if args.wait {
        let deadline = Instant::now() + args.timeout;
        while rule["report"]["totals"]["pending"].as_u64().unwrap_or(0) > 0 {
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            rule = client.get(&format!("/v1/kills/{id}")).await?.1;
        }
    }
    if args.server.json {
        print_json(&rule)?;
    } else {
        print_report(&rule["report"]);
    }
    let failed = rule["report"]["totals"]["failed"].as_u64().unwrap_or(0);
    let pending = rule["report"]["totals"]["pending"].as_u64().unwrap_or(0);
    if failed > 0 {
        eprintln!("error: {failed} revocation(s) failed; see `latchkey kills show {id}` and the audit trail");
        return Ok(ExitCode::FAILURE);
    }
    if timed_out {
        eprintln!("error: {pending} revocation(s) still pending after {}", humantime::format_duration(args.timeout));
        return Ok(ExitCode::FAILURE);
    }
    if !args.wait && pending > 0 && !args.server.json {
        println!("revocations run in the background: `latchkey kills show {id}` shows their progress");
    }
    Ok(ExitCode::SUCCESS)
}

fn print_dry_run(answer: &Value) {
    let totals = &answer["would_match"]["totals"];
    println!(
        "dry run: {} matches {} live credential(s) ({} active, {} pending); nothing was changed",
        selector_text(&answer["selector"]),
        totals["matched"],
        totals["active"],
        totals["pending"],
    );
    let mut rows = vec![vec!["BACKEND".to_owned(), "MATCHED".into(), "ACTIVE".into(), "PENDING".into()]];
    for (backend, c) in answer["would_match"]["backends"].as_object().into_iter().flatten() {
        rows.push(vec![backend.clone(), c["matched"].to_string(), c["active"].to_string(), c["pending"].to_string()]);
    }
    super::client::print_table(&rows);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_name_equals_glob() {
        assert_eq!(parse_claim("actor=octo*").unwrap(), ("actor".into(), "octo*".into()));
        assert_eq!(parse_claim("ref=refs/heads/a=b").unwrap(), ("ref".into(), "refs/heads/a=b".into()));
        assert!(parse_claim("actor").unwrap_err().contains("NAME=GLOB"));
        assert!(parse_claim("=x").is_err());
    }
}
