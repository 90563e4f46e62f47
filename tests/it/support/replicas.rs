//! Real `latchkey serve` processes: several on one PostgreSQL schema, or one on a SQLite file,
//! and PostgreSQL clusters of a test's own, for the replica and fault tests
//! (`tests/it/postgres_replicas.rs`, `tests/it/faults.rs`).
//!
//! A [`Fleet`] is what an operator runs: one configuration file, one sealing key shared by
//! every replica, the example policies, the `jwt` backend, an in-process [`TestIssuer`], and a
//! store migrated with `latchkey migrate` before any replica starts. Each [`Replica`] is a child
//! process, killed when dropped, so that a failing test leaves nothing running; when the test
//! panics, the tail of each replica's log is printed. [`load`] drives a fleet from concurrent
//! clients and [`assert_acknowledged_are_recorded`] checks what the store kept of it.
//!
//! A [`PgCluster`] is a throwaway PostgreSQL (`initdb`, `pg_ctl`) on a free port, for tests that
//! stop or restart the database: the machine's server is shared and never touched.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
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

/// A capability of every fleet: `pr-review` under a per-identity rate (never reached).
pub const RATED: &str = "pr-review-rated";

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
    ///
    /// It starts through `sh`, which sets `SIGXFSZ` to be ignored and then becomes the server
    /// (`exec`, same pid): a write past the file size limit of [`Replica::limit_file_size`] then
    /// fails with `EFBIG`, as a write to a full disk fails with `ENOSPC`, instead of killing the
    /// process.
    async fn spawn(name: &str, config: &Path, dir: &Path) -> Replica {
        let mut child = Command::new("sh")
            .args(["-c", "trap '' XFSZ; exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_latchkey"), "serve", "--config"])
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

    /// Sets the process's file size limit (`RLIMIT_FSIZE`, soft) to `bytes`, or lifts it with
    /// `None`, from outside, as `prlimit` does; no privilege is needed for a process of one's
    /// own. With a limit of 0 every write to a file fails: to the process, its disk is full.
    pub fn limit_file_size(&self, bytes: Option<u64>) {
        let soft = bytes.map_or("unlimited".to_owned(), |b| b.to_string());
        let out = Command::new("prlimit")
            .args(["--pid", &self.child.id().to_string(), &format!("--fsize={soft}:")])
            .output()
            .expect("prlimit (util-linux) runs");
        assert!(out.status.success(), "prlimit --fsize={soft}: {}", String::from_utf8_lossy(&out.stderr));
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

/// Replicas of one broker on one store: a PostgreSQL schema, or a SQLite file, which one
/// process at a time may hold.
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
        let dir = tempfile::tempdir().unwrap();
        let store = Store::postgres_schema(pg_url).await;
        Fleet::prepare_in(dir, store, store_lines, "").await
    }

    /// One replica on a SQLite file of the fleet's folder, migrated and ready, with an audit
    /// checkpoint key (`checkpoint.key`) so that `latchkey audit verify --config` can check the
    /// file offline. A restart is [`Fleet::respawn`]: the file takes one process at a time.
    pub async fn sqlite() -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Sqlite { path: dir.path().join("latchkey.db") };
        latchkey::checkpoint::generate_key_file(&dir.path().join("checkpoint.key")).unwrap();
        let audit = "[audit]\ncheckpoint_key_file = \"checkpoint.key\"\n";
        let fleet = Fleet::prepare_in(dir, store, "", audit).await;
        fleet.migrate();
        fleet.with_replicas(1).await
    }

    /// The files of a fleet in `dir` on `store`: `store_lines` go to the `[store]` table,
    /// `tables` after every table of the configuration.
    async fn prepare_in(dir: tempfile::TempDir, store: Store, store_lines: &str, tables: &str) -> Fleet {
        let issuer = TestIssuer::start().await;
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for entry in std::fs::read_dir(repo_path("policies")).unwrap().flatten() {
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), policies.join(entry.file_name())).unwrap();
            }
        }
        // `pr-review` with a rate no test reaches: an exchange of it writes its bucket before
        // anything else of the exchange is written.
        let pr_review = std::fs::read_to_string(repo_path("policies/pr-review.toml")).unwrap();
        let rated = format!("{pr_review}\n[limits]\nper_identity = \"1000000/hour\"\n");
        std::fs::write(policies.join(format!("{RATED}.toml")), rated).unwrap();
        // One sealing key for every replica, as a Kubernetes secret would give them.
        latchkey::seal::generate_key_file(&dir.path().join("latchkey.key")).unwrap();
        let config = dir.path().join("latchkey.toml");
        std::fs::write(&config, config_text(&issuer.url, &store.config_url(), store_lines, tables)).unwrap();
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

    /// Replaces replica `i` by a new process on the same files, as a pod restarted after its
    /// process died; the old process is reaped. Returns how long the new one took to listen.
    pub async fn respawn(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        let name = format!("{}2", self.replicas[i].name);
        let replica = Replica::spawn(&name, &self.config, self.dir.path()).await;
        let listening = started.elapsed();
        self.replicas[i] = replica;
        listening
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

    /// `latchkey audit verify --config FILE`: the store itself, without a server, with the
    /// checkpoint key of the configuration (a [`Fleet::sqlite`] has one).
    pub fn audit_verify_offline(&self) -> (bool, String) {
        self.latchkey(&["audit", "verify", "--config", self.config.to_str().unwrap(), "--json"], &[])
    }
}

/// What a load worker saw of one exchange.
#[derive(Debug, Clone)]
pub struct Seen {
    pub replica: usize,
    pub sent: Instant,
    pub answered: Instant,
    pub status: StatusCode,
    pub error: Option<String>,
    pub exchange_id: Option<String>,
    pub credential_id: Option<String>,
    /// Whether the answer carried a token: only a 200 may.
    pub has_token: bool,
}

impl Seen {
    /// One `pr-review` exchange; no answer at all is recorded as a 599 with the client's error.
    pub async fn exchange(fleet: &Fleet, replica: usize) -> Seen {
        let sent = Instant::now();
        let (status, body) = match fleet.try_exchange(replica, &fleet.pr_token(), "pr-review").await {
            Ok(a) => (a.status, a.body),
            Err(e) => (StatusCode::from_u16(599).unwrap(), json!({ "error": format!("no answer: {e}") })),
        };
        Seen {
            replica,
            sent,
            answered: Instant::now(),
            status,
            error: body["error"].as_str().map(str::to_owned),
            exchange_id: body["exchange_id"].as_str().map(str::to_owned),
            credential_id: body["credentials"][0]["id"].as_str().map(str::to_owned),
            has_token: body.get("access_token").is_some() || body["credentials"][0].get("token").is_some(),
        }
    }
}

/// `workers` loops per replica in `replicas`, each sending `pr-review` exchanges one after the
/// other until `stop` is set; everything they saw.
pub fn load(
    fleet: &Arc<Fleet>,
    replicas: &[usize],
    workers: usize,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinSet<Vec<Seen>> {
    let mut set = tokio::task::JoinSet::new();
    for &replica in replicas {
        for _ in 0..workers {
            let (fleet, stop) = (fleet.clone(), stop.clone());
            set.spawn(async move {
                let mut seen = Vec::new();
                // Bounded in count as well as in time.
                while !stop.load(Ordering::SeqCst) && seen.len() < 5_000 {
                    seen.push(Seen::exchange(&fleet, replica).await);
                }
                seen
            });
        }
    }
    set
}

/// Everything the workers of [`load`] saw, oldest first.
pub async fn collect(mut set: tokio::task::JoinSet<Vec<Seen>>) -> Vec<Seen> {
    let mut all = Vec::new();
    while let Some(seen) = set.join_next().await {
        all.extend(seen.unwrap());
    }
    all.sort_by_key(|s| s.sent);
    all
}

/// What a client was promised is what the store holds, read straight from the store and through
/// replica `i`'s audit API: every exchange answered 200 in `seen` has its `allowed` row, its
/// credential and its `exchange.allowed` event; and every `active` credential in the store
/// belongs to an `allowed` exchange whose `exchange.allowed` event names it, so that nothing is
/// live without its record. Returns the active credentials.
pub async fn assert_acknowledged_are_recorded(fleet: &Fleet, seen: &[Seen], i: usize) -> BTreeSet<String> {
    let column = |rows: Vec<Vec<Value>>| -> BTreeSet<String> {
        rows.into_iter().map(|r| r[0].as_str().unwrap().to_owned()).collect()
    };
    let allowed = column(fleet.store.query("SELECT id FROM exchanges WHERE state = 'allowed'").await);
    let credentials = column(fleet.store.query("SELECT id FROM credentials").await);
    let active = fleet.store.query("SELECT id, exchange_id FROM credentials WHERE state = 'active'").await;
    let events = fleet.audit(i).await;
    // (exchange, credential) of every `exchange.allowed` event.
    let mut audited = BTreeSet::new();
    for e in events.iter().map(|item| &item["event"]).filter(|e| e["event"] == "exchange.allowed") {
        let exchange = e["exchange_id"].as_str().unwrap_or_default();
        for c in e["detail"]["credentials"].as_array().into_iter().flatten() {
            audited.insert((exchange.to_owned(), c["id"].as_str().unwrap_or_default().to_owned()));
        }
    }
    for s in seen.iter().filter(|s| s.status == StatusCode::OK) {
        let (exchange, credential) = (s.exchange_id.as_deref().unwrap(), s.credential_id.as_deref().unwrap());
        assert!(allowed.contains(exchange), "exchange {exchange} was answered 200 but has no allowed row");
        assert!(credentials.contains(credential), "credential {credential} was issued but has no row");
        let pair = (exchange.to_owned(), credential.to_owned());
        assert!(audited.contains(&pair), "exchange {exchange} was answered 200 but is unaudited");
    }
    for row in &active {
        let (credential, exchange) = (row[0].as_str().unwrap(), row[1].as_str().unwrap());
        assert!(
            allowed.contains(exchange),
            "credential {credential} is active, its exchange {exchange} is not allowed"
        );
        let pair = (exchange.to_owned(), credential.to_owned());
        assert!(audited.contains(&pair), "credential {credential} is active but unaudited");
    }
    active.iter().map(|r| r[0].as_str().unwrap().to_owned()).collect()
}

/// The configuration every replica of a fleet reads.
fn config_text(issuer: &str, store_url: &str, store_lines: &str, tables: &str) -> String {
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

{tables}
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
