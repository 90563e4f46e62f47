//! Several real `latchkey serve` processes on one PostgreSQL schema, and PostgreSQL clusters of
//! a test's own, for the replica and fault tests (`tests/it/postgres_replicas.rs`).
//!
//! A [`Fleet`] is what an operator runs: one configuration file, one sealing key shared by
//! every replica, the example policies, the `jwt` backend, an in-process [`TestIssuer`], and a
//! schema migrated with `latchkey migrate` before any replica starts. Each [`Replica`] is a child
//! process, killed when dropped, so that a failing test leaves nothing running; when the test
//! panics, the tail of each replica's log is printed.
//!
//! A [`PgCluster`] is a throwaway PostgreSQL (`initdb`, `pg_ctl`) on a free port, for tests that
//! stop or restart the database: the machine's server is shared and never touched.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};

use super::peers::peer_var;
use super::store::{self, Kind, PG_BIN_VAR, Store};
use super::test_app::{
    ADMIN_KEY, AUDIENCE, AUDITOR_KEY, Answer, SECURITY_KEY, SERVICE_KEY, TestIssuer, answer, repo_path, sha256_hex,
};

/// The run's PostgreSQL database, or `None` (after saying why) when this run tests SQLite:
/// these tests only mean something on PostgreSQL.
pub fn postgres_run() -> Option<String> {
    if store::kind() != Kind::Postgres {
        eprintln!("skipped: a PostgreSQL test, and this run tests SQLite (LATCHKEY_TEST_STORE=postgres runs it)");
        return None;
    }
    Some(store::pg_url())
}

/// Claims the example `pr-review` policy (agent `pr-reviewer`, one `jwt` grant) allows.
pub fn pr_claims() -> Value {
    json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge" })
}

/// One `latchkey serve` process.
pub struct Replica {
    pub name: String,
    /// `http://127.0.0.1:PORT`, read from the process's "latchkey is serving" log line.
    pub url: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Replica {
    /// Starts `latchkey serve --config CONFIG` in `dir` and waits until it listens (not until it
    /// is ready: see [`Fleet::wait_ready`]).
    async fn spawn(name: &str, config: &Path, dir: &Path) -> Replica {
        let mut child = Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["serve", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("LATCHKEY_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("LATCHKEY_STORE_URL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the latchkey binary starts");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        let tx = Arc::new(Mutex::new(Some(tx)));
        for out in [
            Box::new(child.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stdout.take().unwrap()),
        ] {
            let (log, tx) = (log.clone(), tx.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if line.contains("latchkey is serving") {
                        let url = serde_json::from_str::<Value>(&line)
                            .ok()
                            .and_then(|v| v["url"].as_str().map(str::to_owned));
                        if let (Some(url), Some(tx)) = (url, tx.lock().unwrap().take()) {
                            let _ = tx.send(url);
                        }
                    }
                    log.lock().unwrap().push(line);
                }
            });
        }
        let mut replica = Replica { name: name.to_owned(), url: String::new(), child, log };
        match tokio::time::timeout(Duration::from_secs(60), rx).await {
            Ok(Ok(url)) => replica.url = url,
            _ => panic!("replica {name} did not start serving:\n{}", replica.log_tail(60)),
        }
        replica
    }

    /// `SIGKILL`s the process, as the OOM killer or a node failure would: no shutdown of any
    /// kind. The process is reaped when the replica is dropped.
    pub fn sigkill(&self) {
        let status = Command::new("kill").args(["-KILL", &self.child.id().to_string()]).status().unwrap();
        assert!(status.success(), "kill -KILL {}", self.child.id());
    }

    /// The last `n` lines the process logged.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- replica {} ({}), last lines -----\n{}", self.name, self.url, self.log_tail(60));
        }
    }
}

/// Replicas of one broker on one PostgreSQL schema.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub issuer: TestIssuer,
    /// The schema the replicas share.
    pub store: Store,
    pub config: PathBuf,
    pub replicas: Vec<Replica>,
    pub client: reqwest::Client,
}

impl Fleet {
    /// `n` replicas on a fresh schema of the PostgreSQL database at `pg_url`, each ready.
    pub async fn start(n: usize, pg_url: &str) -> Fleet {
        Fleet::start_with(n, pg_url, "").await
    }

    /// Like [`Fleet::start`], with `store_lines` added to the `[store]` table.
    pub async fn start_with(n: usize, pg_url: &str, store_lines: &str) -> Fleet {
        let fleet = Fleet::prepare_with(pg_url, store_lines).await;
        fleet.migrate();
        fleet.with_replicas(n).await
    }

    /// The files and a fresh schema, neither migrated nor served.
    pub async fn prepare(pg_url: &str) -> Fleet {
        Fleet::prepare_with(pg_url, "").await
    }

    /// Like [`Fleet::prepare`], with `store_lines` added to the `[store]` table.
    pub async fn prepare_with(pg_url: &str, store_lines: &str) -> Fleet {
        let issuer = TestIssuer::start().await;
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for entry in std::fs::read_dir(repo_path("policies")).unwrap().flatten() {
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), policies.join(entry.file_name())).unwrap();
            }
        }
        // One sealing key for every replica, as a Kubernetes secret would give them.
        latchkey::seal::generate_key_file(&dir.path().join("latchkey.key")).unwrap();
        let store = Store::postgres_schema(pg_url).await;
        let config = dir.path().join("latchkey.toml");
        std::fs::write(&config, config_text(&issuer.url, &store.config_url(), store_lines)).unwrap();
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Fleet { dir, issuer, store, config, replicas: Vec::new(), client }
    }

    /// `latchkey migrate --config FILE`; panics with its output when it fails.
    pub fn migrate(&self) {
        let (ok, out) = self.latchkey(&["migrate", "--config", self.config.to_str().unwrap()], &[]);
        assert!(ok, "latchkey migrate failed: {out}");
    }

    /// Starts `n` more replicas together, and waits until each is ready.
    pub async fn with_replicas(mut self, n: usize) -> Fleet {
        let first = self.replicas.len();
        let names: Vec<String> = (first..first + n).map(|i| ((b'A' + i as u8) as char).to_string()).collect();
        // Together, as an orchestrator starts them.
        let spawned: Vec<_> = names
            .iter()
            .map(|name| {
                let (name, config, dir) = (name.clone(), self.config.clone(), self.dir.path().to_owned());
                tokio::spawn(async move { Replica::spawn(&name, &config, &dir).await })
            })
            .collect();
        for handle in spawned {
            self.replicas.push(handle.await.unwrap());
        }
        for i in first..first + n {
            let waited = self.wait_ready(i, Duration::from_secs(30)).await;
            assert!(
                waited.is_some(),
                "replica {} is not ready:\n{}",
                self.replicas[i].name,
                self.replicas[i].log_tail(60)
            );
        }
        self
    }

    /// A new `latchkey serve` process on the fleet's files, as a restarted pod; not added to
    /// `replicas` (the fleet may be shared), so the caller holds it.
    pub async fn spawn_extra(&self, name: &str) -> Replica {
        Replica::spawn(name, &self.config, self.dir.path()).await
    }

    /// Waits until replica `i`'s `/readyz` answers 200; how long that took, or `None` if it did
    /// not within `limit`.
    pub async fn wait_ready(&self, i: usize, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if self.readyz(i).await.0 == StatusCode::OK {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Replica `i`'s `/readyz`: its status and body; a 599 and the error when it did not answer
    /// within 10 s.
    pub async fn readyz(&self, i: usize) -> (StatusCode, Value) {
        let url = format!("{}/readyz", self.replicas[i].url);
        match self.client.get(url).timeout(Duration::from_secs(10)).send().await {
            Ok(r) => {
                let a = answer(r).await;
                (a.status, a.body)
            }
            Err(e) => (StatusCode::from_u16(599).unwrap(), json!({ "no answer": format!("{e:?}") })),
        }
    }

    /// A fresh subject token (new `jti`) that the `pr-review` policy allows.
    pub fn pr_token(&self) -> String {
        self.issuer.token(pr_claims())
    }

    /// `POST /v1/token` on replica `i`.
    pub async fn exchange(&self, i: usize, token: &str, capability: &str) -> Answer {
        self.try_exchange(i, token, capability)
            .await
            .unwrap_or_else(|e| panic!("replica {} did not answer an exchange: {e}", self.replicas[i].name))
    }

    /// `POST /v1/token` on replica `i`, or why no answer came (within the client's 30 s).
    pub async fn try_exchange(&self, i: usize, token: &str, capability: &str) -> Result<Answer, String> {
        let form = [
            ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("subject_token", token),
            ("scope", capability),
        ];
        let r = self.client.post(format!("{}/v1/token", self.replicas[i].url)).form(&form).send().await;
        Ok(answer(r.map_err(|e| e.to_string())?).await)
    }

    /// An exchange for `pr-review` with a fresh token on replica `i`.
    pub async fn exchange_pr(&self, i: usize) -> Answer {
        self.exchange(i, &self.pr_token(), "pr-review").await
    }

    pub async fn get(&self, i: usize, path: &str, key: &str) -> Answer {
        let r = self.client.get(format!("{}{path}", self.replicas[i].url)).bearer_auth(key).send().await.unwrap();
        answer(r).await
    }

    pub async fn post_json(&self, i: usize, path: &str, key: &str, body: &Value) -> Answer {
        let r = self
            .client
            .post(format!("{}{path}", self.replicas[i].url))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap();
        answer(r).await
    }

    /// `POST /v1/kills` on replica `i` with the security key.
    pub async fn kill(&self, i: usize, selector: Value, reason: &str) -> Answer {
        self.post_json(i, "/v1/kills", SECURITY_KEY, &json!({ "selector": selector, "reason": reason })).await
    }

    /// Every audit event, oldest first, with its `seq`, read through replica `i`.
    pub async fn audit(&self, i: usize) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let a = self.get(i, &format!("/v1/audit?limit=1000&cursor={cursor}"), AUDITOR_KEY).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
            out.extend(a.body["items"].as_array().unwrap().iter().cloned());
            match a.body["next_cursor"].as_str() {
                Some(c) => cursor = c.to_owned(),
                None => return out,
            }
        }
    }

    /// Every credential matching `query` (`agent=…&state=…`), read through replica `i`.
    pub async fn credentials(&self, i: usize, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let a = self.get(i, &format!("/v1/credentials?{query}&limit=500&cursor={cursor}"), AUDITOR_KEY).await;
            assert_eq!(a.status, StatusCode::OK, "{}", a.text);
            out.extend(a.body["items"].as_array().unwrap().iter().cloned());
            match a.body["next_cursor"].as_str() {
                Some(c) => cursor = url::form_urlencoded::byte_serialize(c.as_bytes()).collect(),
                None => return out,
            }
        }
    }

    /// Runs the `latchkey` binary in the fleet's folder; whether it succeeded, and its output.
    pub fn latchkey(&self, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_latchkey"));
        cmd.args(args).current_dir(self.dir.path()).env("RUST_LOG", "warn").env_remove("LATCHKEY_ADMIN_KEY");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    /// `latchkey audit verify --url` against replica `i`, as an auditor.
    pub fn audit_verify(&self, i: usize) -> (bool, String) {
        let url = self.replicas[i].url.clone();
        self.latchkey(&["audit", "verify", "--url", &url, "--json"], &[("LATCHKEY_ADMIN_KEY", AUDITOR_KEY)])
    }
}

/// The configuration every replica of a fleet reads.
fn config_text(issuer: &str, store_url: &str, store_lines: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
audience = "{AUDIENCE}"

[store]
url = "{store_url}"
{store_lines}

[sealing]
key_file = "latchkey.key"

[policies]
dir = "policies"

[[issuer]]
id = "github-actions"
kind = "github"
url = "{issuer}"
algorithms = ["ES256"]
max_token_age = "10m"

[[admin_key]]
name = "test-admin"
role = "admin"
sha256 = "{admin}"

[[admin_key]]
name = "test-service"
role = "service"
sha256 = "{service}"

[[admin_key]]
name = "test-auditor"
role = "auditor"
sha256 = "{auditor}"

[[admin_key]]
name = "test-security"
role = "security"
sha256 = "{security}"
"#,
        admin = sha256_hex(ADMIN_KEY),
        service = sha256_hex(SERVICE_KEY),
        auditor = sha256_hex(AUDITOR_KEY),
        security = sha256_hex(SECURITY_KEY),
    )
}

/// A PostgreSQL cluster of a test's own, on a free port of 127.0.0.1, stopped when dropped.
/// Its binaries run as the `postgres` user when the tests run as root (initdb refuses root).
pub struct PgCluster {
    bin: PathBuf,
    /// Owned by the user the server runs as; holds `data/`, the socket and `server.log`.
    dir: tempfile::TempDir,
    pub port: u16,
}

impl PgCluster {
    /// `initdb` and start, or `None` (the test skips) without `LATCHKEY_TEST_PG_BIN`, unless
    /// peers are required.
    pub fn start() -> Option<PgCluster> {
        let bin = PathBuf::from(peer_var(PG_BIN_VAR, "PostgreSQL binaries")?);
        let dir = tempfile::Builder::new().prefix("latchkey-pg").tempdir().unwrap();
        if as_root() {
            let status = Command::new("chown").args(["postgres:postgres"]).arg(dir.path()).status().unwrap();
            assert!(status.success(), "chown postgres {}", dir.path().display());
        }
        let mut cluster = PgCluster { bin, dir, port: 0 };
        let data = cluster.data();
        cluster.run("initdb", &["-D", &data, "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        // A port below Linux's ephemeral range (32768-60999): no outgoing connection and no
        // `bind(0)` of another test can take it between this choice and the server's bind, or
        // while a test has the server stopped. Clusters of concurrent tests may still pick the
        // same one: then another is tried.
        for attempt in 0.. {
            cluster.port = unused_port_below_ephemeral();
            match cluster.try_start_server() {
                Ok(()) => break,
                Err(e) if attempt < 5 && e.contains("Address already in use") => continue,
                Err(e) => panic!("{e}"),
            }
        }
        Some(cluster)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// `pg_ctl start`, waiting until it accepts connections.
    pub fn start_server(&self) {
        self.try_start_server().unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_start_server(&self) -> Result<(), String> {
        let opts = format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display());
        let log = self.dir.path().join("server.log").display().to_string();
        self.try_run("pg_ctl", &["-D", &self.data(), "-l", &log, "-o", &opts, "-w", "-t", "60", "start"])
    }

    /// `pg_ctl stop -m fast`: clients are disconnected, the server shuts down cleanly.
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "-t", "60", "stop"]);
    }

    /// `pg_ctl restart -m fast`.
    pub fn restart(&self) {
        let log = self.dir.path().join("server.log").display().to_string();
        self.run("pg_ctl", &["-D", &self.data(), "-l", &log, "-m", "fast", "-w", "-t", "60", "restart"]);
    }

    /// The server's log, for a failure message.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        let mut cmd = if as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        cmd.current_dir(self.dir.path());
        cmd
    }

    fn run(&self, tool: &str, args: &[&str]) {
        self.try_run(tool, args).unwrap_or_else(|e| panic!("{e}"));
    }

    fn try_run(&self, tool: &str, args: &[&str]) -> Result<(), String> {
        let out = self.command(tool).args(args).output().map_err(|e| format!("{tool}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        Err(format!(
            "{tool} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.server_log()
        ))
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let _ = self.command("pg_ctl").args(["-D", &self.data(), "-m", "immediate", "stop"]).output();
    }
}

fn as_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A loopback port in 20000-32767 that nothing listens on now.
fn unused_port_below_ephemeral() -> u16 {
    loop {
        let port = 20_000 + (rand::random::<u16>() % 12_768);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}
