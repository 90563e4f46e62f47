//! The PostgreSQL ledger as several replicas see it: two `Ledger`s opened on one database, as two
//! `latchkey serve` processes would, writing at the same time. (Whole processes are driven in
//! `postgres_replicas`.) Each test works in a schema of its own.

use std::sync::Arc;

use chrono::Utc;
use latchkey::audit::{AuditEvent, GENESIS_HASH, verify_chain};
use latchkey::kill::KillSubject;
use latchkey::ledger::postgres::Settings;
use latchkey::ledger::{
    Activate, Activation, CredentialRow, CredentialState, ExchangeRow, ExchangeState, JobKind, Ledger, LedgerError,
    NewJob, SpentJti,
};
use latchkey::policy::BackendKind;
use serde_json::json;
use sqlx::Connection;
use uuid::Uuid;

use crate::support::peers::peer_var;

/// A fresh schema in the run's database; `None` (the test skips) without the PostgreSQL peer.
async fn schema_url() -> Option<String> {
    let base = peer_var("LATCHKEY_TEST_PG_URL", "PostgreSQL")?;
    let schema = format!("lk_{}", Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await.expect("the PostgreSQL peer answers");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&mut conn).await.unwrap();
    Some(format!("{base}?options[search_path]={schema}"))
}

async fn replicas(url: &str) -> (Arc<dyn Ledger>, Arc<dyn Ledger>) {
    let a = latchkey::ledger::open(url, true, &Settings::default()).await.unwrap();
    let b = latchkey::ledger::open(url, false, &Settings::default()).await.unwrap();
    (a, b)
}

/// A pending exchange with one pending jwt credential, as step 5 records it.
fn intent(jti: &str) -> (ExchangeRow, CredentialRow, Activate) {
    let now = Utc::now();
    let exchange = ExchangeRow {
        id: Uuid::now_v7(),
        request_id: "req".into(),
        created_at: now,
        state: ExchangeState::Pending,
        error: None,
        reason: None,
        issuer: Some("github-actions".into()),
        subject: Some("repo:acme/widgets:ref:refs/heads/main".into()),
        repository: Some("acme/widgets".into()),
        workflow: None,
        capability: Some("pr-review".into()),
        agent: Some("pr-reviewer".into()),
        claims: json!({"repository": "acme/widgets"}),
        trace: json!([]),
        policy_sha256: None,
        release_token_sha256: None,
        expires_at: Some(now + chrono::Duration::minutes(15)),
    };
    let credential = CredentialRow {
        id: Uuid::now_v7(),
        exchange_id: exchange.id,
        name: "token".into(),
        backend: BackendKind::Jwt,
        state: CredentialState::Pending,
        agent: "pr-reviewer".into(),
        capability: "pr-review".into(),
        issuer: "github-actions".into(),
        subject: "repo:acme/widgets:ref:refs/heads/main".into(),
        repository: Some("acme/widgets".into()),
        workflow: None,
        created_at: now,
        expires_at: now + chrono::Duration::minutes(15),
        fingerprint: Some("fp".into()),
        handle: None,
        revoke_requested: false,
        revoked_at: None,
    };
    let activate = Activate {
        exchange_id: exchange.id,
        now,
        seen_kill_epoch: 0,
        subject: KillSubject {
            agent: "pr-reviewer".into(),
            capability: "pr-review".into(),
            issuer: "github-actions".into(),
            subject: "repo:acme/widgets:ref:refs/heads/main".into(),
            repository: Some("acme/widgets".into()),
            workflow: None,
            claims: serde_json::Map::new(),
            credentials: vec![credential.id],
        },
        jti: Some(SpentJti {
            issuer: "github-actions".into(),
            jti: jti.into(),
            capability: "pr-review".into(),
            keep_until: now + chrono::Duration::minutes(10),
        }),
        max_active: None,
        jobs: Vec::new(),
        event: AuditEvent::new("exchange.allowed", now),
    };
    (exchange, credential, activate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_writing_at_once_keep_one_unbroken_chain() {
    let Some(url) = schema_url().await else { return };
    let (a, b) = replicas(&url).await;
    let mut writers = tokio::task::JoinSet::new();
    for (name, ledger) in [("a", a.clone()), ("b", b.clone())] {
        for i in 0..150 {
            let ledger = ledger.clone();
            writers.spawn(async move {
                let mut e = AuditEvent::new("admin.call", Utc::now());
                e.actor = Some(format!("replica-{name}-{i}"));
                ledger.append_event(e).await
            });
        }
        // Exchanges too: their events append in the same transactions as their rows.
        for _ in 0..50 {
            let ledger = ledger.clone();
            writers.spawn(async move {
                let (exchange, credential, activate) = intent(&Uuid::new_v4().to_string());
                ledger.issue_local(&exchange, &[credential], activate).await.map(drop)
            });
        }
    }
    while let Some(done) = writers.join_next().await {
        done.unwrap().unwrap();
    }
    let events = a.events(0, 10_000).await.unwrap();
    assert_eq!(events.len(), 400, "every acknowledged write is on the chain once");
    let head = verify_chain(GENESIS_HASH, 1, &events).expect("one chain, no fork, no gap");
    assert_eq!(b.audit_head().await.unwrap(), (400, hex::encode(head)), "both replicas see the same head");
}

/// Writes that fail or are refused share transactions with writes that succeed (one writer
/// batches whatever is queued): each takes back only its own changes, and every other write of
/// its batch is kept, on one unbroken chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_or_refused_write_takes_back_only_its_own_changes() {
    let Some(url) = schema_url().await else { return };
    let (a, _b) = replicas(&url).await;
    let (exchange, credential, activate) = intent("spent");
    let taken = exchange.id;
    assert_eq!(a.issue_local(&exchange, &[credential], activate).await.unwrap(), Activation::Activated);

    let mut writers = tokio::task::JoinSet::new();
    for i in 0..120 {
        let ledger = a.clone();
        writers.spawn(async move {
            let outcome = match i % 4 {
                0 => {
                    let (exchange, credential, activate) = intent(&format!("fresh-{i}"));
                    format!("{:?}", ledger.issue_local(&exchange, &[credential], activate).await)
                }
                1 => {
                    let (exchange, credential, activate) = intent("spent");
                    format!("{:?}", ledger.issue_local(&exchange, &[credential], activate).await)
                }
                // Spends its fresh `jti`, then fails on the exchange id: a statement error, which
                // spoils the whole transaction in PostgreSQL, after a write that must go.
                2 => {
                    let (mut exchange, mut credential, mut activate) = intent(&format!("fresh-{i}"));
                    (exchange.id, credential.exchange_id, activate.exchange_id) = (taken, taken, taken);
                    let duplicate = ledger.issue_local(&exchange, &[credential], activate).await;
                    format!("{}", matches!(duplicate, Err(LedgerError::Conflict(_))))
                }
                _ => {
                    let handle =
                        latchkey::ledger::Handle { sealed: None, fingerprint: "fp".into(), expires_at: Utc::now() };
                    let unknown = ledger.record_handle(Uuid::now_v7(), &handle).await;
                    format!("{}", matches!(unknown, Err(LedgerError::NotFound)))
                }
            };
            ledger.append_event(AuditEvent::new("admin.call", Utc::now())).await.unwrap();
            (i % 4, outcome)
        });
    }
    while let Some(done) = writers.join_next().await {
        let (kind, outcome) = done.unwrap();
        let expected = ["Ok(Activated)", "Ok(Replay)", "true", "true"][kind];
        assert_eq!(outcome, expected, "write kind {kind}");
    }

    let url_conn = url.clone();
    let mut conn = sqlx::PgConnection::connect(&url_conn).await.unwrap();
    let count = async |conn: &mut sqlx::PgConnection, sql: &str| -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned())).fetch_one(conn).await.unwrap()
    };
    assert_eq!(count(&mut conn, "SELECT COUNT(*) FROM exchanges").await, 31, "the first and 30 fresh ones");
    assert_eq!(count(&mut conn, "SELECT COUNT(*) FROM credentials WHERE state = 'active'").await, 31);
    assert_eq!(count(&mut conn, "SELECT COUNT(*) FROM spent_jti").await, 31);
    let events = a.events(0, 10_000).await.unwrap();
    assert_eq!(events.len(), 31 + 120, "every kept write's event once, and no refused one's");
    verify_chain(GENESIS_HASH, 1, &events).expect("one chain, no fork, no gap");
}

/// A kill and the activations around it, sent together so that the writer takes them in one
/// transaction: an activation applied after the kill of its agent is refused even when an
/// activation before the kill, in the same transaction, already read the kill epoch; one applied
/// before it is activated, and the kill gives its credential a revocation job.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_activation_after_a_kill_in_the_same_transaction_is_refused() {
    let Some(url) = schema_url().await else { return };
    let (a, _b) = replicas(&url).await;
    let mut refused = 0;
    for round in 0..30 {
        let agent = format!("agent-{round}");
        let epoch = a.kill_state(Utc::now()).await.unwrap().epoch;
        let activation = |jti: String, agent: &str| {
            let (exchange, credential, mut activate) = intent(&jti);
            (activate.subject.agent, activate.seen_kill_epoch) = (agent.to_owned(), epoch);
            (exchange, [credential], activate)
        };
        let (before_e, before_c, before_a) = activation(format!("before-{round}"), "bystander");
        let (after_e, after_c, after_a) = activation(format!("after-{round}"), &agent);
        let rule = latchkey::kill::KillRule {
            id: Uuid::now_v7(),
            selector: latchkey::kill::Selector { agent: Some(agent.clone()), ..Default::default() },
            reason: "test".into(),
            created_at: Utc::now(),
            created_by: "admin-key:test".into(),
            expires_at: None,
            lifted_at: None,
        };
        // Polled in this order, so sent to the writer in this order.
        let (before, kill, after) = tokio::join!(
            a.issue_local(&before_e, &before_c, before_a),
            a.create_kill(&rule, AuditEvent::new("kill.created", Utc::now())),
            a.issue_local(&after_e, &after_c, after_a),
        );
        assert_eq!(before.unwrap(), Activation::Activated, "round {round}: the bystander");
        let kill = kill.unwrap();
        match after.unwrap() {
            Activation::Killed { rule_id } => {
                assert_eq!(rule_id, Some(rule.id), "round {round}");
                assert!(kill.jobs.is_empty(), "round {round}: nothing of the agent was active");
                refused += 1;
            }
            Activation::Activated => {
                assert_eq!(kill.jobs, [after_c[0].id], "round {round}: activated before the kill, revoked by it")
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
    assert!(refused > 0, "no activation ever followed its kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_subject_token_is_spent_once_whichever_replica_sees_it() {
    let Some(url) = schema_url().await else { return };
    let (a, b) = replicas(&url).await;
    for round in 0..20 {
        let jti = format!("jti-{round}");
        let (ea, ca, aa) = intent(&jti);
        let (eb, cb, ab) = intent(&jti);
        let (ca, cb) = ([ca], [cb]);
        let (ra, rb) = tokio::join!(a.issue_local(&ea, &ca, aa), b.issue_local(&eb, &cb, ab));
        let mut answers = [ra.unwrap(), rb.unwrap()];
        answers.sort_by_key(|x| format!("{x:?}"));
        assert_eq!(answers, [Activation::Activated, Activation::Replay], "round {round}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_job_is_claimed_by_exactly_one_replica() {
    let Some(url) = schema_url().await else { return };
    let (a, b) = replicas(&url).await;
    let now = Utc::now();
    let mut expected = Vec::new();
    for i in 0..200 {
        let (exchange, credential, activate) = intent(&format!("job-{i}"));
        let job = NewJob {
            id: Uuid::now_v7(),
            kind: JobKind::Revoke,
            credential_id: credential.id,
            backend: credential.backend,
            kill_id: None,
            run_at: now - chrono::Duration::seconds(1),
        };
        expected.push(job.id);
        assert_eq!(a.issue_local(&exchange, &[credential], activate).await.unwrap(), Activation::Activated);
        a.enqueue_jobs(&[job]).await.unwrap();
    }
    let lease = now + chrono::Duration::minutes(2);
    let claim = |ledger: Arc<dyn Ledger>| async move {
        let mut mine = Vec::new();
        loop {
            let jobs = ledger.claim_jobs(now, BackendKind::Jwt, 7, lease).await.unwrap();
            if jobs.is_empty() {
                return mine;
            }
            mine.extend(jobs.into_iter().map(|j| j.id));
        }
    };
    let (by_a, by_b) = tokio::join!(claim(a.clone()), claim(b.clone()));
    assert!(!by_a.is_empty() && !by_b.is_empty(), "both replicas worked: {} and {}", by_a.len(), by_b.len());
    let mut all: Vec<Uuid> = by_a.iter().chain(&by_b).copied().collect();
    all.sort();
    let claimed = all.len();
    all.dedup();
    assert_eq!(claimed, all.len(), "no job was claimed twice");
    expected.sort();
    assert_eq!(all, expected, "every job was claimed");
}

#[tokio::test]
async fn serve_refuses_an_unmigrated_or_newer_schema() {
    let Some(url) = schema_url().await else { return };
    let err = latchkey::ledger::open(&url, false, &Settings::default()).await.unwrap_err();
    assert!(
        matches!(&err, LedgerError::Schema(m) if m.contains("no latchkey schema") && m.contains("latchkey migrate")),
        "{err}"
    );
    drop(latchkey::ledger::open(&url, true, &Settings::default()).await.unwrap());
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql("UPDATE latchkey_schema SET version = 99").execute(&mut conn).await.unwrap();
    let err = latchkey::ledger::open(&url, false, &Settings::default()).await.unwrap_err();
    assert!(matches!(&err, LedgerError::Schema(m) if m.contains("newer latchkey")), "{err}");
    let err = latchkey::ledger::open(&url, true, &Settings::default()).await.unwrap_err();
    assert!(matches!(&err, LedgerError::Schema(m) if m.contains("newer latchkey")), "migrate refuses too: {err}");
    assert!(!err.to_string().contains("options"), "the message names the database, not the URL: {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_is_counted_across_replicas() {
    let Some(url) = schema_url().await else { return };
    let (a, b) = replicas(&url).await;
    let now = Utc::now();
    // 10 an hour in one burst, asked 40 times from two replicas at once: 10 go through.
    let rate = latchkey::policy::Rate::parse("10/hour").unwrap();
    let take = |ledger: Arc<dyn Ledger>| async move {
        let mut allowed = 0;
        for _ in 0..20 {
            if ledger.take_rate("identity", now, rate.interval(), rate.tolerance()).await.unwrap().is_none() {
                allowed += 1;
            }
        }
        allowed
    };
    let (by_a, by_b) = tokio::join!(take(a.clone()), take(b.clone()));
    assert_eq!(by_a + by_b, 10, "{by_a} on one replica, {by_b} on the other");
    // The next place is one interval (6 minutes) after the burst; times are kept to the millisecond.
    let wait = b.take_rate("identity", now, rate.interval(), rate.tolerance()).await.unwrap().unwrap();
    assert!((359.0..=360.0).contains(&wait.as_secs_f64()), "{wait:?}");
}

#[tokio::test]
async fn a_read_only_store_fails_writes_closed_and_recovers() {
    let Some(base) = peer_var("LATCHKEY_TEST_PG_URL", "PostgreSQL") else { return };
    // A database of its own: read-only is set per database.
    let name = format!("lk_ro_{}", Uuid::new_v4().simple());
    let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    let url = format!("{}/{name}", base.rsplit_once('/').unwrap().0);
    let ledger = latchkey::ledger::open(&url, true, &Settings::default()).await.unwrap();
    ledger.append_event(AuditEvent::new("admin.call", Utc::now())).await.unwrap();

    let read_only = |on: bool| {
        let name = name.clone();
        let base = base.clone();
        async move {
            let mut admin = sqlx::PgConnection::connect(&base).await.unwrap();
            let set = if on { "on" } else { "off" };
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "ALTER DATABASE {name} SET default_transaction_read_only = {set}; \
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
            )))
            .execute(&mut admin)
            .await
            .unwrap();
        }
    };
    read_only(true).await;
    let (exchange, credential, activate) = intent("ro");
    for _ in 0..2 {
        let err = ledger.append_event(AuditEvent::new("admin.call", Utc::now())).await.unwrap_err();
        assert!(matches!(&err, LedgerError::Unavailable(m) if m.contains("read-only")), "{err}");
    }
    let err = ledger.issue_local(&exchange, std::slice::from_ref(&credential), activate.clone()).await.unwrap_err();
    assert!(matches!(err, LedgerError::Unavailable(_)), "an exchange fails closed: {err}");

    read_only(false).await;
    assert_eq!(ledger.issue_local(&exchange, &[credential], activate).await.unwrap(), Activation::Activated);
    let events = ledger.events(0, 100).await.unwrap();
    assert_eq!(events.len(), 2, "what was refused left nothing behind");
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
    drop(ledger);
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut admin).await.unwrap();
}

/// A store of schema version 3 (before each backend had its own job queue) upgraded by
/// `latchkey migrate`: the jobs it already held are given their credential's backend, so each
/// backend's worker still finds its own and no other.
#[tokio::test]
async fn an_upgrade_gives_queued_jobs_their_credentials_backend() {
    let Some(url) = schema_url().await else { return };
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    for sql in [
        include_str!("../../migrations/postgres/0001_initial.sql"),
        include_str!("../../migrations/postgres/0002_limits.sql"),
        include_str!("../../migrations/postgres/0003_signing_key_retirement.sql"),
        "CREATE TABLE latchkey_schema (version BIGINT NOT NULL); INSERT INTO latchkey_schema VALUES (3);",
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await.unwrap();
    }
    let now = Utc::now();
    let ts = |t: chrono::DateTime<Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let exchange = Uuid::now_v7().to_string();
    sqlx::query(
        "INSERT INTO exchanges (id, request_id, created_at, state, claims, trace) \
         VALUES ($1, 'req-old', $2, 'allowed', '{}', '[]')",
    )
    .bind(&exchange)
    .bind(ts(now))
    .execute(&mut conn)
    .await
    .unwrap();
    let mut jobs = Vec::new();
    for backend in ["vault", "github", "aws"] {
        let credential = Uuid::now_v7().to_string();
        sqlx::query(
            "INSERT INTO credentials (id, exchange_id, name, backend, state, agent, capability, issuer, subject, \
             created_at, expires_at) VALUES ($1, $2, $3, $3, 'active', 'a', 'c', 'i', 's', $4, $5)",
        )
        .bind(&credential)
        .bind(&exchange)
        .bind(backend)
        .bind(ts(now))
        .bind(ts(now + chrono::Duration::minutes(10)))
        .execute(&mut conn)
        .await
        .unwrap();
        let job = Uuid::now_v7();
        sqlx::query("INSERT INTO jobs (id, kind, credential_id, run_at) VALUES ($1, 'revoke', $2, $3)")
            .bind(job.to_string())
            .bind(&credential)
            .bind(ts(now - chrono::Duration::seconds(1)))
            .execute(&mut conn)
            .await
            .unwrap();
        jobs.push(job);
    }

    let ledger = latchkey::ledger::open(&url, true, &Settings::default()).await.unwrap();
    let lease = now + chrono::Duration::minutes(2);
    let claimed = |backend| {
        let ledger = ledger.clone();
        async move {
            ledger.claim_jobs(now, backend, 10, lease).await.unwrap().into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(claimed(BackendKind::Jwt).await, Vec::<Uuid>::new());
    assert_eq!(claimed(BackendKind::Vault).await, [jobs[0]]);
    assert_eq!(claimed(BackendKind::Github).await, [jobs[1]]);
    assert_eq!(claimed(BackendKind::Aws).await, [jobs[2]]);
    let unset: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE backend = ''").fetch_one(&mut conn).await.unwrap();
    assert_eq!(unset, 0);
}
