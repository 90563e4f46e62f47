//! Tests of the SQLite ledger against real database files.
//!
//! Kill selectors here use `all`, `issuer` and `credential` only: they are judged without glob
//! patterns, whose matching is tested in `policy::glob`.

#![allow(clippy::unwrap_used, reason = "a test fails loudly on the first unexpected error")]

use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Duration, TimeZone, Utc};
use serde_json::json;
use tempfile::TempDir;
use uuid::Uuid;

use super::writer::{Command, Writer};
use super::*;
use crate::audit::{ChainError, verify_chain};
use crate::kill::{KillSubject, Selector};
use crate::ledger::{ExchangeState, JobKind, SpentJti};
use crate::policy::BackendKind;

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).single().expect("a valid time")
}

fn event(name: &str, at: DateTime<Utc>) -> AuditEvent {
    AuditEvent::new(name, at)
}

async fn fresh() -> (TempDir, Arc<dyn Ledger>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ledger = open(&dir.path().join("latchkey.db"), true).await.expect("open");
    (dir, ledger)
}

fn db_path(dir: &TempDir) -> std::path::PathBuf {
    dir.path().join("latchkey.db")
}

/// A pending exchange of `issuer` with `grants` pending credentials.
fn intent(issuer: &str, grants: usize) -> (ExchangeRow, Vec<CredentialRow>) {
    // Time-ordered ids, as the broker makes them.
    let exchange = ExchangeRow {
        id: Uuid::now_v7(),
        request_id: format!("req-{}", Uuid::new_v4()),
        created_at: t0(),
        state: ExchangeState::Pending,
        error: None,
        reason: None,
        issuer: Some(issuer.into()),
        subject: Some("repo:acme/widgets:ref:refs/heads/main".into()),
        repository: Some("acme/widgets".into()),
        workflow: Some("acme/widgets/.github/workflows/review.yml@refs/heads/main".into()),
        capability: Some("pr-review".into()),
        agent: Some("pr-reviewer".into()),
        claims: json!({"repository": "acme/widgets", "repository_owner_id": "1234567", "run_id": 42}),
        trace: json!([{"rule": "match.repository", "ok": true}]),
        policy_sha256: Some("ab".repeat(32)),
        release_token_sha256: Some("cd".repeat(32)),
        expires_at: Some(t0() + Duration::minutes(15)),
    };
    let credentials = (0..grants)
        .map(|i| CredentialRow {
            id: Uuid::now_v7(),
            exchange_id: exchange.id,
            name: format!("grant{i}"),
            backend: if i == 0 { BackendKind::Github } else { BackendKind::Jwt },
            state: CredentialState::Pending,
            agent: "pr-reviewer".into(),
            capability: "pr-review".into(),
            issuer: issuer.into(),
            subject: "repo:acme/widgets:ref:refs/heads/main".into(),
            repository: Some("acme/widgets".into()),
            workflow: None,
            created_at: t0(),
            expires_at: t0() + Duration::minutes(15),
            fingerprint: None,
            handle: None,
            revoke_requested: false,
            revoked_at: None,
        })
        .collect();
    (exchange, credentials)
}

fn activation(exchange: &ExchangeRow, credentials: &[CredentialRow], seen_kill_epoch: i64) -> Activate {
    let subject = KillSubject {
        agent: exchange.agent.clone().unwrap_or_default(),
        capability: exchange.capability.clone().unwrap_or_default(),
        issuer: exchange.issuer.clone().unwrap_or_default(),
        subject: exchange.subject.clone().unwrap_or_default(),
        repository: exchange.repository.clone(),
        workflow: exchange.workflow.clone(),
        claims: exchange.claims.as_object().cloned().unwrap_or_default(),
        credentials: credentials.iter().map(|c| c.id).collect(),
    };
    let mut e = event("exchange.allowed", t0());
    e.exchange_id = Some(exchange.id.to_string());
    Activate {
        exchange_id: exchange.id,
        now: t0(),
        seen_kill_epoch,
        subject,
        jti: Some(SpentJti {
            issuer: exchange.issuer.clone().unwrap_or_default(),
            jti: format!("jti-{}", exchange.id),
            capability: "pr-review".into(),
            keep_until: t0() + Duration::minutes(10),
        }),
        max_active: None,
        jobs: credentials
            .iter()
            .map(|c| NewJob {
                id: Uuid::new_v4(),
                kind: JobKind::RevokeAtTtl,
                credential_id: c.id,
                backend: c.backend,
                kill_id: None,
                run_at: c.expires_at,
            })
            .collect(),
        event: e,
    }
}

fn handle(n: u8) -> Handle {
    Handle { sealed: Some(vec![n; 40]), fingerprint: format!("fp{n}"), expires_at: t0() + Duration::minutes(14) }
}

fn kill_rule(selector: Selector, at: DateTime<Utc>) -> KillRule {
    KillRule {
        id: Uuid::new_v4(),
        selector,
        reason: "compromised runner".into(),
        created_at: at,
        created_by: "admin-key:security-oncall".into(),
        expires_at: None,
        lifted_at: None,
    }
}

fn issuer_selector(issuer: &str) -> Selector {
    Selector { issuer: Some(issuer.into()), ..Default::default() }
}

/// Reads every event, page by page, and checks the whole chain.
async fn verified_events(ledger: &Arc<dyn Ledger>) -> Vec<StoredEvent> {
    let mut all = Vec::new();
    loop {
        let after = all.last().map_or(0, |e: &StoredEvent| e.seq);
        let page = ledger.events(after, 1000).await.expect("events");
        if page.is_empty() {
            break;
        }
        all.extend(page);
    }
    verify_chain(GENESIS_HASH, 1, &all).expect("the chain verifies");
    all
}

fn raw(dir: &TempDir) -> Connection {
    Connection::open(db_path(dir)).expect("raw connection")
}

fn count(conn: &Connection, sql: &str) -> i64 {
    conn.query_row(sql, [], |r| r.get(0)).expect("count")
}

#[tokio::test]
async fn lifecycle_intent_handle_activate_transition() {
    let (_dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 2);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();

    assert_eq!(ledger.exchange(exchange.id).await.unwrap().as_ref(), Some(&exchange));
    assert_eq!(ledger.credentials_of_exchange(exchange.id).await.unwrap().len(), 2);
    assert_eq!(ledger.pending_credentials(t0() + Duration::seconds(1)).await.unwrap().len(), 2);
    assert!(ledger.pending_credentials(t0()).await.unwrap().is_empty(), "created_at < before, strictly");

    for (i, c) in creds.iter().enumerate() {
        ledger.record_handle(c.id, &handle(i as u8)).await.unwrap();
    }
    let stored = ledger.credential(creds[0].id).await.unwrap().unwrap();
    assert_eq!(stored.handle, Some(vec![0; 40]));
    assert_eq!(stored.fingerprint.as_deref(), Some("fp0"));
    assert_eq!(stored.expires_at, t0() + Duration::minutes(14));

    let act = activation(&exchange, &creds, 0);
    assert!(!ledger.jti_spent("github-actions", &act.jti.as_ref().unwrap().jti, "pr-review").await.unwrap());
    let jti = act.jti.clone().unwrap();
    assert_eq!(ledger.activate(act).await.unwrap(), Activation::Activated);
    assert!(ledger.jti_spent("github-actions", &jti.jti, "pr-review").await.unwrap());
    assert!(!ledger.jti_spent("github-actions", &jti.jti, "deploy").await.unwrap(), "spent per capability");

    let row = ledger.exchange(exchange.id).await.unwrap().unwrap();
    assert_eq!(row.state, ExchangeState::Allowed);
    for c in ledger.credentials_of_exchange(exchange.id).await.unwrap() {
        assert_eq!(c.state, CredentialState::Active);
        assert!(c.handle.is_some());
    }
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 2, "one TTL job per credential");
    // A second activation of the same exchange is a conflict, not a silent success.
    assert!(matches!(ledger.activate(activation(&exchange, &creds, 0)).await, Err(LedgerError::Conflict(_))));
    // A handle on an active row is refused.
    assert!(matches!(ledger.record_handle(creds[0].id, &handle(9)).await, Err(LedgerError::Conflict(_))));

    let at = t0() + Duration::minutes(3);
    let moved = ledger
        .transition_credential(
            creds[0].id,
            &[CredentialState::Active],
            CredentialState::Revoked,
            event("credential.revoked", at),
        )
        .await
        .unwrap();
    assert!(moved);
    let revoked = ledger.credential(creds[0].id).await.unwrap().unwrap();
    assert_eq!(revoked.state, CredentialState::Revoked);
    assert_eq!(revoked.revoked_at, Some(at));
    let again = ledger
        .transition_credential(
            creds[0].id,
            &[CredentialState::Active],
            CredentialState::Revoked,
            event("credential.revoked", at),
        )
        .await
        .unwrap();
    assert!(!again, "a revoked row does not move again");
    assert!(matches!(
        ledger
            .transition_credential(Uuid::new_v4(), &[CredentialState::Active], CredentialState::Revoked, event("x", at))
            .await,
        Err(LedgerError::NotFound)
    ));

    let events = verified_events(&ledger).await;
    let names: Vec<String> = events.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["exchange.intent", "exchange.allowed", "credential.revoked"], "an event only when moved");
    ledger.ping().await.unwrap();
}

#[tokio::test]
async fn refusal_and_abort() {
    let (_dir, ledger) = fresh().await;
    let (mut refused, _) = intent("github-actions", 0);
    refused.state = ExchangeState::Denied;
    refused.error = Some("access_denied".into());
    refused.reason = Some("no policy matched".into());
    refused.claims = serde_json::Value::Null;
    ledger.record_refusal(&refused, event("exchange.denied", t0())).await.unwrap();
    assert_eq!(ledger.exchange(refused.id).await.unwrap(), Some(refused.clone()));
    let (pending, _) = intent("github-actions", 0);
    assert!(matches!(ledger.record_refusal(&pending, event("x", t0())).await, Err(LedgerError::Conflict(_))));

    let (exchange, creds) = intent("github-actions", 3);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    ledger
        .abort(Abort {
            exchange_id: exchange.id,
            state: ExchangeState::Failed,
            error: "temporarily_unavailable".into(),
            reason: "aws: AssumeRole timed out".into(),
            unrevoked: vec![creds[1].id],
            event: event("exchange.failed", t0()),
        })
        .await
        .unwrap();
    let row = ledger.exchange(exchange.id).await.unwrap().unwrap();
    assert_eq!((row.state, row.error.as_deref()), (ExchangeState::Failed, Some("temporarily_unavailable")));
    for c in &creds {
        let stored = ledger.credential(c.id).await.unwrap().unwrap();
        let want = if c.id == creds[1].id { CredentialState::Pending } else { CredentialState::Failed };
        assert_eq!(stored.state, want);
    }
    // The reconciler still finds what could not be revoked.
    assert_eq!(ledger.pending_credentials(t0() + Duration::hours(1)).await.unwrap().len(), 1);
    assert_eq!(verified_events(&ledger).await.len(), 3);
}

#[tokio::test]
async fn a_kill_between_intent_and_activation_wins() {
    let (dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 2);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    ledger.record_handle(creds[0].id, &handle(1)).await.unwrap();
    let seen = ledger.kill_state(t0()).await.unwrap().epoch;

    let rule = kill_rule(issuer_selector("github-actions"), t0());
    let effect = ledger.create_kill(&rule, event("kill.created", t0())).await.unwrap();
    let mut marked = effect.pending_marked.clone();
    marked.sort();
    let mut want: Vec<Uuid> = creds.iter().map(|c| c.id).collect();
    want.sort();
    assert_eq!(marked, want);
    assert!(effect.jobs.is_empty());
    let state = ledger.kill_state(t0()).await.unwrap();
    assert_eq!(state.epoch, seen + 1);
    assert_eq!(state.rules, vec![rule.clone()]);

    let events_before = verified_events(&ledger).await.len();
    let act = activation(&exchange, &creds, seen);
    let jti = act.jti.clone().unwrap();
    assert_eq!(ledger.activate(act).await.unwrap(), Activation::Killed { rule_id: Some(rule.id) });

    // Nothing changed: no state, no spent jti, no job, no event.
    assert_eq!(ledger.exchange(exchange.id).await.unwrap().unwrap().state, ExchangeState::Pending);
    for c in ledger.credentials_of_exchange(exchange.id).await.unwrap() {
        assert_eq!(c.state, CredentialState::Pending);
        assert!(c.revoke_requested);
    }
    assert!(!ledger.jti_spent("github-actions", &jti.jti, "pr-review").await.unwrap());
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 0);
    assert_eq!(verified_events(&ledger).await.len(), events_before);
    assert_eq!(count(&raw(&dir), "SELECT COUNT(*) FROM spent_jti"), 0);
}

#[tokio::test]
async fn the_epoch_path_and_the_revoke_requested_path() {
    let (_dir, ledger) = fresh().await;
    // A rule created before the intent: no row to mark, only the epoch tells the activation.
    let rule = kill_rule(issuer_selector("gitlab"), t0());
    ledger.create_kill(&rule, event("kill.created", t0())).await.unwrap();
    let (exchange, creds) = intent("gitlab", 1);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    assert_eq!(
        ledger.activate(activation(&exchange, &creds, 0)).await.unwrap(),
        Activation::Killed { rule_id: Some(rule.id) },
        "a stale epoch makes the activation read the rules"
    );

    // A stale epoch whose new rules do not match lets the activation through.
    let (other, other_creds) = intent("github-actions", 1);
    ledger.record_intent(&other, &other_creds, event("exchange.intent", t0())).await.unwrap();
    assert_eq!(ledger.activate(activation(&other, &other_creds, 0)).await.unwrap(), Activation::Activated);

    // With the current epoch, a row marked by a kill is still caught.
    let (marked, marked_creds) = intent("github-actions", 2);
    ledger.record_intent(&marked, &marked_creds, event("exchange.intent", t0())).await.unwrap();
    let rule2 = kill_rule(Selector { credential: Some(marked_creds[1].id), ..Default::default() }, t0());
    let effect = ledger.create_kill(&rule2, event("kill.created", t0())).await.unwrap();
    assert_eq!(effect.pending_marked.len(), 2, "a credential selector names its whole exchange");
    let epoch = ledger.kill_state(t0()).await.unwrap().epoch;
    assert_eq!(epoch, 2);
    assert_eq!(
        ledger.activate(activation(&marked, &marked_creds, epoch)).await.unwrap(),
        Activation::Killed { rule_id: None }
    );

    // A lapsed rule is not in force.
    let mut lapsed = kill_rule(Selector { all: true, ..Default::default() }, t0() - Duration::hours(2));
    lapsed.expires_at = Some(t0() - Duration::hours(1));
    ledger.create_kill(&lapsed, event("kill.created", t0())).await.unwrap();
    let (late, late_creds) = intent("gitlab-other", 1);
    ledger.record_intent(&late, &late_creds, event("exchange.intent", t0())).await.unwrap();
    assert_eq!(ledger.activate(activation(&late, &late_creds, 0)).await.unwrap(), Activation::Activated);
    assert_eq!(ledger.kill_state(t0()).await.unwrap().rules.len(), 2);
    verified_events(&ledger).await;
}

#[tokio::test]
async fn a_kill_enqueues_one_revocation_per_active_credential() {
    let (_dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 2);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    assert_eq!(ledger.activate(activation(&exchange, &creds, 0)).await.unwrap(), Activation::Activated);
    let (spared, spared_creds) = intent("gitlab", 1);
    ledger.record_intent(&spared, &spared_creds, event("exchange.intent", t0())).await.unwrap();

    let at = t0() + Duration::minutes(1);
    let rule = kill_rule(issuer_selector("github-actions"), at);
    let effect = ledger.create_kill(&rule, event("kill.created", at)).await.unwrap();
    assert!(effect.pending_marked.is_empty());
    assert_eq!(effect.jobs.len(), 2);

    // One queue per backend: the GitHub credential's job, then the jwt one's.
    let lease = at + Duration::minutes(1);
    let mut jobs = ledger.claim_jobs(at, BackendKind::Github, 100, lease).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.credential_id).collect::<Vec<_>>(), [creds[0].id]);
    jobs.extend(ledger.claim_jobs(at, BackendKind::Jwt, 100, lease).await.unwrap());
    assert_eq!(jobs.len(), 2, "the TTL jobs are not due yet, the kill's are");
    assert!(jobs.iter().all(|j| j.kind == JobKind::Revoke && j.kill_id == Some(rule.id) && j.run_at == at));
    assert!(!ledger.credential(spared_creds[0].id).await.unwrap().unwrap().revoke_requested);
}

#[tokio::test]
async fn a_spent_jti_is_a_replay() {
    let (dir, ledger) = fresh().await;
    let (first, first_creds) = intent("github-actions", 1);
    ledger.record_intent(&first, &first_creds, event("exchange.intent", t0())).await.unwrap();
    let act = activation(&first, &first_creds, 0);
    let jti = act.jti.clone();
    assert_eq!(ledger.activate(act).await.unwrap(), Activation::Activated);

    let (second, second_creds) = intent("github-actions", 1);
    ledger.record_intent(&second, &second_creds, event("exchange.intent", t0())).await.unwrap();
    let mut replay = activation(&second, &second_creds, 0);
    replay.jti = jti;
    let events_before = verified_events(&ledger).await.len();
    assert_eq!(ledger.activate(replay).await.unwrap(), Activation::Replay);

    assert_eq!(ledger.credential(first_creds[0].id).await.unwrap().unwrap().state, CredentialState::Active);
    assert_eq!(ledger.exchange(second.id).await.unwrap().unwrap().state, ExchangeState::Pending);
    assert_eq!(ledger.credential(second_creds[0].id).await.unwrap().unwrap().state, CredentialState::Pending);
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 1, "the replay's TTL job was rolled back");
    assert_eq!(verified_events(&ledger).await.len(), events_before);

    // Spent tokens are pruned once they could no longer be presented.
    assert_eq!(ledger.prune(t0() + Duration::minutes(5)).await.unwrap(), 0);
    assert_eq!(ledger.prune(t0() + Duration::minutes(11)).await.unwrap(), 1);
    assert_eq!(count(&raw(&dir), "SELECT COUNT(*) FROM spent_jti"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_exchanges_keep_one_chain() {
    const TASKS: usize = 16;
    const PER_TASK: usize = 200;
    let (dir, ledger) = fresh().await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..TASKS {
        let ledger = ledger.clone();
        tasks.spawn(async move {
            for _ in 0..PER_TASK {
                let (exchange, creds) = intent("github-actions", 1);
                ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await?;
                ledger.record_handle(creds[0].id, &handle(7)).await?;
                let answer = ledger.activate(activation(&exchange, &creds, 0)).await?;
                assert_eq!(answer, Activation::Activated);
            }
            Ok::<(), LedgerError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("ledger");
    }
    let elapsed = started.elapsed();
    let n = TASKS * PER_TASK;
    println!(
        "sqlite ledger: {n} exchanges (intent + handle + activate) in {elapsed:.2?}: {:.0} exchanges/s, {:.0} writes/s",
        n as f64 / elapsed.as_secs_f64(),
        (3 * n) as f64 / elapsed.as_secs_f64()
    );

    let events = verified_events(&ledger).await;
    assert_eq!(events.len(), 2 * n);
    let conn = raw(&dir);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM exchanges WHERE state = 'allowed'"), n as i64);
    assert_eq!(
        count(&conn, "SELECT COUNT(*) FROM credentials WHERE state = 'active' AND handle IS NOT NULL"),
        n as i64
    );
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spent_jti"), n as i64);
    assert_eq!(ledger.job_queue_depth().await.unwrap(), n as u64);
}

/// Under a steady stream of commits the WAL starts over instead of growing: the checkpointer
/// copies it in the background and the writer catches up between batches.
#[test]
fn the_wal_starts_over_instead_of_growing_under_steady_writes() {
    use super::wal::{BACKGROUND_FRAMES, FORCE_FRAMES};
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    let pad = "x".repeat(16 * 1024);
    // 1,200 commits of ten 16 KiB events: about 48,000 WAL frames, half as many again as the
    // length at which the writer catches up whatever the checkpointer has copied.
    for round in 0..1_200 {
        let ops = (0..10).map(|i| {
            let mut e = event("bulk", t0());
            e.detail = Some(json!({ "n": round * 10 + i, "pad": pad }));
            Op::AppendEvent(EventParams::new(&e))
        });
        let (mut batch, rxs): (Vec<_>, Vec<_>) = ops.map(command).unzip();
        writer.run_batch(&mut batch, &mut Vec::new(), || None);
        assert!(answers(rxs).iter().all(Result::is_ok));
        writer.catch_up();
    }

    // The longest the WAL may get, however far behind the checkpointer is: the forced catch-up's
    // length plus a few commits (about 40 frames each here). A checkpointer that keeps up keeps it
    // near 15,000 frames.
    let frame = 4096 + 24;
    let bound = u64::from(FORCE_FRAMES + BACKGROUND_FRAMES) * frame + 32;
    let wal = std::fs::metadata(dir.path().join("latchkey.db-wal")).unwrap().len();
    assert!(wal <= bound, "the WAL grew to {wal} bytes (bound {bound})");

    let conn = raw(&dir);
    let events = read::events(&conn, 0, 20_000).unwrap();
    assert_eq!(events.len(), 12_000);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
}

/// The writer catches up (and every caller waits for it) once the WAL is long and the
/// checkpointer has copied nearly all of it, or once it is very long whatever is copied; never
/// while the checkpointer is far behind (it would copy and sync thousands of pages itself) or
/// while the WAL is short.
#[test]
fn the_writer_catches_up_when_little_is_left_to_copy() {
    use super::wal::{CATCH_UP_FRAMES, CHEAP_FRAMES, FORCE_FRAMES, catch_up_due};
    assert!(!catch_up_due(CATCH_UP_FRAMES - 1, CATCH_UP_FRAMES - 1), "a short WAL");
    assert!(catch_up_due(CATCH_UP_FRAMES, CATCH_UP_FRAMES - CHEAP_FRAMES), "a long WAL nearly all copied");
    assert!(catch_up_due(CATCH_UP_FRAMES + 1_000, CATCH_UP_FRAMES + 1_000), "a long WAL all copied");
    assert!(!catch_up_due(CATCH_UP_FRAMES, CATCH_UP_FRAMES - CHEAP_FRAMES - 1), "the checkpointer is behind");
    assert!(!catch_up_due(FORCE_FRAMES - 1, 0), "the checkpointer is far behind");
    assert!(catch_up_due(FORCE_FRAMES, 0), "a WAL too long to wait for the checkpointer");
    // A count left over from before the WAL started over is larger than its length.
    assert!(!catch_up_due(CATCH_UP_FRAMES - 1, FORCE_FRAMES));
}

/// Commands that arrive while a batch runs join its transaction, and are answered with it; one
/// that fails still fails alone, and what had not joined by then waits for the next batch.
#[test]
fn commands_arriving_during_a_batch_join_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    let (mut batch, first) = [append("one")].into_iter().map(command).unzip::<_, _, Vec<_>, Vec<_>>();
    let (late, late_rxs): (Vec<_>, Vec<_>) =
        [append("two"), Op::handle(Uuid::new_v4(), &handle(1)), append("three")].into_iter().map(command).unzip();
    let mut late = late.into_iter();
    writer.run_batch(&mut batch, &mut Vec::new(), || late.next());
    assert!(batch.is_empty());
    assert_eq!(late.len(), 1, "the command after the failing one has not joined");
    writer.run_batch(&mut batch, &mut Vec::new(), || late.next());

    let got = answers(first.into_iter().chain(late_rxs).collect());
    assert!(matches!(got[0], Ok(Reply::Done)));
    assert!(matches!(got[1], Ok(Reply::Done)));
    assert!(matches!(got[2], Err(LedgerError::NotFound)), "{:?}", got[2]);
    assert!(matches!(got[3], Ok(Reply::Done)));
    let events = read::events(&raw(&dir), 0, 10).unwrap();
    let names: Vec<String> = events.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["one", "two", "three"]);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
}

/// A transaction left open (as when a ROLLBACK fails on an I/O error) is rolled back before the
/// next batch, instead of making every later batch fail to begin; nothing of it is kept.
#[test]
fn a_transaction_left_open_does_not_wedge_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    writer.conn_for_tests().execute_batch("BEGIN; DELETE FROM kill_epoch;").unwrap();

    let (mut batch, rxs): (Vec<_>, Vec<_>) = [append("after")].into_iter().map(command).unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    assert!(matches!(answers(rxs)[0], Ok(Reply::Done)));

    let conn = raw(&dir);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM kill_epoch"), 1, "the stale transaction was rolled back");
    let events = read::events(&conn, 0, 10).unwrap();
    assert_eq!(events.len(), 1);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
}

/// A writer on its own, to run exact batches.
fn bare_writer(dir: &TempDir) -> Writer {
    let path = db_path(dir);
    let mut conn = Connection::open(&path).unwrap();
    schema::migrate(&mut conn, 0).unwrap();
    conn.pragma_update(None, "foreign_keys", true).unwrap();
    let _: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0)).unwrap();
    let head = chain_head(&conn).unwrap();
    Writer::new(conn, head, lock(&path, "test").unwrap(), open_checkpoints(&path).unwrap()).unwrap()
}

fn command(op: Op) -> (Command, oneshot::Receiver<Result<Reply, LedgerError>>) {
    let (reply, rx) = oneshot::channel();
    (Command { op, reply }, rx)
}

fn append(name: &str) -> Op {
    Op::AppendEvent(EventParams::new(&event(name, t0())))
}

fn answers(rxs: Vec<oneshot::Receiver<Result<Reply, LedgerError>>>) -> Vec<Result<Reply, LedgerError>> {
    rxs.into_iter().map(|mut rx| rx.try_recv().expect("answered")).collect()
}

#[test]
fn a_failing_command_rolls_back_alone() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    let (exchange, creds) = intent("github-actions", 1);
    let ops = vec![
        append("one"),
        Op::Intent {
            exchange: ExchangeParams::new(&exchange),
            credentials: creds.iter().map(CredentialParams::new).collect(),
            event: EventParams::new(&event("exchange.intent", t0())),
        },
        // Three failures: before any change, at the first insert, and after the activation has
        // already changed rows (the unknown job's credential fails last): all undone alone.
        Op::handle(Uuid::new_v4(), &handle(1)),
        Op::Intent {
            exchange: ExchangeParams::new(&exchange),
            credentials: Vec::new(),
            event: EventParams::new(&event("duplicate", t0())),
        },
        Op::activate({
            let mut a = activation(&exchange, &creds, 0);
            a.jobs.push(NewJob {
                id: Uuid::new_v4(),
                kind: JobKind::Revoke,
                credential_id: Uuid::new_v4(),
                backend: BackendKind::Jwt,
                kill_id: None,
                run_at: t0(),
            });
            a
        }),
        Op::handle(creds[0].id, &handle(2)),
        append("two"),
    ];
    let (mut batch, rxs): (Vec<_>, Vec<_>) = ops.into_iter().map(command).unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    let got = answers(rxs);
    assert!(matches!(got[0], Ok(Reply::Done)));
    assert!(matches!(got[1], Ok(Reply::Done)));
    assert!(matches!(got[2], Err(LedgerError::NotFound)));
    assert!(matches!(got[3], Err(LedgerError::Conflict(_))), "duplicate exchange id: {:?}", got[3]);
    assert!(matches!(got[4], Err(LedgerError::Conflict(_))), "a job for an unknown credential: {:?}", got[4]);
    assert!(matches!(got[5], Ok(Reply::Done)));
    assert!(matches!(got[6], Ok(Reply::Done)));

    let conn = raw(&dir);
    let events = read::events(&conn, 0, 100).unwrap();
    let names: Vec<String> = events.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["one", "exchange.intent", "two"]);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM exchanges WHERE state = 'pending'"), 1, "the activation rolled back");
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spent_jti"), 0);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM jobs"), 0);
}

#[test]
fn an_activation_undone_after_its_first_write_leaves_the_rest_of_its_batch_committed() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    let (first, first_creds) = intent("github-actions", 1);
    let (second, second_creds) = intent("github-actions", 1);
    let intent_of = |exchange: &ExchangeRow, creds: &[CredentialRow]| Op::Intent {
        exchange: ExchangeParams::new(exchange),
        credentials: creds.iter().map(CredentialParams::new).collect(),
        event: EventParams::new(&event("exchange.intent", t0())),
    };
    // The second activation spends the `jti` the first one spent: it is refused only after it
    // has already moved its exchange to `allowed`, so its undo must take that write back.
    let mut replayed = activation(&second, &second_creds, 0);
    replayed.jti = activation(&first, &first_creds, 0).jti;
    let ops = vec![
        intent_of(&first, &first_creds),
        intent_of(&second, &second_creds),
        Op::activate(activation(&first, &first_creds, 0)),
        Op::activate(replayed),
        append("after"),
    ];
    let (mut batch, rxs): (Vec<_>, Vec<_>) = ops.into_iter().map(command).unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    let got = answers(rxs);
    assert!(matches!(got[2], Ok(Reply::Activation(Activation::Activated))), "{:?}", got[2]);
    assert!(matches!(got[3], Ok(Reply::Activation(Activation::Replay))), "{:?}", got[3]);
    assert!(got.iter().all(Result::is_ok), "{got:?}");

    let conn = raw(&dir);
    let state = |id: Uuid| {
        conn.query_row("SELECT state FROM exchanges WHERE id = ?1", [id.to_string()], |r| r.get::<_, String>(0))
            .unwrap()
    };
    assert_eq!((state(first.id), state(second.id)), ("allowed".to_owned(), "pending".to_owned()));
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM spent_jti"), 1);
    assert_eq!(count(&conn, "SELECT COUNT(*) FROM jobs"), 1, "only the first activation's job");
    let events = read::events(&conn, 0, 100).unwrap();
    let names: Vec<String> = events.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["exchange.intent", "exchange.intent", "exchange.allowed", "after"]);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
    assert_eq!(writer.head_for_tests().seq, 4, "the chain head counts only what was committed");
}

#[test]
fn a_failed_commit_fails_the_whole_batch_and_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let mut writer = bare_writer(&dir);
    let (exchange, creds) = intent("github-actions", 1);
    let (mut batch, rxs): (Vec<_>, Vec<_>) = vec![
        Op::Intent {
            exchange: ExchangeParams::new(&exchange),
            credentials: creds.iter().map(CredentialParams::new).collect(),
            event: EventParams::new(&event("exchange.intent", t0())),
        },
        append("lost"),
    ]
    .into_iter()
    .map(command)
    .unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    assert!(answers(rxs).iter().all(Result::is_ok));
    let head = writer.head_for_tests();

    // Deferred foreign keys are only checked at COMMIT: a job for an unknown kill rule makes the
    // COMMIT itself fail.
    writer.conn_for_tests().pragma_update(None, "defer_foreign_keys", true).unwrap();
    let job = NewJob {
        id: Uuid::new_v4(),
        kind: JobKind::Revoke,
        credential_id: creds[0].id,
        backend: creds[0].backend,
        kill_id: Some(Uuid::new_v4()),
        run_at: t0(),
    };
    let (mut batch, rxs): (Vec<_>, Vec<_>) =
        vec![append("doomed"), Op::EnqueueJobs(vec![JobParams::new(&job)]), append("doomed too")]
            .into_iter()
            .map(command)
            .unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    let got = answers(rxs);
    assert!(got.iter().all(Result::is_err), "every command of a failed commit fails: {got:?}");
    assert_eq!(writer.head_for_tests(), head, "the chain head is back where the batch started");

    let (mut batch, rxs): (Vec<_>, Vec<_>) = vec![append("after")].into_iter().map(command).unzip();
    writer.run_batch(&mut batch, &mut Vec::new(), || None);
    assert!(answers(rxs).iter().all(Result::is_ok));
    let events = read::events(&raw(&dir), 0, 100).unwrap();
    let names: Vec<String> = events.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["exchange.intent", "lost", "after"]);
    verify_chain(GENESIS_HASH, 1, &events).unwrap();
}

#[tokio::test]
async fn one_process_per_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let ledger = open(&path, true).await.unwrap();
    ledger.append_event(event("first", t0())).await.unwrap();
    let err = open(&path, true).await.unwrap_err();
    assert!(
        matches!(&err, LedgerError::Unavailable(m) if m.contains("is in use by another latchkey process")),
        "{err}"
    );
    assert!(open(&path, false).await.is_err());

    // Once the first is gone, the file opens again and the chain continues where it stopped.
    drop(ledger);
    let ledger = open(&path, false).await.unwrap();
    ledger.append_event(event("second", t0())).await.unwrap();
    let events = verified_events(&ledger).await;
    assert_eq!(events.len(), 2);
}

#[tokio::test]
async fn schema_versions_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let err = open(&path, false).await.unwrap_err();
    assert!(matches!(&err, LedgerError::Schema(m) if m.contains("latchkey migrate")), "{err}");
    assert!(!path.exists(), "a refused open creates nothing");

    std::fs::write(&path, b"").unwrap();
    let err = open(&path, false).await.unwrap_err();
    assert!(matches!(&err, LedgerError::Schema(m) if m.contains("latchkey migrate")), "{err}");

    drop(open(&path, true).await.unwrap());
    drop(open(&path, false).await.unwrap());
    {
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        conn.pragma_update(None, "user_version", schema::latest() + 1).unwrap();
    }
    for migrate in [false, true] {
        let err = open(&path, migrate).await.unwrap_err();
        assert!(matches!(&err, LedgerError::Schema(m) if m.contains("newer latchkey")), "{err}");
    }
}

#[tokio::test]
async fn upgrading_to_per_backend_queues_keeps_every_waiting_job() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(&dir);
    let (exchange, creds) = intent("github-actions", 2);
    {
        let ledger = open(&path, true).await.unwrap();
        ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
        assert_eq!(ledger.activate(activation(&exchange, &creds, 0)).await.unwrap(), Activation::Activated);
    }
    {
        // Back to schema version 5, as an older latchkey left it, TTL jobs waiting.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DROP INDEX jobs_due; ALTER TABLE jobs DROP COLUMN backend; \
             CREATE INDEX jobs_due ON jobs (run_at) WHERE done_at IS NULL;",
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 5).unwrap();
    }
    let ledger = open(&path, true).await.unwrap();
    let at = t0() + Duration::hours(1);
    let lease = at + Duration::minutes(1);
    let github = ledger.claim_jobs(at, BackendKind::Github, 10, lease).await.unwrap();
    let jwt = ledger.claim_jobs(at, BackendKind::Jwt, 10, lease).await.unwrap();
    assert_eq!(github.iter().map(|j| j.credential_id).collect::<Vec<_>>(), [creds[0].id]);
    assert_eq!(jwt.iter().map(|j| j.credential_id).collect::<Vec<_>>(), [creds[1].id]);
}

#[tokio::test]
async fn jobs_are_claimed_leased_retried_and_finished() {
    let (_dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 2);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    let mut act = activation(&exchange, &creds, 0);
    act.jobs.clear();
    assert_eq!(ledger.activate(act).await.unwrap(), Activation::Activated);

    let due = NewJob {
        id: Uuid::new_v4(),
        kind: JobKind::Revoke,
        credential_id: creds[0].id,
        backend: creds[0].backend,
        kill_id: None,
        run_at: t0(),
    };
    let later = NewJob {
        id: Uuid::new_v4(),
        credential_id: creds[1].id,
        backend: creds[1].backend,
        run_at: t0() + Duration::hours(1),
        ..due.clone()
    };
    ledger.enqueue_jobs(&[due.clone(), later.clone()]).await.unwrap();
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 2);

    let now = t0() + Duration::seconds(1);
    let lease = now + Duration::seconds(30);
    let claimed = ledger.claim_jobs(now, BackendKind::Github, 10, lease).await.unwrap();
    assert_eq!(claimed.iter().map(|j| j.id).collect::<Vec<_>>(), [due.id]);
    assert!(ledger.claim_jobs(now, BackendKind::Jwt, 10, lease).await.unwrap().is_empty(), "another backend's queue");
    assert!(ledger.claim_jobs(now, BackendKind::Github, 10, lease).await.unwrap().is_empty(), "claimed");
    assert!(
        ledger.claim_jobs(lease - Duration::milliseconds(1), BackendKind::Github, 10, lease).await.unwrap().is_empty(),
        "leased"
    );
    let reclaimed = ledger.claim_jobs(lease, BackendKind::Github, 10, lease + Duration::seconds(30)).await.unwrap();
    assert_eq!(reclaimed.len(), 1, "a lapsed lease frees the job for another worker");

    let retry_at = lease + Duration::minutes(1);
    ledger
        .finish_job(&reclaimed[0], JobOutcome::Retry { run_at: retry_at, error: "github: 502".into() })
        .await
        .unwrap();
    assert!(
        ledger.claim_jobs(retry_at - Duration::seconds(1), BackendKind::Github, 10, retry_at).await.unwrap().is_empty()
    );
    let retried = ledger.claim_jobs(retry_at, BackendKind::Github, 10, retry_at + Duration::seconds(30)).await.unwrap();
    assert_eq!(retried.len(), 1);
    assert_eq!((retried[0].attempts, retried[0].last_error.as_deref()), (1, Some("github: 502")));

    let done_at = retry_at + Duration::seconds(2);
    ledger
        .finish_job(
            &retried[0],
            JobOutcome::Done { state: CredentialState::Revoked, event: event("credential.revoked", done_at) },
        )
        .await
        .unwrap();
    let c = ledger.credential(creds[0].id).await.unwrap().unwrap();
    assert_eq!((c.state, c.revoked_at), (CredentialState::Revoked, Some(done_at)));
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 1);
    assert!(matches!(
        ledger
            .finish_job(&retried[0], JobOutcome::Failed { error: "x".into(), event: event("job.failed", done_at) })
            .await,
        Err(LedgerError::Conflict(_))
    ));
    assert!(
        ledger
            .claim_jobs(done_at + Duration::days(1), BackendKind::Jwt, 10, done_at + Duration::days(2))
            .await
            .unwrap()
            .len()
            == 1
    );

    let failed = ledger
        .claim_jobs(done_at + Duration::days(3), BackendKind::Jwt, 10, done_at + Duration::days(4))
        .await
        .unwrap();
    let failed_at = done_at + Duration::days(3);
    ledger
        .finish_job(&failed[0], JobOutcome::Failed { error: "gave up".into(), event: event("job.failed", failed_at) })
        .await
        .unwrap();
    assert_eq!(ledger.job_queue_depth().await.unwrap(), 0);
    assert_eq!(ledger.credential(creds[1].id).await.unwrap().unwrap().state, CredentialState::Active, "left as is");
    let unknown = Job { id: Uuid::new_v4(), ..failed[0].clone() };
    assert!(matches!(
        ledger.finish_job(&unknown, JobOutcome::Retry { run_at: t0(), error: String::new() }).await,
        Err(LedgerError::NotFound)
    ));
    let names: Vec<String> = verified_events(&ledger).await.iter().map(|e| e.event().unwrap().event).collect();
    assert_eq!(names, ["exchange.intent", "exchange.allowed", "credential.revoked", "job.failed"]);
}

#[tokio::test]
async fn signing_keys_round_trip() {
    let (_dir, ledger) = fresh().await;
    let key = StoredKey {
        id: "k1".into(),
        algorithm: "ES256".into(),
        sealed_private: vec![1, 2, 3],
        public_jwk: json!({"kty": "EC", "crv": "P-256", "kid": "k1"}),
        created_at: t0(),
        signs_from: Some(t0() + chrono::Duration::seconds(1)),
        retired_at: None,
    };
    ledger.insert_signing_key(&key, event("signing_key.created", t0())).await.unwrap();
    let keys = ledger.signing_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        (keys[0].id.as_str(), &keys[0].sealed_private, &keys[0].public_jwk),
        ("k1", &key.sealed_private, &key.public_jwk)
    );
    assert_eq!((keys[0].signs_from, keys[0].retired_at), (key.signs_from, None));
    assert!(matches!(ledger.insert_signing_key(&key, event("x", t0())).await, Err(LedgerError::Conflict(_))));
    assert_eq!(verified_events(&ledger).await.len(), 1);
}

#[tokio::test]
async fn an_edited_audit_row_is_caught() {
    let (dir, ledger) = fresh().await;
    for i in 0..5 {
        let mut e = event("admin.call", t0());
        e.actor = Some(format!("admin-key:key{i}"));
        ledger.append_event(e).await.unwrap();
    }
    verified_events(&ledger).await;
    raw(&dir).execute("UPDATE audit_events SET body = replace(body, 'key2', 'key9') WHERE seq = 3", []).unwrap();
    let events = ledger.events(0, 100).await.unwrap();
    assert_eq!(verify_chain(GENESIS_HASH, 1, &events), Err(ChainError::BadHash { seq: 3 }));
}

#[tokio::test]
async fn damaged_rows_are_corrupt_not_a_panic() {
    let (dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 1);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    let conn = raw(&dir);
    conn.execute("UPDATE credentials SET expires_at = 'yesterday'", []).unwrap();
    conn.execute("UPDATE exchanges SET claims = '{not json'", []).unwrap();
    assert!(matches!(ledger.credential(creds[0].id).await, Err(LedgerError::Corrupt(_))));
    assert!(matches!(ledger.exchange(exchange.id).await, Err(LedgerError::Corrupt(_))));
    // A kill is not blocked by a row it cannot read: unreadable claims err towards revocation.
    let rule =
        kill_rule(Selector { claims: [("run_id".to_owned(), "42".to_owned())].into(), ..Default::default() }, t0());
    let effect = ledger.create_kill(&rule, event("kill.created", t0())).await.unwrap();
    assert_eq!(effect.pending_marked, vec![creds[0].id]);
}

#[test]
fn timestamps_are_fixed_width_and_sort_as_text() {
    let a = codec::ts(t0());
    let b = codec::ts(t0() + Duration::milliseconds(5));
    assert_eq!(a, "2025-03-01T12:00:00.000Z");
    assert_eq!(a.len(), b.len());
    assert!(a < b);
    assert_eq!(crate::ledger::rows::parse_time(&a), Some(t0()));
}

#[tokio::test]
async fn a_release_revokes_active_and_marks_pending_once_then_writes_nothing() {
    let (dir, ledger) = fresh().await;
    // One exchange still pending (minting under way), one active.
    let (pending_x, pending_creds) = intent("github-actions", 1);
    ledger.record_intent(&pending_x, &pending_creds, event("exchange.intent", t0())).await.unwrap();
    let (active_x, active_creds) = intent("github-actions", 2);
    ledger.record_intent(&active_x, &active_creds, event("exchange.intent", t0())).await.unwrap();
    for (i, c) in active_creds.iter().enumerate() {
        ledger.record_handle(c.id, &handle(i as u8)).await.unwrap();
    }
    assert_eq!(ledger.activate(activation(&active_x, &active_creds, 0)).await.unwrap(), Activation::Activated);

    let release = |creds: &[CredentialRow]| {
        let revokes = creds
            .iter()
            .map(|c| (NewJob::revoke(c, t0()), event("credential.revoke_requested", t0())))
            .collect::<Vec<_>>();
        (revokes, event("exchange.released", t0()))
    };
    let events = |dir: &TempDir| count(&raw(dir), "SELECT count(*) FROM audit_events");

    let (revokes, e) = release(&active_creds);
    assert_eq!(ledger.release_exchange(revokes, e).await.unwrap(), [RevokeRequest::Queued, RevokeRequest::Queued]);
    let jobs = "SELECT count(*) FROM jobs WHERE kind = 'revoke'";
    assert_eq!(count(&raw(&dir), jobs), 2);
    let after_first = events(&dir);
    let (revokes, e) = release(&active_creds);
    assert_eq!(
        ledger.release_exchange(revokes, e).await.unwrap(),
        [RevokeRequest::AlreadyQueued, RevokeRequest::AlreadyQueued]
    );
    assert_eq!(count(&raw(&dir), jobs), 2, "no second job");
    assert_eq!(events(&dir), after_first, "a repeated release writes nothing");

    let (revokes, e) = release(&pending_creds);
    assert_eq!(ledger.release_exchange(revokes, e).await.unwrap(), [RevokeRequest::Marked]);
    assert!(ledger.credential(pending_creds[0].id).await.unwrap().unwrap().revoke_requested);
    let after_mark = events(&dir);
    let (revokes, e) = release(&pending_creds);
    assert_eq!(ledger.release_exchange(revokes, e).await.unwrap(), [RevokeRequest::Marked]);
    assert_eq!(events(&dir), after_mark, "marking again writes nothing");
    assert_eq!(verified_events(&ledger).await.iter().filter(|e| e.body.contains("exchange.released")).count(), 2);
}

/// A file of schema version 5 (before each backend had its own job queue) upgraded by
/// `latchkey migrate`: the jobs it already held are given their credential's backend, so each
/// backend's worker still finds its own and no other.
#[tokio::test]
async fn an_upgrade_gives_queued_jobs_their_credentials_backend() {
    let dir = tempfile::tempdir().unwrap();
    let now = Utc::now();
    let mut jobs = Vec::new();
    {
        let conn = Connection::open(db_path(&dir)).unwrap();
        for (_, sql) in &schema::MIGRATIONS[..5] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 5).unwrap();
        let exchange = Uuid::now_v7().to_string();
        conn.execute(
            "INSERT INTO exchanges (id, request_id, created_at, state, claims, trace) \
             VALUES (?1, 'req-old', ?2, 'allowed', '{}', '[]')",
            rusqlite::params![exchange, ts(now)],
        )
        .unwrap();
        for backend in ["vault", "github", "aws"] {
            let credential = Uuid::now_v7().to_string();
            conn.execute(
                "INSERT INTO credentials (id, exchange_id, name, backend, state, agent, capability, issuer, subject, \
                 created_at, expires_at) VALUES (?1, ?2, ?3, ?3, 'active', 'a', 'c', 'i', 's', ?4, ?5)",
                rusqlite::params![credential, exchange, backend, ts(now), ts(now + Duration::minutes(10))],
            )
            .unwrap();
            let job = Uuid::now_v7();
            conn.execute(
                "INSERT INTO jobs (id, kind, credential_id, run_at) VALUES (?1, 'revoke', ?2, ?3)",
                rusqlite::params![job.to_string(), credential, ts(now - Duration::seconds(1))],
            )
            .unwrap();
            jobs.push(job);
        }
    }

    let ledger = open(&db_path(&dir), true).await.unwrap();
    let lease = now + Duration::minutes(2);
    for (backend, expected) in [
        (BackendKind::Jwt, vec![]),
        (BackendKind::Vault, vec![jobs[0]]),
        (BackendKind::Github, vec![jobs[1]]),
        (BackendKind::Aws, vec![jobs[2]]),
    ] {
        let claimed: Vec<Uuid> =
            ledger.claim_jobs(now, backend, 10, lease).await.unwrap().into_iter().map(|j| j.id).collect();
        assert_eq!(claimed, expected, "{backend:?}");
    }
    assert_eq!(count(&raw(&dir), "SELECT COUNT(*) FROM jobs WHERE backend = ''"), 0);
}

/// Each index on the tables an exchange writes costs every exchange a page; the ones here are
/// the ones a query reads (migration 0007 says which). An index added to these tables must come
/// with the query that reads it, and this list with it.
#[tokio::test]
async fn the_tables_an_exchange_writes_carry_only_the_indexes_queries_read() {
    let (dir, _ledger) = fresh().await;
    let conn = Connection::open(db_path(&dir)).unwrap();
    let mut stmt = conn
        .prepare(
            "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' AND tbl_name IN \
             ('exchanges', 'credentials', 'jobs', 'spent_jti', 'audit_events') ORDER BY tbl_name, name",
        )
        .unwrap();
    let indexes: Vec<String> = stmt
        .query_map([], |r| Ok(format!("{}.{}", r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        indexes,
        [
            "credentials.credentials_created_at",
            "credentials.credentials_exchange",
            "credentials.credentials_repository",
            "credentials.credentials_revoke_requested_by",
            "credentials.credentials_sealed",
            "credentials.credentials_state",
            "credentials.sqlite_autoindex_credentials_1",
            "exchanges.exchanges_created_at",
            "exchanges.sqlite_autoindex_exchanges_1",
            "jobs.jobs_credential",
            "jobs.jobs_due",
            "jobs.sqlite_autoindex_jobs_1",
            "spent_jti.spent_jti_keep_until",
            "spent_jti.sqlite_autoindex_spent_jti_1",
        ]
    );
}

fn plan(conn: &Connection, (sql, values): (String, Vec<rusqlite::types::Value>)) -> String {
    let mut stmt = conn.prepare(&format!("EXPLAIN QUERY PLAN {sql}")).unwrap();
    let rows = stmt.query_map(rusqlite::params_from_iter(values), |r| r.get::<_, String>(3)).unwrap();
    rows.map(Result::unwrap).collect::<Vec<_>>().join("; ")
}

/// A later page, or a time window, of a large ledger reads the rows it lists, not every row
/// newer than them: the cursor and the time bounds are a range on the `created_at` index.
#[tokio::test]
async fn listings_seek_to_their_cursor_and_time_window() {
    let (dir, _ledger) = fresh().await;
    let conn = Connection::open(db_path(&dir)).unwrap();
    let cursor = Some((t0(), Uuid::now_v7()));
    let credentials = CredentialQuery {
        before: cursor,
        agent: Some("a".into()),
        state: Some(crate::ledger::StateFilter::Live),
        now: Some(t0()),
        limit: 50,
        ..Default::default()
    };
    let window =
        ExchangeQuery { since: Some(t0()), until: Some(t0() + Duration::hours(1)), limit: 50, ..Default::default() };
    let paged = ExchangeQuery { before: cursor, repository: Some("o/r".into()), limit: 50, ..Default::default() };
    for (what, plan) in [
        ("credentials after a cursor", plan(&conn, read::credentials_query(&credentials))),
        ("exchanges in a window", plan(&conn, read::exchanges_query(&window))),
        ("exchanges after a cursor", plan(&conn, read::exchanges_query(&paged))),
    ] {
        // `credentials_state (state=? AND created_at<?)` for live credentials, `*_created_at`
        // otherwise: a seek either way.
        assert!(plan.starts_with("SEARCH") && plan.contains("created_at<"), "{what}: {plan}");
        assert!(!plan.contains("SCAN"), "{what}: {plan}");
    }
    // With no bound at all, the newest rows come straight off the index (rows of one
    // `created_at` sorted by id among themselves), not from a sort of the whole table.
    let all = plan(&conn, read::exchanges_query(&ExchangeQuery { limit: 50, ..Default::default() }));
    assert!(all.contains("exchanges_created_at") && !all.contains("FOR ORDER BY"), "{all}");
}

/// Listings never carry a sealed revocation handle, whatever their filters.
#[tokio::test]
async fn listings_of_credentials_never_carry_their_handles() {
    let (_dir, ledger) = fresh().await;
    let (exchange, creds) = intent("github-actions", 2);
    ledger.record_intent(&exchange, &creds, event("exchange.intent", t0())).await.unwrap();
    for (i, c) in creds.iter().enumerate() {
        ledger.record_handle(c.id, &handle(i as u8)).await.unwrap();
    }
    assert!(ledger.credential(creds[0].id).await.unwrap().unwrap().handle.is_some(), "stored sealed");
    for query in [
        CredentialQuery { limit: 10, ..Default::default() },
        CredentialQuery { exchange: Some(exchange.id), limit: 10, ..Default::default() },
        CredentialQuery { agent: Some(creds[0].agent.clone()), since: Some(t0()), limit: 10, ..Default::default() },
    ] {
        let rows = ledger.list_credentials(query).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert!(rows.iter().all(|r| r.handle.is_none()), "a listing carried a handle");
    }
}
