//! `latchkey audit credentials|exchanges|events|checkpoint|verify|public-key|explain`: what an
//! auditor asks, as tables (or `--json`), through the admin API; `verify --store` and
//! `public-key` work offline, on the store file and the key file.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use super::client::{AdminClient, ServerArgs, cell, print_json, print_table, query_string};
use crate::checkpoint::{self, CheckpointKey, PublicKey, VerifyReport, VerifyRequest};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    server: ServerArgs,
}

/// Filters shared by the listings. Strings match exactly.
#[derive(Debug, Clone, clap::Args)]
struct Common {
    #[arg(long)]
    agent: Option<String>,
    #[arg(long)]
    capability: Option<String>,
    /// `owner/name` (GitHub) or the project path (GitLab).
    #[arg(long)]
    repository: Option<String>,
    /// The token subject (`sub`).
    #[arg(long)]
    subject: Option<String>,
    /// RFC 3339 time, or a duration meaning that long ago (`7d`, `36h`).
    #[arg(long)]
    since: Option<String>,
    /// RFC 3339 time, or a duration meaning that long ago.
    #[arg(long)]
    until: Option<String>,
    /// At most this many rows (pages are followed up to it).
    #[arg(long, default_value_t = 100)]
    limit: usize,
    /// Resume after a `next_cursor` an earlier listing printed.
    #[arg(long)]
    cursor: Option<String>,
}

impl Common {
    fn pairs(&self) -> Vec<(&'static str, Option<String>)> {
        vec![
            ("agent", self.agent.clone()),
            ("capability", self.capability.clone()),
            ("repository", self.repository.clone()),
            ("subject", self.subject.clone()),
            ("since", self.since.clone()),
            ("until", self.until.clone()),
        ]
    }
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Credentials, newest first: which are live, for whom, from which exchange (role auditor).
    Credentials {
        #[command(flatten)]
        common: Common,
        /// The workflow (GitHub `job_workflow_ref`, GitLab `ci_config_ref_uri`).
        #[arg(long)]
        workflow: Option<String>,
        /// github, aws, vault or jwt.
        #[arg(long)]
        backend: Option<String>,
        /// live (usable now), pending, active, revoked, expired or failed.
        #[arg(long)]
        state: Option<String>,
        /// Only the credentials of this exchange.
        #[arg(long)]
        exchange: Option<uuid::Uuid>,
    },
    /// Exchanges, newest first, with their decision and full reason (role auditor).
    Exchanges {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        workflow: Option<String>,
        /// Exchanges that issued a credential of this backend.
        #[arg(long)]
        backend: Option<String>,
        /// allowed, denied, failed or pending.
        #[arg(long)]
        decision: Option<String>,
        /// The configured issuer id.
        #[arg(long)]
        issuer: Option<String>,
    },
    /// The audit events, oldest first (role auditor).
    Events {
        #[command(flatten)]
        common: Common,
        /// An event name (`kill.created`) or a prefix ending in `*` (`kill.*`).
        #[arg(long)]
        event: Option<String>,
        /// `admin-key:NAME`, `system`, or a token subject.
        #[arg(long)]
        actor: Option<String>,
        /// A credential id.
        #[arg(long)]
        credential: Option<String>,
        /// Keep printing new events as they are appended (Ctrl-C stops).
        #[arg(long)]
        follow: bool,
        /// How often `--follow` asks for new events.
        #[arg(long, default_value = "2s", value_parser = crate::config::parse_duration)]
        interval: Duration,
    },
    /// Sign a checkpoint of the audit chain head now (role admin).
    Checkpoint,
    /// Recompute the audit chain and check its signed checkpoints. Through the server (role
    /// auditor), or offline on a store file with `--store`.
    Verify {
        /// First event to check.
        #[arg(long)]
        from: Option<i64>,
        /// Last event to check.
        #[arg(long)]
        to: Option<i64>,
        /// Verify this store file directly (`sqlite://PATH`), without a server: for forensics on
        /// a copy. Needs the public key (`--public-key`, `--key-file` or `--config`).
        #[arg(long)]
        store: Option<String>,
        /// The checkpoint public key, base64 (`latchkey audit public-key` prints it).
        #[arg(long)]
        public_key: Vec<String>,
        /// The checkpoint key file, whose public half is used.
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// A configuration: its store and checkpoint key are used for an offline check.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// JSON lines holding checkpoints kept elsewhere (the audit stream, a SIEM export):
        /// offline only. They catch a cut tail even when the store's own checkpoints were
        /// removed with it.
        #[arg(long)]
        checkpoints: Option<PathBuf>,
    },
    /// Print the checkpoint public key and its id, from the key file (offline).
    PublicKey {
        /// The checkpoint key file (default: the config's `[audit] checkpoint_key_file`).
        #[arg(long)]
        key_file: Option<PathBuf>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// The full decision trace for a capability, from claims or a subject token, without
    /// minting or spending anything (role admin).
    Explain {
        #[arg(long)]
        capability: String,
        /// A JSON file of claims (`-` for standard input).
        #[arg(long, conflicts_with = "token_file", required_unless_present = "token_file")]
        claims: Option<PathBuf>,
        /// A file holding a subject token: verified like an exchange would, but its `jti` is not
        /// spent.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// The issuer id the claims come from (default: the policy's).
        #[arg(long)]
        issuer: Option<String>,
    },
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let json = args.server.json;
    match args.command {
        Command::Credentials { common, workflow, backend, state, exchange } => {
            let mut q = common.pairs();
            q.extend([
                ("workflow", workflow),
                ("backend", backend),
                ("state", state),
                ("exchange", exchange.map(|e| e.to_string())),
            ]);
            let client = AdminClient::new(&args.server)?;
            let (items, next) = collect(&client, "/v1/credentials", q, &common).await?;
            print_credentials(&items, next.as_deref(), json)
        }
        Command::Exchanges { common, workflow, backend, decision, issuer } => {
            let mut q = common.pairs();
            q.extend([("workflow", workflow), ("backend", backend), ("decision", decision), ("issuer", issuer)]);
            let client = AdminClient::new(&args.server)?;
            let (items, next) = collect(&client, "/v1/exchanges", q, &common).await?;
            print_exchanges(&items, next.as_deref(), json)
        }
        Command::Events { common, event, actor, credential, follow, interval } => {
            let mut q = common.pairs();
            q.extend([("event", event), ("actor", actor), ("credential", credential)]);
            let client = AdminClient::new(&args.server)?;
            if follow {
                return follow_events(&client, q, common.cursor.clone(), interval, json).await;
            }
            let (items, next) = collect(&client, "/v1/audit", q, &common).await?;
            print_events(&items, next.as_deref(), json)
        }
        Command::Checkpoint => {
            let client = AdminClient::new(&args.server)?;
            let (_, c) = client.post("/v1/audit/checkpoints", &json!({})).await?;
            if json {
                print_json(&c)?;
            } else {
                println!(
                    "checkpoint signed: event {} has hash {} (key {}, at {})",
                    cell(&c["seq"]),
                    cell(&c["hash"]),
                    cell(&c["key_id"]),
                    cell(&c["signed_at"])
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { from, to, store, public_key, key_file, config, checkpoints } => {
            let local = store.is_some() || config.is_some() || checkpoints.is_some();
            let report = if local {
                verify_local(from, to, store, public_key, key_file, config, checkpoints).await?
            } else {
                let client = AdminClient::new(&args.server)?;
                let q = query_string(&[("from", from.map(|f| f.to_string())), ("to", to.map(|t| t.to_string()))]);
                let (_, body) = client.get(&format!("/v1/audit/verify?{q}")).await?;
                if json {
                    print_json(&body)?;
                    return Ok(if body["ok"] == true { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                }
                return Ok(print_report(&body));
            };
            let body = serde_json::to_value(&report)?;
            if json {
                print_json(&body)?;
                return Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE });
            }
            Ok(print_report(&body))
        }
        Command::PublicKey { key_file, config } => {
            let path = key_path(key_file, config.as_ref())?.context("give --key-file or --config")?;
            let key = CheckpointKey::load(&path)?;
            let p = key.public_key();
            if json {
                print_json(&json!({ "key_id": p.key_id(), "public_key": p.to_base64(), "algorithm": "Ed25519" }))?;
            } else {
                println!("{}", p.to_base64());
                eprintln!("key id {} (Ed25519); keep this public key apart from the store", p.key_id());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Explain { capability, claims, token_file, issuer } => {
            let mut body = json!({ "capability": capability });
            if let Some(path) = claims {
                let text = if path.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?
                };
                body["claims"] = serde_json::from_str(&text).context("the claims file is not a JSON object")?;
            }
            if let Some(path) = token_file {
                let token = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                body["subject_token"] = json!(token.trim());
            }
            if let Some(i) = issuer {
                body["issuer"] = json!(i);
            }
            let client = AdminClient::new(&args.server)?;
            let (_, answer) = client.post("/v1/explain", &body).await?;
            if json {
                print_json(&answer)?;
            } else {
                print_explain(&answer);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn encode_cursor(c: &str) -> String {
    url::form_urlencoded::byte_serialize(c.as_bytes()).collect()
}

/// Follows the cursors until `limit` rows.
async fn collect(
    client: &AdminClient,
    path: &str,
    filters: Vec<(&'static str, Option<String>)>,
    common: &Common,
) -> anyhow::Result<(Vec<Value>, Option<String>)> {
    let base = query_string(&filters);
    let mut items = Vec::new();
    let mut cursor = common.cursor.clone();
    loop {
        let want = (common.limit - items.len()).clamp(1, crate::records::MAX_LIMIT);
        let mut url = format!("{path}?{base}&limit={want}");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={}", encode_cursor(c)));
        }
        let (_, page) = client.get(&url).await?;
        items.extend(page["items"].as_array().cloned().unwrap_or_default());
        cursor = page["next_cursor"].as_str().map(str::to_owned);
        if cursor.is_none() || items.len() >= common.limit {
            return Ok((items, cursor));
        }
    }
}

fn more(next: Option<&str>) {
    if let Some(c) = next {
        eprintln!("more rows: add --cursor '{c}' (or a larger --limit)");
    }
}

fn print_credentials(items: &[Value], next: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&json!({ "items": items, "next_cursor": next }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        println!("no credentials match");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["ID", "STATE", "LIVE", "BACKEND", "AGENT", "CAPABILITY", "REPOSITORY", "CREATED", "EXPIRES", "SUBJECT"]
            .map(String::from)
            .to_vec(),
    ];
    for c in items {
        rows.push(vec![
            cell(&c["id"]),
            cell(&c["state"]),
            if c["live"] == true { "yes".into() } else { "no".into() },
            cell(&c["backend"]),
            cell(&c["agent"]),
            cell(&c["capability"]),
            cell(&c["repository"]),
            cell(&c["created_at"]),
            cell(&c["expires_at"]),
            cell(&c["subject"]),
        ]);
    }
    print_table(&rows);
    more(next);
    Ok(ExitCode::SUCCESS)
}

fn print_exchanges(items: &[Value], next: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&json!({ "items": items, "next_cursor": next }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        println!("no exchanges match");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![
        ["CREATED", "DECISION", "CAPABILITY", "AGENT", "REPOSITORY", "RUN", "REASON", "ID", "REQUEST"]
            .map(String::from)
            .to_vec(),
    ];
    for e in items {
        rows.push(vec![
            cell(&e["created_at"]),
            cell(&e["decision"]),
            cell(&e["capability"]),
            cell(&e["agent"]),
            cell(&e["repository"]),
            cell(&e["run_id"]),
            cell(&e["reason"]),
            cell(&e["id"]),
            cell(&e["request_id"]),
        ]);
    }
    print_table(&rows);
    more(next);
    Ok(ExitCode::SUCCESS)
}

fn event_rows(items: &[Value]) -> Vec<Vec<String>> {
    items
        .iter()
        .map(|i| {
            let e = &i["event"];
            let mut what = Vec::new();
            for f in ["agent", "capability", "repository", "subject", "credential_id", "backend", "reason"] {
                if let Some(v) = e.get(f).filter(|v| !v.is_null()) {
                    what.push(format!("{f}={}", cell(v)));
                }
            }
            vec![
                cell(&i["seq"]),
                cell(&e["time"]),
                cell(&e["event"]),
                cell(&e["actor"]),
                cell(&e["decision"]),
                what.join(" "),
            ]
        })
        .collect()
}

fn header() -> Vec<String> {
    ["SEQ", "TIME", "EVENT", "ACTOR", "DECISION", "DETAILS"].map(String::from).to_vec()
}

fn print_events(items: &[Value], next: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    if json {
        print_json(&json!({ "items": items, "next_cursor": next }))?;
        return Ok(ExitCode::SUCCESS);
    }
    if items.is_empty() {
        println!("no events match");
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![header()];
    rows.extend(event_rows(items));
    print_table(&rows);
    more(next);
    Ok(ExitCode::SUCCESS)
}

/// Prints events as they are appended. Each poll is itself an admin call, and so an audit
/// event: the follower leaves its own polls out (it knows their request ids), and prints
/// everything else, a line per event (`--json`: one JSON object per line, as the stream does).
async fn follow_events(
    client: &AdminClient,
    filters: Vec<(&'static str, Option<String>)>,
    start: Option<String>,
    interval: Duration,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let base = query_string(&filters);
    let mut cursor: i64 = match start {
        Some(c) => c.parse().context("--cursor must be a sequence number")?,
        None => 0,
    };
    let mut ours: VecDeque<String> = VecDeque::new();
    if !json {
        let h = header();
        println!("{}", h.join("  "));
    }
    loop {
        let (page, request_id) = client.get_traced(&format!("/v1/audit?{base}&limit=1000&cursor={cursor}")).await?;
        if let Some(id) = request_id {
            ours.push_back(id);
            if ours.len() > 64 {
                ours.pop_front();
            }
        }
        let items: Vec<Value> = page["items"].as_array().cloned().unwrap_or_default();
        let last = items.last().and_then(|i| i["seq"].as_i64());
        let shown: Vec<Value> = items
            .into_iter()
            .filter(|i| {
                let e = &i["event"];
                !(e["event"] == "admin.call" && e["request_id"].as_str().is_some_and(|r| ours.iter().any(|o| o == r)))
            })
            .collect();
        if json {
            for i in &shown {
                println!("{}", serde_json::to_string(i)?);
            }
        } else {
            for row in event_rows(&shown) {
                println!("{}", row.join("  "));
            }
        }
        let full = page["next_cursor"].is_string();
        cursor = last.unwrap_or(cursor);
        if !full {
            // Everything that matched up to the head was in this page.
            cursor = cursor.max(page["head_seq"].as_i64().unwrap_or(cursor));
            tokio::time::sleep(interval).await;
        }
    }
}

fn key_path(key_file: Option<PathBuf>, config: Option<&PathBuf>) -> anyhow::Result<Option<PathBuf>> {
    if key_file.is_some() {
        return Ok(key_file);
    }
    let Some(path) = config else { return Ok(None) };
    let c = crate::config::Config::load(path)?;
    Ok(c.audit.checkpoint_key_file.as_ref().map(|p| c.resolve(p)))
}

async fn verify_local(
    from: Option<i64>,
    to: Option<i64>,
    store: Option<String>,
    public_keys: Vec<String>,
    key_file: Option<PathBuf>,
    config: Option<PathBuf>,
    extra: Option<PathBuf>,
) -> anyhow::Result<VerifyReport> {
    let loaded = config.as_ref().map(|p| crate::config::Config::load(p)).transpose()?;
    let store = match (store, &loaded) {
        (Some(s), _) => s,
        (None, Some(c)) => crate::server::resolve_store_url(c),
        (None, None) => bail!("give --store sqlite://PATH (or --config) to verify offline"),
    };
    let mut keys =
        public_keys.iter().map(|k| PublicKey::parse(k).map_err(anyhow::Error::msg)).collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = key_path(key_file, config.as_ref())? {
        keys.push(CheckpointKey::load(&path)?.public_key());
    }
    if keys.is_empty() {
        bail!(
            "give the checkpoint public key (--public-key, printed by `latchkey audit public-key`), \
             --key-file or --config: without it a forged checkpoint would pass"
        );
    }
    let mut extra_checkpoints = Vec::new();
    if let Some(path) = extra {
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: Value =
                serde_json::from_str(line).with_context(|| format!("{} line {}: not JSON", path.display(), n + 1))?;
            extra_checkpoints.extend(checkpoint::checkpoint_from_json(&v));
        }
    }
    let source = crate::ledger::open_audit_source(&store).await?;
    Ok(checkpoint::verify(&*source, VerifyRequest { from, to, keys, extra_checkpoints }).await?)
}

/// Prints a verification report; the exit status says whether the log is intact.
fn print_report(r: &Value) -> ExitCode {
    let problems = r["problems"].as_array().cloned().unwrap_or_default();
    if r["ok"] == true {
        println!(
            "audit chain OK: events {}..{} ({} checked), {} checkpoint(s) agree{}",
            cell(&r["from"]),
            cell(&r["to"]),
            cell(&r["events_checked"]),
            cell(&r["checkpoints_checked"]),
            if r["signatures_checked"] == true { ", signatures valid" } else { " (signatures not checked)" },
        );
        println!("head hash {}", cell(&r["head_hash"]));
        if let Some(c) = r["last_good_checkpoint"].as_object() {
            println!(
                "last checkpoint: event {} signed at {} by key {}",
                cell(&c["seq"]),
                cell(&c["signed_at"]),
                cell(&c["key_id"])
            );
        }
        return ExitCode::SUCCESS;
    }
    println!("audit chain BROKEN: {} problem(s)", problems.len());
    if let Some(first) = problems.first() {
        println!("first broken link: event {}: {}", cell(&first["seq"]), cell(&first["message"]));
    }
    let mut rows = vec![["SEQ", "KIND", "WHAT"].map(String::from).to_vec()];
    for p in &problems {
        rows.push(vec![cell(&p["seq"]), cell(&p["kind"]), cell(&p["message"])]);
    }
    print_table(&rows);
    ExitCode::FAILURE
}

fn print_explain(a: &Value) {
    println!("capability: {}", cell(&a["capability"]));
    println!("decision:   {}", cell(&a["decision"]));
    if !a["reason"].is_null() {
        println!("reason:     {}", cell(&a["reason"]));
    }
    if let Some(t) = a.get("token").filter(|t| !t.is_null()) {
        println!("token:      {}", cell(&t["outcome"]));
    }
    if let Some(k) = a.get("kill_rule").filter(|k| !k.is_null()) {
        println!("kill rule:  {}", cell(k));
    }
    println!("policy:     sha256 {}", cell(&a["policy_sha256"]));
    println!("trace:");
    for step in a["trace"].as_array().into_iter().flatten() {
        println!("  {}", serde_json::to_string(step).unwrap_or_default());
    }
}
