//! Several real `latchkey serve` processes on one PostgreSQL schema: the kill-switch across
//! replicas (how fast, and against racing exchanges), one audit chain from many writers,
//! revocation jobs done once, and PostgreSQL stopping or restarting under load.
//!
//! These tests only mean something on PostgreSQL: they skip in the SQLite run (and
//! `scripts/test.sh` leaves this module out of it). The fault tests stop and restart a cluster
//! of their own, never the shared server.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::Connection;

use crate::support::replicas::{Fleet, PgCluster, Seen, assert_acknowledged_are_recorded, collect, load, postgres_run};

/// Waits until no credential of `agent` is live, as seen through replica 0; how long it took.
async fn wait_no_live(fleet: &Fleet, agent: &str, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let live = fleet.credentials(0, &format!("agent={agent}&state=live")).await;
        if live.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{} credential(s) of {agent} still live {limit:?} after the kill: {:?}",
            live.len(),
            live.iter().map(|c| (&c["id"], &c["state"])).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `id → state` of every credential of `agent`, read from the store.
async fn states(fleet: &Fleet, agent: &str) -> BTreeMap<String, String> {
    let rows = fleet.store.query(&format!("SELECT id, state FROM credentials WHERE agent = '{agent}'")).await;
    rows.into_iter().map(|r| (r[0].as_str().unwrap().to_owned(), r[1].as_str().unwrap().to_owned())).collect()
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// DESIGN, kill-switch: "effective on this replica before the call answers and on every
/// replica within one second". Measured from the kill's answer on A to B's first refusal, and
/// to B holding the rule in memory (its `/readyz` counts the rules it has).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_on_one_replica_refuses_exchanges_on_another_within_a_second() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Arc::new(Fleet::start(2, &pg).await);
    let before = fleet.exchange_pr(1).await;
    assert_eq!(before.status, StatusCode::OK, "{}", before.text);
    let rules_before = fleet.readyz(1).await.1["kill_rules"].as_u64().unwrap();

    let k = fleet.kill(0, json!({ "agent": "pr-reviewer" }), "propagation").await;
    let answered = Instant::now();
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let kill_id = k.body["id"].as_str().unwrap().to_owned();

    // B's first refusal, polling with fresh tokens; nothing sent after the answer may pass.
    let refusal = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            let mut allowed_after = Vec::new();
            loop {
                let a = fleet.exchange_pr(1).await;
                match a.status {
                    StatusCode::FORBIDDEN => return (answered.elapsed(), allowed_after),
                    StatusCode::OK => allowed_after.push(a.body["exchange_id"].clone()),
                    other => panic!("replica B answered {other}: {}", a.text),
                }
                assert!(answered.elapsed() < Duration::from_secs(10), "B never refused the killed agent");
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        })
    };
    // B's own copy of the rules, which its exchanges check before anything is minted (step 3).
    let in_memory = {
        let fleet = fleet.clone();
        tokio::spawn(async move {
            loop {
                let (_, body) = fleet.readyz(1).await;
                if body["kill_rules"].as_u64().is_some_and(|n| n > rules_before) {
                    return answered.elapsed();
                }
                assert!(answered.elapsed() < Duration::from_secs(10), "B never loaded the rule: {body}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    let (refused_after, allowed_after) = refusal.await.unwrap();
    let loaded_after = in_memory.await.unwrap();
    println!(
        "kill propagation: B refused {} ms after A answered the kill; B held the rule in memory after {} ms",
        ms(refused_after),
        ms(loaded_after)
    );
    assert!(allowed_after.is_empty(), "B issued after the kill had answered: {allowed_after:?}");
    assert!(refused_after < Duration::from_secs(1), "B refused only after {refused_after:?}");
    assert!(loaded_after < Duration::from_secs(1), "B loaded the rule only after {loaded_after:?}");

    // Now B refuses from memory, before minting, and says which rule.
    let again = fleet.exchange_pr(1).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN, "{}", again.text);
    let request_id = again.body["request_id"].clone();
    let events = fleet.audit(0).await;
    let denied =
        events.iter().map(|i| &i["event"]).find(|e| e["event"] == "exchange.denied" && e["request_id"] == request_id);
    assert_eq!(denied.map(|e| e["reason"].clone()), Some(json!(format!("kill rule {kill_id}"))), "{denied:?}");
}

/// Exchanges keep arriving on B and C while the kill lands on A: none sent after the kill's
/// answer is allowed, and once the workers have drained the jobs the agent holds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_kill_racing_exchanges_on_other_replicas_leaves_no_live_credential() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Arc::new(Fleet::start(3, &pg).await);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, &[1, 2], 6, &stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kill_sent = Instant::now();
    let k = fleet.kill(0, json!({ "agent": "pr-reviewer" }), "race across replicas").await;
    let answered = Instant::now();
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = collect(workers).await;

    for s in &seen {
        assert!(
            matches!(s.status, StatusCode::OK | StatusCode::FORBIDDEN),
            "replica {} answered {} ({:?})",
            s.replica,
            s.status,
            s.error
        );
    }
    let sent_after: Vec<_> = seen.iter().filter(|s| s.sent >= answered && s.status == StatusCode::OK).collect();
    assert!(sent_after.is_empty(), "exchanges sent after the kill's answer were allowed: {sent_after:?}");
    let issued: Vec<&str> = seen.iter().filter_map(|s| s.credential_id.as_deref()).collect();
    let overlapping = seen.iter().filter(|s| s.status == StatusCode::OK && s.answered > kill_sent).count();
    let refused = seen.iter().filter(|s| s.status == StatusCode::FORBIDDEN).count();
    println!(
        "race: {} exchanges, {} allowed ({} of them answered while the kill was in flight or after it), {refused} refused",
        seen.len(),
        issued.len(),
        overlapping
    );
    assert!(!issued.is_empty() && refused > 0, "the kill landed outside the load: nothing raced");

    let drained = wait_no_live(&fleet, "pr-reviewer", Duration::from_secs(15)).await;
    println!("race: no live credential {} ms after the load stopped", ms(drained));
    let states = states(&fleet, "pr-reviewer").await;
    for id in &issued {
        assert_eq!(states.get(*id).map(String::as_str), Some("revoked"), "credential {id} was issued and not revoked");
    }
    let report = fleet
        .get(0, &format!("/v1/kills/{}", k.body["id"].as_str().unwrap()), crate::support::test_app::AUDITOR_KEY)
        .await;
    assert_eq!(report.body["report"]["totals"]["pending"], 0, "{}", report.text);
    assert!(report.body["report"]["totals"]["matched"].as_u64().unwrap() >= issued.len() as u64, "{}", report.text);
}

/// Writers on every replica append to one hash chain: it verifies, its sequence numbers run
/// 1..N without a gap, and it holds exactly one decision per exchange answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_exchanges_on_every_replica_leave_one_valid_audit_chain() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Arc::new(Fleet::start(3, &pg).await);
    const PER_WORKER: usize = 12;
    let mut set = tokio::task::JoinSet::new();
    for replica in 0..3 {
        for worker in 0..6 {
            let fleet = fleet.clone();
            set.spawn(async move {
                let mut out = Vec::new();
                for n in 0..PER_WORKER {
                    // One exchange in four comes from a repository the policy refuses.
                    let claims = if (worker + n) % 4 == 0 {
                        json!({ "event_name": "pull_request", "ref": "refs/pull/7/merge", "repository": "acme/other" })
                    } else {
                        crate::support::replicas::pr_claims()
                    };
                    let a = fleet.exchange(replica, &fleet.issuer.token(claims), "pr-review").await;
                    out.push((a.status, a.body["exchange_id"].as_str().map(str::to_owned), a.text));
                }
                out
            });
        }
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        answers.extend(r.unwrap());
    }
    let allowed: BTreeSet<String> =
        answers.iter().filter(|a| a.0 == StatusCode::OK).map(|a| a.1.clone().unwrap()).collect();
    let denied = answers.iter().filter(|a| a.0 == StatusCode::FORBIDDEN).count();
    for a in &answers {
        assert!(matches!(a.0, StatusCode::OK | StatusCode::FORBIDDEN), "{}: {}", a.0, a.2);
    }
    assert_eq!(allowed.len() + denied, 3 * 6 * PER_WORKER);

    let events = fleet.audit(1).await;
    let seqs: Vec<i64> = events.iter().map(|i| i["seq"].as_i64().unwrap()).collect();
    let expected: Vec<i64> = (1..=seqs.len() as i64).collect();
    assert_eq!(seqs, expected, "sequence numbers are not 1..N");
    let named = |name: &str| events.iter().map(|i| &i["event"]).filter(|e| e["event"] == name).collect::<Vec<_>>();
    let allowed_events: BTreeSet<String> =
        named("exchange.allowed").iter().map(|e| e["exchange_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(named("exchange.allowed").len(), allowed.len(), "one exchange.allowed per exchange answered 200");
    assert_eq!(allowed_events, allowed, "the allowed exchanges and their events differ");
    assert_eq!(named("exchange.denied").len(), denied, "one exchange.denied per exchange answered 403");
    println!("audit: {} events from 3 replicas, {} allowed, {denied} denied", seqs.len(), allowed.len());

    for replica in 0..3 {
        let (ok, out) = fleet.audit_verify(replica);
        assert!(ok, "audit verify through replica {replica}: {out}");
        let report: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        assert_eq!(report["ok"], true, "{report}");
    }
}

/// A kill over credentials issued on every replica: the three replicas' workers share the jobs,
/// and each credential is revoked once: one job, one attempt, one `credential.revoked` event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_revocation_job_is_done_once_across_replicas() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Fleet::start(3, &pg).await;
    let mut issued = BTreeSet::new();
    for n in 0..45 {
        let a = fleet.exchange_pr(n % 3).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
        issued.insert(a.body["credentials"][0]["id"].as_str().unwrap().to_owned());
    }
    let k = fleet.kill(0, json!({ "agent": "pr-reviewer" }), "jobs once").await;
    assert_eq!(k.status, StatusCode::CREATED, "{}", k.text);
    let kill_id = k.body["id"].as_str().unwrap().to_owned();
    assert_eq!(k.body["report"]["totals"]["matched"], issued.len(), "{}", k.text);
    let drained = wait_no_live(&fleet, "pr-reviewer", Duration::from_secs(20)).await;
    println!("jobs: {} credentials revoked across 3 replicas within {} ms", issued.len(), ms(drained));
    // Let any worker that would run a job twice do so before counting.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let events = fleet.audit(2).await;
    let mut revoked: Vec<String> = events
        .iter()
        .map(|i| &i["event"])
        .filter(|e| e["event"] == "credential.revoked" && e["detail"]["kill_id"] == kill_id.as_str())
        .map(|e| e["credential_id"].as_str().unwrap().to_owned())
        .collect();
    revoked.sort();
    let unique: BTreeSet<String> = revoked.iter().cloned().collect();
    assert_eq!(revoked.len(), unique.len(), "a credential was revoked more than once: {revoked:?}");
    assert_eq!(unique, issued, "the revoked credentials are not the issued ones");

    let jobs = fleet
        .store
        .query(&format!(
            "SELECT credential_id, count(*), min(attempts), max(attempts), min(outcome), max(outcome), \
             count(done_at) FROM jobs WHERE kill_id = '{kill_id}' GROUP BY credential_id ORDER BY credential_id"
        ))
        .await;
    assert_eq!(jobs.len(), issued.len(), "one job per matched credential: {jobs:?}");
    for row in &jobs {
        assert_eq!(
            row[1..].to_vec(),
            [json!(1), json!(1), json!(1), json!("revoked"), json!("revoked"), json!(1)],
            "job of credential {} (jobs, min/max attempts, min/max outcome, done): {row:?}",
            row[0]
        );
    }
}

/// PostgreSQL restarts under load on two replicas: meanwhile exchanges fail closed (503, never
/// a 200 without its record), the replicas become ready again by themselves, and every
/// exchange that was answered 200 is in the store and on a chain that still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_recover_from_a_postgres_restart_without_losing_an_acknowledged_record() {
    if postgres_run().is_none() {
        return;
    }
    let Some(cluster) = PgCluster::start() else { return };
    let cluster = Arc::new(cluster);
    let fleet = Arc::new(Fleet::start(2, &cluster.url()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, &[0, 1], 3, &stop);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let restart_started = Instant::now();
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.restart()).await.unwrap();
    }
    let restarted = Instant::now();
    println!("fault: pg_ctl restart -m fast took {} ms", ms(restarted - restart_started));
    for i in 0..2 {
        let waited = fleet.wait_ready(i, Duration::from_secs(15)).await;
        assert!(
            waited.is_some(),
            "replica {i} is not ready 15 s after the restart:\n{}",
            fleet.replicas[i].log_tail(40)
        );
    }
    let recovered = restarted.elapsed();
    println!("fault: both replicas ready again {} ms after the restart", ms(recovered));
    assert!(recovered < Duration::from_secs(10), "the replicas took {recovered:?} to recover");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = collect(workers).await;

    for s in &seen {
        match s.status {
            StatusCode::OK => {}
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(s.error.as_deref(), Some("temporarily_unavailable"), "{s:?}");
            }
            other => panic!("replica {} answered {other} ({:?}) around the restart", s.replica, s.error),
        }
    }
    let ok: Vec<&Seen> = seen.iter().filter(|s| s.status == StatusCode::OK).collect();
    let unavailable = seen.len() - ok.len();
    let after = ok.iter().filter(|s| s.sent > restarted).count();
    println!(
        "fault: {} exchanges, {} answered 200 ({after} after the restart), {unavailable} answered 503",
        seen.len(),
        ok.len()
    );
    assert!(after > 0, "no exchange succeeded after the restart");
    for i in 0..2 {
        let a = fleet.exchange_pr(i).await;
        assert_eq!(a.status, StatusCode::OK, "replica {i} after the restart: {}", a.text);
    }

    assert_acknowledged_are_recorded(&fleet, &seen, 0).await;
    let (ok, out) = fleet.audit_verify(1);
    assert!(ok, "audit verify after the restart: {out}");
}

/// PostgreSQL stops: within about two seconds `/readyz` says 503 and exchanges fail closed with
/// 503 `temporarily_unavailable`, never a 200; when it is back, so is the replica. How long a
/// request waits for the store is bounded by `[store] connect_timeout`, one second here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readyz_goes_unready_and_exchanges_fail_closed_when_postgres_stops() {
    let Some(o) = stop_and_start_postgres("connect_timeout = \"1s\"").await else { return };
    o.assert_noticed_within(Duration::from_millis(2500));
    assert!(o.serving_again.is_some(), "the replica did not issue again within 5 s of being ready: {o:?}");
}

/// The same with the default `[store]` settings, as an operator who set nothing runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_default_store_settings_a_stopped_postgres_is_noticed_within_two_seconds() {
    let Some(o) = stop_and_start_postgres("").await else { return };
    o.assert_noticed_within(Duration::from_millis(2500));
}

/// Once `/readyz` says ready again, the next exchange succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_first_exchange_after_postgres_is_back_succeeds() {
    let Some(o) = stop_and_start_postgres("connect_timeout = \"1s\"").await else { return };
    assert_eq!(o.first_after.0, StatusCode::OK, "the first exchange once ready again: {o:?}");
}

/// What one replica did while its PostgreSQL was stopped and started again.
#[derive(Debug)]
struct Outage {
    /// From the stop to the first 503 of `/readyz`, and how long that one call took (a probe
    /// with a short timeout, such as Kubernetes' default 1 s, sees a slow answer as none).
    unready: Duration,
    readyz_call: Duration,
    /// From the stop to the first exchange answered 503, and how long that call took.
    closed: Duration,
    exchange_call: Duration,
    /// How long each of three more exchanges took to be refused.
    later: Vec<Duration>,
    /// From the start to `/readyz` 200.
    ready_again: Option<Duration>,
    /// The first exchange once ready again: its status and body.
    first_after: (StatusCode, String),
    /// From ready again to the first exchange answered 200 (retrying for 5 s).
    serving_again: Option<Duration>,
}

impl Outage {
    /// The figures, in milliseconds.
    fn summary(&self) -> String {
        format!(
            "/readyz 503 after {} ms (that call took {} ms); exchanges 503 after {} ms (that call took {} ms, the \
             next ones {:?} ms); ready again {:?} ms after the start; first exchange then: {}; issuing again after {:?} ms",
            ms(self.unready),
            ms(self.readyz_call),
            ms(self.closed),
            ms(self.exchange_call),
            self.later.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            self.ready_again.map(ms),
            self.first_after.0,
            self.serving_again.map(ms),
        )
    }

    fn assert_noticed_within(&self, bound: Duration) {
        assert!(self.unready < bound, "/readyz answered 503 only after {:?}: {self:?}", self.unready);
        assert!(self.closed < bound, "exchanges took {:?} to fail closed: {self:?}", self.closed);
        assert!(self.later.iter().all(|t| *t < bound), "with the store down an exchange takes that long: {self:?}");
    }
}

/// One replica on a cluster of the test's own, with `store_lines` in `[store]`: PostgreSQL
/// stops, then starts again. Panics if anything is allowed while it is down, or if the replica
/// does not become ready again; the rest is measured for the caller to judge.
async fn stop_and_start_postgres(store_lines: &str) -> Option<Outage> {
    postgres_run()?;
    let cluster = Arc::new(PgCluster::start()?);
    let fleet = Fleet::start_with(1, &cluster.url(), store_lines).await;
    assert_eq!(fleet.exchange_pr(0).await.status, StatusCode::OK);
    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.stop()).await.unwrap();
    }
    let stopped = Instant::now();

    // `/readyz` and exchanges polled side by side, each from the stop.
    let refused = |a: &crate::support::test_app::Answer| {
        assert_ne!(a.status, StatusCode::OK, "an exchange was allowed with the store down: {}", a.text);
        a.status == StatusCode::SERVICE_UNAVAILABLE && a.body["error"] == "temporarily_unavailable"
    };
    let readyz = async {
        loop {
            let sent = Instant::now();
            let (status, body) = fleet.readyz(0).await;
            if status == StatusCode::SERVICE_UNAVAILABLE {
                assert_eq!(body["ready"], false, "{body}");
                break (stopped.elapsed(), sent.elapsed());
            }
            assert_eq!(status, StatusCode::OK, "/readyz with the store down: {body}");
            assert!(stopped.elapsed() < Duration::from_secs(15), "/readyz still says ready: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let exchanges = async {
        let mut answers = Vec::new();
        loop {
            let sent = Instant::now();
            let a = fleet.exchange_pr(0).await;
            if refused(&a) {
                break (stopped.elapsed(), sent.elapsed());
            }
            answers.push(a.text);
            assert!(stopped.elapsed() < Duration::from_secs(15), "exchanges do not fail closed: {answers:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let ((unready, readyz_call), (closed, exchange_call)) = tokio::join!(readyz, exchanges);
    let mut later = Vec::new();
    for _ in 0..3 {
        let sent = Instant::now();
        let a = fleet.exchange_pr(0).await;
        assert!(refused(&a), "with the store down: {}", a.text);
        later.push(sent.elapsed());
    }

    {
        let cluster = cluster.clone();
        tokio::task::spawn_blocking(move || cluster.start_server()).await.unwrap();
    }
    let ready_again = fleet.wait_ready(0, Duration::from_secs(15)).await;
    assert!(ready_again.is_some(), "the replica did not become ready again:\n{}", fleet.replicas[0].log_tail(60));
    let ready = Instant::now();
    let first = fleet.exchange_pr(0).await;
    let first_after = (first.status, first.text);
    let mut serving_again = (first_after.0 == StatusCode::OK).then(|| ready.elapsed());
    while serving_again.is_none() && ready.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if fleet.exchange_pr(0).await.status == StatusCode::OK {
            serving_again = Some(ready.elapsed());
        }
    }
    let outage = Outage { unready, readyz_call, closed, exchange_call, later, ready_again, first_after, serving_again };
    println!("store down and back: {}", outage.summary());
    Some(outage)
}

/// `serve` refuses a schema that `latchkey migrate` has not prepared, and says what to do.
#[tokio::test]
async fn serve_refuses_an_unmigrated_schema() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Fleet::prepare(&pg).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
        .args(["serve", "--config", fleet.config.to_str().unwrap()])
        .current_dir(fleet.dir.path())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("serve started on an unmigrated schema");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!status.success(), "{text}");
    assert!(text.to_lowercase().contains("migrat"), "the refusal does not say to migrate: {text}");

    fleet.migrate();
    let fleet = fleet.with_replicas(1).await;
    assert_eq!(fleet.exchange_pr(0).await.status, StatusCode::OK);
}

/// What the tests above rely on, checked without latchkey: the run's database takes a schema of
/// a test's own and the URL's `options[search_path]` puts every connection in it; the store
/// helpers read booleans, integers, text and `bytea` and dump every table; a cluster of a test's
/// own starts, stops and restarts.
#[tokio::test]
async fn the_postgres_peer_behaves_as_the_tests_assume() {
    use crate::support::store::{Store, contains, truthy};
    let Some(pg) = postgres_run() else { return };
    let store = Store::postgres_schema(&pg).await;
    let Store::Postgres { url, .. } = &store else { unreachable!() };
    assert!(url.contains("options[search_path]=lk_"), "{url}");
    store.execute("CREATE TABLE probe (id TEXT PRIMARY KEY, n BIGINT, ok BOOLEAN, blob BYTEA, at TEXT)").await;
    let schema = store.scalar("SELECT current_schema()").await;
    assert!(schema.as_str().unwrap().starts_with("lk_"), "the URL's search_path is not applied: {schema}");
    let inserted = store
        .execute("INSERT INTO probe VALUES ('a', 7, TRUE, '\\x736563726574'::bytea, NULL), ('b', 8, FALSE, NULL, 'x')")
        .await;
    assert_eq!(inserted, 2);
    let rows = store.query("SELECT id, n, ok, blob, at FROM probe ORDER BY id").await;
    assert_eq!(rows[0], [json!("a"), json!(7), json!(true), json!("736563726574"), Value::Null]);
    assert!(!truthy(&rows[1][2]));
    assert_eq!(store.count("SELECT count(*) FROM probe WHERE ok").await, 1);
    let dump = store.dump().await;
    assert!(contains(&dump, b"secret"), "bytea is dumped as raw bytes");
    assert!(contains(&dump, b"736563726574"), "and as hex");

    let Some(cluster) = PgCluster::start() else { return };
    let own = Store::postgres_schema(&cluster.url()).await;
    own.execute("CREATE TABLE t (n BIGINT)").await;
    own.execute("INSERT INTO t VALUES (1)").await;
    cluster.restart();
    assert_eq!(own.count("SELECT count(*) FROM t").await, 1, "a committed row survives the restart");
    cluster.stop();
    let refused = sqlx::PgConnection::connect(&cluster.url()).await;
    assert!(refused.is_err(), "the stopped cluster still answers");
    cluster.start_server();
    assert_eq!(own.count("SELECT n FROM t").await, 1);
}

/// `latchkey audit verify --store postgres://…` checks a live PostgreSQL store without a server,
/// as the SQLite tests do on a copy of the file: intact it passes; an edit whose later hashes
/// were all recomputed is caught by the checkpoint signed before it.
#[tokio::test]
async fn audit_verify_offline_reads_a_postgres_store_and_catches_a_recomputed_rewrite() {
    use crate::audit::{first_pr_event, rewrite_and_recompute};
    use crate::support::test_app::{ADMIN_KEY, TestApp};
    if postgres_run().is_none() {
        return;
    }
    let t = TestApp::builder().checkpoint_key().start().await;
    for _ in 0..2 {
        let a = t.exchange(&t.token(crate::support::replicas::pr_claims()), "pr-review").await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    }
    let cp = t.post_json("/v1/audit/checkpoints", Some(ADMIN_KEY), &json!({})).await;
    assert_eq!(cp.status, StatusCode::CREATED, "{}", cp.text);
    let cp_seq = cp.body["seq"].as_i64().unwrap();
    let url = t.store().config_url();
    let verify = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_latchkey"))
            .args(["audit", "verify", "--store", &url, "--key-file", "checkpoint.key", "--json"])
            .current_dir(t.dir.path())
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {text}"));
        (out.status.success(), report)
    };
    let (ok, report) = verify();
    assert!(ok && report["ok"] == true, "{report}");
    assert!(report["checkpoints_checked"].as_i64().unwrap() >= 1, "{report}");

    let target = first_pr_event(t.store()).await;
    rewrite_and_recompute(t.store(), target).await;
    let (ok, report) = verify();
    assert!(!ok, "{report}");
    let problems = report["problems"].as_array().unwrap();
    assert!(problems.iter().any(|p| p["kind"] == "rewritten" && p["seq"] == cp_seq), "{report}");
}

/// A replica SIGKILLed under load: the other keeps serving, a new process on the same store
/// starts clean, every exchange answered 200 (by either, before or after) has its row, its
/// credential and its audit event, and the chain verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_killed_under_load_loses_no_acknowledged_exchange() {
    let Some(pg) = postgres_run() else { return };
    let fleet = Arc::new(Fleet::start(2, &pg).await);
    let stop = Arc::new(AtomicBool::new(false));
    let workers = load(&fleet, &[0, 1], 3, &stop);
    tokio::time::sleep(Duration::from_millis(800)).await;
    fleet.replicas[0].sigkill();
    let killed = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = collect(workers).await;

    // The killed replica's clients got an answer or nothing; the other replica kept issuing.
    for s in &seen {
        let no_answer = s.status.as_u16() == 599;
        assert!(s.status == StatusCode::OK || (s.replica == 0 && no_answer), "{s:?}");
    }
    let ok: Vec<&Seen> = seen.iter().filter(|s| s.status == StatusCode::OK).collect();
    let survivor_after = ok.iter().filter(|s| s.replica == 1 && s.sent > killed).count();
    assert!(survivor_after > 0, "the other replica issued nothing after the kill");

    // A restarted process on the same store is ready and issues.
    let restarted = fleet.spawn_extra("A2").await;
    let ready = fleet.client.get(format!("{}/readyz", restarted.url)).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK, "{}", restarted.log_tail(40));
    let again = fleet.client.post(format!("{}/v1/token", restarted.url)).form(&[
        ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("subject_token", fleet.pr_token().as_str()),
        ("scope", "pr-review"),
    ]);
    assert_eq!(again.send().await.unwrap().status(), StatusCode::OK);

    assert_acknowledged_are_recorded(&fleet, &seen, 1).await;
    let (verified, out) = fleet.audit_verify(1);
    assert!(verified, "audit verify after the kill: {out}");
    println!(
        "fault: replica A SIGKILLed under load; {} exchanges answered 200 ({survivor_after} by B after the kill), \
         {} in flight on A got no answer",
        ok.len(),
        seen.iter().filter(|s| s.status.as_u16() == 599 && s.sent <= killed).count()
    );
}
