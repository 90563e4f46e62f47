//! The broker under test: its files (config, sealing key, policy), `latchkey migrate`, and
//! `latchkey serve` as a child process that is killed whenever the benchmark stops.

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::issuer::AUDIENCE;

/// The capability the benchmark exchanges for, up to its grant.
const POLICY_HEAD: &str = r#"description = "benchmark capability"
agent = "bench"
issuer = "github-actions"
ttl = "15m"

[match]
repository_owner_id = "1234567"
repository = "acme/widgets"
ref = ["refs/heads/main", "refs/pull/*/merge"]
"#;

/// What the capability grants.
#[derive(Debug, Clone, Copy)]
pub enum Grant<'a> {
    /// One `jwt`: no outside service is involved, and what is measured is latchkey itself
    /// (verify, policy, ledger, signing).
    Jwt,
    /// One STS session of this role, from the STS and IAM at `endpoint` (moto).
    Aws { endpoint: &'a str, role_arn: &'a str },
}

impl Grant<'_> {
    /// The backend's name, as the exchange's answer gives it.
    pub fn backend(&self) -> &'static str {
        match self {
            Grant::Jwt => "jwt",
            Grant::Aws { .. } => "aws",
        }
    }

    pub fn policy(&self) -> String {
        let s = |v: &str| serde_json::Value::from(v).to_string(); // a JSON string is a TOML basic string
        let grant = match self {
            Grant::Jwt => "backend = \"jwt\"\naudience = \"https://internal.example\"\n".to_owned(),
            Grant::Aws { role_arn, .. } => format!("backend = \"aws\"\nrole_arn = {}\n", s(role_arn)),
        };
        format!("{POLICY_HEAD}\n[[grant]]\n{grant}")
    }

    /// The `[backends.*]` section the grant needs, as docs/BACKENDS.md configures it.
    fn config(&self) -> String {
        let s = |v: &str| serde_json::Value::from(v).to_string();
        match self {
            Grant::Jwt => String::new(),
            Grant::Aws { endpoint, .. } => format!(
                "\n[backends.aws]\nregion = {}\nendpoint_url = {}\nrole_path = {}\n",
                s(crate::moto::REGION),
                s(endpoint),
                s(crate::moto::ROLE_PATH)
            ),
        }
    }
}

/// What was written into the working directory.
#[derive(Debug)]
pub struct Files {
    pub config: PathBuf,
    /// Output of `latchkey serve`.
    pub log: PathBuf,
    /// Output of `latchkey migrate`, apart: it prints on success, and the server log is expected
    /// to stay empty at `RUST_LOG=warn`.
    pub migrate_log: PathBuf,
    pub listen: SocketAddr,
}

/// Writes `latchkey.toml`, the sealing key, the admin key (kept beside, for `--keep`) and the
/// policy into `dir`.
pub fn write_files(dir: &Path, issuer_url: &str, store: &str, grant: &Grant) -> anyhow::Result<Files> {
    let listen = free_port()?;
    let mut admin_raw = [0u8; 32];
    random(&mut admin_raw)?;
    let admin_key = format!("lk_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(admin_raw));
    let admin_sha256 = hex::encode(Sha256::digest(admin_key.as_bytes()));

    let mut sealing = [0u8; 32];
    random(&mut sealing)?;
    write_private(
        &dir.join("latchkey.key"),
        &format!("{}\n", base64::engine::general_purpose::STANDARD.encode(sealing)),
    )?;
    write_private(&dir.join("admin.key"), &format!("{admin_key}\n"))?;
    write_private(&dir.join("checkpoint.key"), &checkpoint_key_pem()?)?;

    let config = dir.join("latchkey.toml");
    std::fs::write(&config, render_config(listen, issuer_url, &admin_sha256, store) + &grant.config())
        .with_context(|| format!("writing {}", config.display()))?;
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::write(dir.join("policies/bench.toml"), grant.policy())?;
    Ok(Files { config, log: dir.join("latchkey.log"), migrate_log: dir.join("migrate.log"), listen })
}

/// The configuration: plain HTTP on loopback, the store (`sqlite://latchkey.db`, the SQLite ledger
/// beside it, by default), the bench issuer with
/// single use on (the default, so every exchange spends a `jti` durably).
pub fn render_config(listen: SocketAddr, issuer_url: &str, admin_sha256: &str, store: &str) -> String {
    let s = |v: &str| serde_json::Value::from(v).to_string(); // a JSON string is a TOML basic string
    format!(
        r#"# Written by latchkey-bench.
[server]
listen = {listen}
audience = {audience}

[store]
url = {store}

[sealing]
key_file = "latchkey.key"

[policies]
dir = "policies"

[audit]
checkpoint_key_file = "checkpoint.key"

[[issuer]]
id = "github-actions"
kind = "github"
url = {issuer}
algorithms = ["RS256", "ES256"]
max_token_age = "10m"

[[admin_key]]
name = "bench-admin"
role = "admin"
sha256 = {admin_sha256}
"#,
        listen = s(&listen.to_string()),
        audience = s(AUDIENCE),
        issuer = s(issuer_url),
        admin_sha256 = s(admin_sha256),
        store = s(store),
    )
}

/// An Ed25519 key (PKCS#8 PEM) for the audit chain's checkpoints, as `latchkey init` makes one:
/// a broker without one runs, but warns at start.
fn checkpoint_key_pem() -> anyhow::Result<String> {
    let pkcs8 = aws_lc_rs::signature::Ed25519KeyPair::generate_pkcs8(&aws_lc_rs::rand::SystemRandom::new())
        .map_err(|_| anyhow!("cannot generate an Ed25519 key"))?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref());
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|l| std::str::from_utf8(l).expect("base64 is ASCII")).collect();
    Ok(format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n")))
}

fn random(buf: &mut [u8]) -> anyhow::Result<()> {
    aws_lc_rs::rand::fill(buf).map_err(|_| anyhow!("the system random source failed"))
}

/// Secrets are created 0600 from the start, never chmod-ed afterwards.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A loopback port that was free a moment ago. The broker binds it right after; the window for
/// another process to take it is small, and a clash shows up as a start-up error in the log.
fn free_port() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

/// A `latchkey` command with a clean environment: `LATCHKEY_*` variables from the caller's shell
/// would override the generated config.
fn command(latchkey: &Path, args: &[&str], config: &Path, log: &Path) -> anyhow::Result<tokio::process::Command> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let mut cmd = tokio::process::Command::new(latchkey);
    cmd.args(args).arg("--config").arg(config);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("LATCHKEY_") {
            cmd.env_remove(name);
        }
    }
    cmd.env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log_file.try_clone()?))
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true);
    Ok(cmd)
}

/// `latchkey migrate`: `serve` refuses an unmigrated store.
pub async fn migrate(latchkey: &Path, files: &Files) -> anyhow::Result<()> {
    let status = command(latchkey, &["migrate"], &files.config, &files.migrate_log)?
        .status()
        .await
        .with_context(|| format!("running {} migrate", latchkey.display()))?;
    if !status.success() {
        bail!("latchkey migrate failed ({status}); its output:\n{}", log_tail(&files.migrate_log, 20));
    }
    Ok(())
}

/// `latchkey serve`, running. Dropping it kills the process (on errors and on ctrl-c too).
pub struct Server {
    child: tokio::process::Child,
    pub pid: u32,
    pub url: String,
    pub log: PathBuf,
}

impl Server {
    pub async fn start(latchkey: &Path, files: &Files) -> anyhow::Result<Server> {
        let child = command(latchkey, &["serve"], &files.config, &files.log)?
            .spawn()
            .with_context(|| format!("starting {} serve", latchkey.display()))?;
        let pid = child.id().ok_or_else(|| anyhow!("latchkey serve exited at once"))?;
        Ok(Server { child, pid, url: format!("http://{}", files.listen), log: files.log.clone() })
    }

    /// Polls `/healthz` until it answers 200, the process exits, or `timeout` passes.
    pub async fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(1)).build()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("latchkey serve exited during start-up ({status}); its log:\n{}", log_tail(&self.log, 30));
            }
            if let Ok(r) = client.get(format!("{}/healthz", self.url)).send().await
                && r.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "latchkey serve did not answer /healthz within {timeout:?}; its log:\n{}",
                    log_tail(&self.log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` when the process has exited (a crash under load is a result too).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// The last `lines` lines of a log file, indented, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let all: Vec<&str> = text.lines().collect();
            let tail = &all[all.len().saturating_sub(lines)..];
            if tail.is_empty() { "  (empty)".into() } else { tail.iter().map(|l| format!("  {l}\n")).collect() }
        }
        Err(e) => format!("  (cannot read {}: {e})", path.display()),
    }
}

/// How many lines the broker logged at warn or above: with `RUST_LOG=warn` a healthy run logs
/// none, so any line deserves a look.
pub fn log_lines(path: &Path) -> usize {
    std::fs::read_to_string(path).map(|t| t.lines().filter(|l| !l.trim().is_empty()).count()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_every_part_the_benchmark_relies_on() {
        let text = render_config(
            "127.0.0.1:4242".parse().expect("addr"),
            "http://127.0.0.1:5151",
            &"ab".repeat(32),
            "sqlite://latchkey.db",
        );
        for expected in [
            "listen = \"127.0.0.1:4242\"",
            "audience = \"https://latchkey.bench\"",
            "url = \"sqlite://latchkey.db\"",
            "key_file = \"latchkey.key\"",
            "dir = \"policies\"",
            "id = \"github-actions\"",
            "url = \"http://127.0.0.1:5151\"",
            "algorithms = [\"RS256\", \"ES256\"]",
            "max_token_age = \"10m\"",
            "role = \"admin\"",
            "checkpoint_key_file = \"checkpoint.key\"",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // Single use is latchkey's default; the benchmark must not turn it off.
        assert!(!text.contains("single_use"));
    }

    #[test]
    fn files_are_written_with_private_secrets() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let files =
            write_files(dir.path(), "http://127.0.0.1:5151", "sqlite://latchkey.db", &Grant::Jwt).expect("files");
        let key = std::fs::read_to_string(dir.path().join("latchkey.key")).expect("key");
        assert!(key.ends_with('\n'));
        let raw = base64::engine::general_purpose::STANDARD.decode(key.trim_end()).expect("base64");
        assert_eq!(raw.len(), 32);
        let mode = std::fs::metadata(dir.path().join("latchkey.key")).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let admin = std::fs::read_to_string(dir.path().join("admin.key")).expect("admin key");
        let config = std::fs::read_to_string(&files.config).expect("config");
        assert!(config.contains(&hex::encode(Sha256::digest(admin.trim_end().as_bytes()))));
        let policy = std::fs::read_to_string(dir.path().join("policies/bench.toml")).expect("policy");
        assert!(
            policy.ends_with("[[grant]]\nbackend = \"jwt\"\naudience = \"https://internal.example\"\n"),
            "{policy}"
        );
        assert!(!config.contains("[backends"), "the jwt backend needs no configuration");
    }

    #[test]
    fn the_aws_grant_configures_the_backend_on_moto() {
        let dir = tempfile::tempdir().expect("tempdir");
        let role_arn = "arn:aws:iam::123456789012:role/latchkey/latchkey-bench-1";
        let grant = Grant::Aws { endpoint: "http://127.0.0.1:5000", role_arn };
        let files = write_files(dir.path(), "http://127.0.0.1:5151", "sqlite://latchkey.db", &grant).expect("files");
        let config = std::fs::read_to_string(&files.config).expect("config");
        assert!(
            config.ends_with(
                "[backends.aws]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:5000\"\nrole_path = \"/latchkey/\"\n"
            ),
            "{config}"
        );
        let policy = std::fs::read_to_string(dir.path().join("policies/bench.toml")).expect("policy");
        assert!(policy.ends_with(&format!("[[grant]]\nbackend = \"aws\"\nrole_arn = \"{role_arn}\"\n")), "{policy}");
    }
}
