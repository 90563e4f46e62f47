//! `latchkey exchange`: the CI side. Gets the job's OIDC token by itself, trades it for a
//! capability's credentials, and hands them over without printing a secret to the terminal:
//! as shell `export`s, JSON, a dotenv file, GitHub Actions' environment files, or only to the
//! environment of one command, released when it ends.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};

/// What a CI job's environment must not pass on to the command it runs: the means to mint more
/// OIDC tokens (GitHub's token service, CircleCI's tokens), to release exchanges, and admin
/// keys. The `--token-env` variable is removed too.
pub const SCRUBBED: &[&str] = &[
    "ACTIONS_ID_TOKEN_REQUEST_URL",
    "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    "CIRCLE_OIDC_TOKEN",
    "CIRCLE_OIDC_TOKEN_V2",
    "LATCHKEY_RELEASE_TOKEN",
    "LATCHKEY_ADMIN_KEY",
];
/// Attempts for a network error, a 5xx or a 429, with a doubling pause from `RETRY_PAUSE`.
const ATTEMPTS: u32 = 4;
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// The longest `Retry-After` honoured; a longer one ends the retries.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `export NAME='value'` lines, for `eval "$(latchkey exchange …)"`.
    Env,
    /// The broker's answer as JSON.
    Json,
    /// GitHub Actions: masks first, then `$GITHUB_ENV`, `$GITHUB_OUTPUT` and `$GITHUB_STATE`.
    Github,
    /// `NAME=value` lines in the file given by `--output` (mode 0600).
    Dotenv,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The capability to ask for (a policy's name).
    #[arg(long)]
    capability: String,
    /// The broker's URL.
    #[arg(long, env = "LATCHKEY_URL")]
    url: String,
    /// The audience to request the OIDC token for; the broker's URL by default.
    #[arg(long, env = "LATCHKEY_AUDIENCE")]
    audience: Option<String>,
    /// Narrow the grants: `{"<grant>": {"repositories": [...], "permissions": {...}, "ttl": "5m"}}`.
    #[arg(long)]
    narrow: Option<String>,
    /// Read the subject token from this file (`-` for standard input).
    #[arg(long, conflicts_with = "token_env")]
    token_file: Option<PathBuf>,
    /// Read the subject token from this environment variable (GitLab's `id_tokens:`).
    #[arg(long)]
    token_env: Option<String>,
    /// How to hand the credentials over; without it, and without a command, a summary without
    /// secrets is printed.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The file `--format dotenv` writes.
    #[arg(long, required_if_eq("format", "dotenv"))]
    output: Option<PathBuf>,
    /// Put this before every variable name.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Print `--format env|json` even when standard output is a terminal.
    #[arg(long)]
    reveal: bool,
    /// With a command: do not release the credentials when it ends.
    #[arg(long)]
    keep: bool,
    /// The command to run with the credentials in its environment (after `--`).
    #[arg(last = true)]
    command: Vec<String>,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let url = args.url.trim_end_matches('/').to_owned();
    url::Url::parse(&url).with_context(|| format!("--url {url:?} is not a URL"))?;
    if let Some(narrow) = &args.narrow {
        serde_json::from_str::<serde_json::Map<String, Value>>(narrow).context("--narrow must be a JSON object")?;
    }
    // Everything that can refuse the output is checked before the exchange: credentials minted
    // and then not handed over would stay live for nothing.
    preflight(&args)?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let audience = args.audience.clone().unwrap_or_else(|| url.clone());
    let subject_token = subject_token(&args, &http, &audience).await?;
    let answer = exchange(&http, &url, &args, &subject_token).await?;
    drop(subject_token);
    let vars = variables(&answer, &args.prefix)?;
    let exchange_id = answer["exchange_id"].as_str().unwrap_or_default().to_owned();
    let release_token = SecretString::from(answer["release_token"].as_str().unwrap_or_default().to_owned());

    if !args.command.is_empty() {
        eprintln!("{}", summary(&answer));
        let code = run_command(&args, &vars).await;
        if args.keep {
            eprintln!("latchkey: --keep: the credentials stay until they expire (exchange {exchange_id})");
        } else {
            // Whatever the command did. A failed release is reported but does not replace the
            // command's status: the credentials still end at their TTL.
            match release(&http, &url, &exchange_id, &release_token).await {
                Ok(()) => eprintln!("latchkey: released exchange {exchange_id}"),
                Err(e) => eprintln!("latchkey: warning: {e:#}; the credentials end at their TTL"),
            }
        }
        return code;
    }
    match args.format {
        None => eprintln!("{}", summary(&answer)),
        Some(Format::Env) => {
            eprintln!("{}", summary(&answer));
            let mut out = String::new();
            for (name, value) in
                vars.iter().chain(release_vars(&args.prefix, &exchange_id, &release_token).iter().map(|(n, v)| (n, v)))
            {
                out.push_str(&format!("export {name}={}\n", shell_quote(value.expose_secret())));
            }
            std::io::stdout().write_all(out.as_bytes())?;
        }
        Some(Format::Json) => {
            eprintln!("{}", summary(&answer));
            println!("{}", serde_json::to_string_pretty(&answer)?);
        }
        Some(Format::Dotenv) => {
            let path = args.output.as_deref().ok_or_else(|| anyhow!("--format dotenv needs --output FILE"))?;
            let mut out = String::new();
            for (name, value) in
                vars.iter().chain(release_vars(&args.prefix, &exchange_id, &release_token).iter().map(|(n, v)| (n, v)))
            {
                out.push_str(&format!("{name}={}\n", shell_quote(value.expose_secret())));
            }
            eprintln!("{}", summary(&answer));
            write_private(path, out.as_bytes())?;
            eprintln!("latchkey: wrote {} variable(s) to {} (mode 0600)", vars.len() + 2, path.display());
        }
        Some(Format::Github) => {
            github(&answer, &vars, &exchange_id, &release_token)?;
            // After the masks: nothing may reach the log before them.
            eprintln!("{}", summary(&answer));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses, before anything is minted, an output that could not be delivered or would show a
/// secret: `--format env|json` print secrets only into a pipe or a file unless `--reveal`;
/// `--format github` needs GitHub's files; a command and a format are two different hand-overs.
fn preflight(args: &Args) -> anyhow::Result<()> {
    if !args.command.is_empty() {
        if args.format.is_some() {
            bail!("--format and a command (after --) are two ways to hand the credentials over: choose one");
        }
        return Ok(());
    }
    match args.format {
        Some(Format::Env | Format::Json) if std::io::stdout().is_terminal() && !args.reveal => bail!(
            "refusing to print credentials to a terminal: use `eval \"$(latchkey exchange … --format env)\"`, \
             redirect the output, or add --reveal"
        ),
        Some(Format::Github) => {
            for name in ["GITHUB_ENV", "GITHUB_OUTPUT", "GITHUB_STATE"] {
                if std::env::var_os(name).is_none_or(|v| v.is_empty()) {
                    bail!("${name} is not set: --format github runs inside a GitHub Actions step");
                }
            }
        }
        _ => {}
    }
    if args.keep {
        bail!("--keep only applies to a command (after --)");
    }
    Ok(())
}

/// The job's OIDC token: from a file or stdin, a named variable, or GitHub Actions' token service.
async fn subject_token(args: &Args, http: &reqwest::Client, audience: &str) -> anyhow::Result<SecretString> {
    let token = if let Some(path) = &args.token_file {
        let mut text = String::new();
        if path == Path::new("-") {
            std::io::stdin().read_to_string(&mut text).context("reading the subject token from standard input")?;
        } else {
            text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the subject token from {}", path.display()))?;
        }
        text
    } else if let Some(var) = &args.token_env {
        std::env::var(var).map_err(|_| {
            anyhow!(
                "the environment variable {var} is not set: on GitLab, declare it under `id_tokens:` with \
                 `aud: {audience}` in the job"
            )
        })?
    } else if let Some(request_url) = non_empty_var("ACTIONS_ID_TOKEN_REQUEST_URL") {
        let request_token = non_empty_var("ACTIONS_ID_TOKEN_REQUEST_TOKEN").ok_or_else(|| {
            anyhow!(
                "ACTIONS_ID_TOKEN_REQUEST_URL is set but ACTIONS_ID_TOKEN_REQUEST_TOKEN is not: GitHub sets both \
                 for a job with `permissions: id-token: write`; do not unset or override either"
            )
        })?;
        github_actions_token(http, &request_url, &request_token, audience).await?
    } else if std::env::var("GITHUB_ACTIONS").is_ok_and(|v| v == "true") {
        bail!(
            "this GitHub Actions job cannot request an OIDC token: add\n\n  permissions:\n    id-token: write\n\n\
             to the workflow or the job (and any other permissions it needs, e.g. contents: read)"
        );
    } else {
        bail!("no subject token: pass --token-file FILE (or - for stdin), --token-env VAR, or run in GitHub Actions");
    };
    let token = token.trim().to_owned();
    if token.is_empty() {
        bail!("the subject token is empty");
    }
    Ok(token.into())
}

fn non_empty_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// Asks GitHub Actions' token service for an OIDC token with `audience`.
async fn github_actions_token(
    http: &reqwest::Client,
    request_url: &str,
    request_token: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let mut url = url::Url::parse(request_url).context("ACTIONS_ID_TOKEN_REQUEST_URL is not a URL")?;
    url.query_pairs_mut().append_pair("audience", audience);
    let response =
        with_retries("GitHub's OIDC token service", || http.get(url.clone()).bearer_auth(request_token)).await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    match body["value"].as_str() {
        Some(token) if status.is_success() => Ok(token.to_owned()),
        _ => bail!(
            "GitHub's OIDC token service answered {status}: {}",
            body["message"].as_str().unwrap_or("no token (does the job have `permissions: id-token: write`?)")
        ),
    }
}

/// Sends a request built by `build`, again after a network error, a 5xx or a 429, a bounded
/// number of times with a doubling pause (or the server's `Retry-After`, when it is short).
async fn with_retries(what: &str, build: impl Fn() -> reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
    let mut pause = RETRY_PAUSE;
    for attempt in 1..=ATTEMPTS {
        match build().send().await {
            Ok(r) if attempt == ATTEMPTS => return Ok(r),
            Ok(r) if r.status() == StatusCode::TOO_MANY_REQUESTS => {
                let after = r
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(pause);
                if after > MAX_RETRY_AFTER {
                    return Ok(r);
                }
                eprintln!("latchkey: {what} asks to slow down; retrying in {after:?}");
                tokio::time::sleep(after).await;
                pause *= 2;
                continue;
            }
            Ok(r) if !r.status().is_server_error() => return Ok(r),
            Ok(r) => eprintln!("latchkey: {what} answered {}; retrying in {pause:?}", r.status()),
            Err(e) if attempt == ATTEMPTS => return Err(anyhow!("cannot reach {what}: {e}")),
            Err(e) => eprintln!("latchkey: cannot reach {what} ({e}); retrying in {pause:?}"),
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    unreachable!("the last attempt returns")
}

/// `POST /v1/token`; a refusal becomes an error that says what happened and where to look.
async fn exchange(http: &reqwest::Client, url: &str, args: &Args, token: &SecretString) -> anyhow::Result<Value> {
    let mut form = vec![
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange".to_owned()),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt".to_owned()),
        ("subject_token", token.expose_secret().to_owned()),
        ("scope", args.capability.clone()),
    ];
    if let Some(narrow) = &args.narrow {
        form.push(("narrow", narrow.clone()));
    }
    let response = with_retries("latchkey", || http.post(format!("{url}/v1/token")).form(&form)).await?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        return Ok(body);
    }
    let description = body["error_description"].as_str().unwrap_or("no description");
    let request_id = body["request_id"].as_str().unwrap_or("none");
    Err(match (status, body["error"].as_str()) {
        (StatusCode::FORBIDDEN, _) => anyhow!(
            "latchkey denied capability {:?}: {description} (request_id {request_id}). The full reason is not \
             shown to the job, so that a token holder cannot map the policies: an admin finds it in the audit \
             trail (`GET /v1/audit`, event `exchange.denied` with this request_id) and can replay the decision \
             with `latchkey policy explain`",
            args.capability
        ),
        (StatusCode::TOO_MANY_REQUESTS, _) => anyhow!(
            "latchkey is rate-limiting capability {:?}: {description} (request_id {request_id}); retry later",
            args.capability
        ),
        (StatusCode::BAD_REQUEST, Some("invalid_grant")) => anyhow!(
            "latchkey rejected the subject token: {description} (request_id {request_id}); check the audience \
             (--audience) and that the token is fresh"
        ),
        _ => anyhow!("latchkey answered {status}: {description} (request_id {request_id})"),
    })
}

/// `POST /v1/release`, again after a network error; already released is fine.
pub async fn release(
    http: &reqwest::Client,
    url: &str,
    exchange_id: &str,
    release_token: &SecretString,
) -> anyhow::Result<()> {
    let body = json!({ "exchange_id": exchange_id, "release_token": release_token.expose_secret() });
    let response = with_retries("latchkey", || http.post(format!("{url}/v1/release")).json(&body)).await?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body: Value = response.json().await.unwrap_or(Value::Null);
    bail!(
        "releasing exchange {exchange_id}: latchkey answered {status}: {} (request_id {})",
        body["error_description"].as_str().unwrap_or("no description"),
        body["request_id"].as_str().unwrap_or("none")
    )
}

/// The environment variables a normal tool picks up, per credential. When a capability has
/// several grants of one kind, each set is prefixed with its grant's name (`CODE_GH_TOKEN`).
fn variables(answer: &Value, prefix: &str) -> anyhow::Result<BTreeMap<String, SecretString>> {
    let credentials = answer["credentials"].as_array().ok_or_else(|| anyhow!("the answer holds no credentials"))?;
    let kind = |c: &Value| {
        let backend = c["backend"].as_str().unwrap_or_default();
        if backend == "vault" && c.get("lease_id").is_some() { "vault-secret".to_owned() } else { backend.to_owned() }
    };
    let mut per_kind: BTreeMap<String, usize> = BTreeMap::new();
    for c in credentials {
        *per_kind.entry(kind(c)).or_default() += 1;
    }
    let mut vars = BTreeMap::new();
    for c in credentials {
        let shared = per_kind[&kind(c)] > 1;
        let name_part = c["name"].as_str().unwrap_or_default().to_ascii_uppercase().replace(['-', '.'], "_");
        let var = |base: &str| {
            if shared { format!("{prefix}{name_part}_{base}") } else { format!("{prefix}{base}") }
        };
        let text = |field: &str| c[field].as_str().map(str::to_owned).unwrap_or_else(|| c[field].to_string());
        let mut put = |base: &str, value: String| {
            vars.insert(var(base), SecretString::from(value));
        };
        match kind(c).as_str() {
            "github" => put("GH_TOKEN", text("token")),
            "aws" => {
                put("AWS_ACCESS_KEY_ID", text("access_key_id"));
                put("AWS_SECRET_ACCESS_KEY", text("secret_access_key"));
                put("AWS_SESSION_TOKEN", text("session_token"));
                put("AWS_REGION", text("region"));
                put("AWS_DEFAULT_REGION", text("region"));
                put("AWS_CREDENTIAL_EXPIRATION", text("expiration"));
            }
            "vault" => put("VAULT_TOKEN", text("token")),
            "vault-secret" => {
                put("VAULT_LEASE_ID", text("lease_id"));
                for (key, value) in c["data"].as_object().into_iter().flatten() {
                    let key = key.to_ascii_uppercase().replace(|ch: char| !ch.is_ascii_alphanumeric(), "_");
                    put(
                        &format!("VAULT_SECRET_{key}"),
                        value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string()),
                    );
                }
            }
            _ => put("LATCHKEY_TOKEN", text("token")),
        }
    }
    Ok(vars)
}

fn release_vars(prefix: &str, exchange_id: &str, release_token: &SecretString) -> Vec<(String, SecretString)> {
    vec![
        (format!("{prefix}LATCHKEY_EXCHANGE_ID"), SecretString::from(exchange_id.to_owned())),
        (format!("{prefix}LATCHKEY_RELEASE_TOKEN"), release_token.clone()),
    ]
}

/// What was issued, without a secret: for the job's log.
fn summary(answer: &Value) -> String {
    let mut lines = vec![format!(
        "latchkey: exchange {} for capability {} (agent {}), expires {}",
        answer["exchange_id"].as_str().unwrap_or("?"),
        answer["capability"].as_str().unwrap_or("?"),
        answer["agent"].as_str().unwrap_or("?"),
        answer["expires_at"].as_str().unwrap_or("?"),
    )];
    for c in answer["credentials"].as_array().into_iter().flatten() {
        lines.push(format!(
            "latchkey:   {} ({}) {} fingerprint {}",
            c["name"].as_str().unwrap_or("?"),
            c["backend"].as_str().unwrap_or("?"),
            c["id"].as_str().unwrap_or("?"),
            c["fingerprint"].as_str().unwrap_or("?"),
        ));
    }
    lines.join("\n")
}

/// `--format github`: every secret masked before anything else, then the environment files.
fn github(
    answer: &Value,
    vars: &BTreeMap<String, SecretString>,
    exchange_id: &str,
    release_token: &SecretString,
) -> anyhow::Result<()> {
    let file = |name: &str| -> anyhow::Result<PathBuf> {
        std::env::var_os(name)
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("${name} is not set: --format github runs inside GitHub Actions"))
    };
    let (env_file, output_file, state_file) = (file("GITHUB_ENV")?, file("GITHUB_OUTPUT")?, file("GITHUB_STATE")?);
    // Masks first: a value is hidden from the log only from its mask on.
    let mut masks = String::new();
    for value in vars.values().chain(std::iter::once(release_token)) {
        for line in value.expose_secret().lines().filter(|l| !l.is_empty()) {
            masks.push_str(&format!("::add-mask::{line}\n"));
        }
    }
    let mut stdout = std::io::stdout();
    stdout.write_all(masks.as_bytes())?;
    stdout.flush()?;
    let mut env = String::new();
    for (name, value) in vars {
        env.push_str(&github_file_entry(name, value.expose_secret()));
    }
    append(&env_file, &env)?;
    let mut outputs = github_file_entry("exchange-id", exchange_id);
    outputs.push_str(&github_file_entry("expires-at", answer["expires_at"].as_str().unwrap_or_default()));
    append(&output_file, &outputs)?;
    let mut state = github_file_entry("exchange_id", exchange_id);
    state.push_str(&github_file_entry("release_token", release_token.expose_secret()));
    append(&state_file, &state)?;
    Ok(())
}

/// `NAME<<DELIMITER` … `DELIMITER`: GitHub's syntax that holds any value, newlines included,
/// with a random delimiter that the value cannot contain.
fn github_file_entry(name: &str, value: &str) -> String {
    let mut bytes = [0u8; 12];
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    let delimiter = format!("ghadelimiter_{}", hex::encode(bytes));
    format!("{name}<<{delimiter}\n{value}\n{delimiter}\n")
}

fn append(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path).with_context(|| format!("creating {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))
}

/// A POSIX shell single-quoted word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// Runs the command with the credentials added to, and the OIDC request and release variables
/// removed from, its environment. Returns its exit status as ours. SIGINT and SIGTERM are passed
/// on, so that the release after it still happens.
async fn run_command(args: &Args, vars: &BTreeMap<String, SecretString>) -> anyhow::Result<ExitCode> {
    let mut command = tokio::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]);
    for name in SCRUBBED.iter().copied().chain(args.token_env.as_deref()) {
        command.env_remove(name);
    }
    for (name, value) in vars {
        command.env(name, value.expose_secret());
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => {
            // The shell's convention: 127 not found, 126 not executable.
            eprintln!("latchkey: cannot start {:?}: {e}", args.command[0]);
            let code = if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 };
            return Ok(ExitCode::from(code));
        }
    };
    let status = wait_forwarding_signals(&mut child).await?;
    if let Some(code) = status.code() {
        return Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)));
    }
    #[cfg(unix)]
    let signal = std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(15);
    #[cfg(not(unix))]
    let signal = 15;
    eprintln!("latchkey: {:?} ended by signal {signal}", args.command[0]);
    // The shell's convention for a command killed by a signal.
    Ok(ExitCode::from(u8::try_from(128 + signal).unwrap_or(255)))
}

#[cfg(unix)]
async fn wait_forwarding_signals(child: &mut tokio::process::Child) -> anyhow::Result<std::process::ExitStatus> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            status = child.wait() => return Ok(status?),
            _ = term.recv() => { let _ = child.start_kill(); }
            _ = int.recv() => { let _ = child.start_kill(); }
        }
    }
}

#[cfg(not(unix))]
async fn wait_forwarding_signals(child: &mut tokio::process::Child) -> anyhow::Result<std::process::ExitStatus> {
    Ok(child.wait().await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_follow_the_tools_and_split_by_grant_name_when_needed() {
        let answer = json!({ "credentials": [
            { "name": "code", "backend": "github", "token": "ghs_a" },
            { "name": "ci-writer", "backend": "github", "token": "ghs_b" },
            { "name": "aws", "backend": "aws", "access_key_id": "AK", "secret_access_key": "SK",
              "session_token": "ST", "expiration": "2030-01-01T00:00:00Z", "region": "eu-west-1" },
            { "name": "db", "backend": "vault", "lease_id": "database/creds/ro/x", "data": { "username": "u", "password": "p" } },
            { "name": "jwt", "backend": "jwt", "token": "eyJ" },
        ]});
        let vars = variables(&answer, "").unwrap();
        let get = |k: &str| vars.get(k).map(|v| v.expose_secret().to_owned());
        assert_eq!(get("CODE_GH_TOKEN").as_deref(), Some("ghs_a"));
        assert_eq!(get("CI_WRITER_GH_TOKEN").as_deref(), Some("ghs_b"));
        assert_eq!(get("GH_TOKEN"), None, "two GitHub grants: one set per name");
        assert_eq!(get("AWS_SESSION_TOKEN").as_deref(), Some("ST"));
        assert_eq!(get("AWS_REGION").as_deref(), Some("eu-west-1"));
        assert_eq!(get("VAULT_SECRET_PASSWORD").as_deref(), Some("p"));
        assert_eq!(get("LATCHKEY_TOKEN").as_deref(), Some("eyJ"));
        let prefixed = variables(&answer, "CI_").unwrap();
        assert!(prefixed.contains_key("CI_AWS_ACCESS_KEY_ID"));
    }

    #[test]
    fn shell_quoting_and_github_entries_hold_any_value() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
        let entry = github_file_entry("X", "line1\nline2");
        let delimiter = entry.lines().next().unwrap().strip_prefix("X<<").unwrap().to_owned();
        assert_eq!(entry, format!("X<<{delimiter}\nline1\nline2\n{delimiter}\n"));
    }
}
