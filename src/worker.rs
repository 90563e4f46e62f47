//! Background work: the durable job worker, the reconciler, the kill-rule refresher and the
//! policy reloader. Each is one function that does one pass, and a loop that calls it, so tests
//! can drive a pass directly with a fixed clock.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use chrono::{DateTime, Utc};
use serde_json::json;
use tokio::task::JoinSet;

use crate::app::{AdminKeys, AdminOidc, App, AppState, KillSnapshot};
use crate::audit::AuditEvent;
use crate::backend::{BackendError, Upkeep};
use crate::config::Config;
use crate::kill::KillRule;
use crate::ledger::{CredentialState, Job, JobKind, JobOutcome, KillPage, LedgerError};
use crate::metrics::JobLabels;
use crate::policy::{BackendKind, PolicySet};

/// A job that keeps failing is retried with exponential back-off up to this many times.
const MAX_ATTEMPTS: u32 = 20;
/// How long a claimed job stays hidden from other workers.
const JOB_LEASE: Duration = Duration::from_secs(120);
/// How often the kill rules are re-read when nothing announced a change.
const KILL_POLL: Duration = Duration::from_millis(250);
/// Pending rows older than this were left by a crash, not by an exchange in flight.
const RECONCILE_AFTER: Duration = Duration::from_secs(120);

/// Starts every background loop. They run until the runtime shuts down.
pub fn spawn_all(app: &AppState) {
    for backend in app.backends.values() {
        backend.spawn_maintenance();
    }
    let a = app.clone();
    tokio::spawn(async move {
        // Polling is the fallback; a store other replicas share also wakes this loop when one
        // of them changes the rules (or when it may have missed such a change).
        let changes = a.ledger.kill_changes();
        let mut tick = tokio::time::interval(KILL_POLL);
        loop {
            tick_or_change(&mut tick, changes.as_deref()).await;
            if let Err(e) = refresh_kills(&a).await {
                tracing::warn!(error = %e, "could not refresh kill rules");
            }
        }
    });
    let a = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            // A kill or a revocation request wakes the worker at once; the tick picks up jobs
            // that became due (TTL ends, retries) and those other replicas enqueued.
            tokio::select! {
                _ = tick.tick() => {}
                _ = a.jobs_wake.notified() => {}
            }
            match run_jobs(&a).await {
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "job worker could not reach the ledger"),
            }
        }
    });
    let a = app.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if let Err(e) = reconcile(&a).await {
                tracing::warn!(error = %e, "reconciler could not reach the ledger");
            }
            // A fallback for lapses: `refresh_kills` records those of the rules it holds.
            if let Err(e) = record_lapses(&a).await {
                tracing::warn!(error = %e, "could not record lapsed kill rules");
            }
            if let Err(e) = a.ledger.prune(a.clock.now()).await {
                tracing::warn!(error = %e, "could not prune spent token ids");
            }
            if let Err(e) = maintain_backends(&a).await {
                tracing::warn!(error = %e, "backend upkeep could not read the kill rules");
            }
            if let Err(e) = crate::keys::reseal(&a).await {
                tracing::warn!(error = %e, "the re-seal pass could not reach the ledger");
            }
        }
    });
    tokio::spawn(follow_signing_keys(app.clone()));
    // The baseline is taken now, not when the task first runs: a change made in between must
    // count as a change.
    let baseline = dir_signature(&app.config.resolve(&app.config.policies.dir));
    let a = app.clone();
    tokio::spawn(async move { watch_policies(a, baseline).await });
}

/// Keeps the `jwt` signing keys current: re-read every [`KEY_REFRESH`], and at once when another
/// replica announces that it created or retired one, so that a retired key stops signing here
/// within moments of the retirement, not at the next refresh.
///
/// [`KEY_REFRESH`]: crate::backend::jwt::KEY_REFRESH
pub async fn follow_signing_keys(app: AppState) {
    let changes = app.ledger.key_changes();
    let mut tick = tokio::time::interval(crate::backend::jwt::KEY_REFRESH);
    loop {
        tick_or_change(&mut tick, changes.as_deref()).await;
        if let Err(e) = crate::keys::refresh_signing_keys(&app).await {
            tracing::warn!(error = %e, "could not re-read the jwt signing keys; the loaded ones keep serving");
        }
    }
}

/// Waits for the next tick, or for `changed` (when the store announces changes), whichever
/// comes first.
async fn tick_or_change(tick: &mut tokio::time::Interval, changed: Option<&tokio::sync::Notify>) {
    match changed {
        Some(changed) => tokio::select! {
            _ = tick.tick() => {}
            _ = changed.notified() => {}
        },
        None => {
            tick.tick().await;
        }
    }
}

/// How long after a kill rule ends its effects may still matter: the longest session a backend
/// issues (STS: 12 h), after which everything issued before the end has expired.
const RULE_AFTERLIFE: chrono::Duration = chrono::Duration::hours(12);

/// Gives every backend its periodic upkeep (AWS: bounding the deny statements of lifted rules,
/// pruning expired ones) with the current policies and the kill rules that still matter.
pub async fn maintain_backends(app: &App) -> Result<(), LedgerError> {
    let now = app.clock.now();
    let mut rules = Vec::new();
    let mut page = KillPage { limit: 500, ..Default::default() };
    loop {
        let batch = app.ledger.kill_rules(page.clone()).await?;
        let Some(last) = batch.last() else { break };
        page.after = Some((last.rule.created_at, last.rule.id));
        let full = batch.len() == page.limit;
        rules.extend(batch.into_iter().map(|k| k.rule).filter(|r| {
            let ended = r.lifted_at.or(r.expires_at.filter(|e| *e <= now));
            ended.is_none_or(|end| end + RULE_AFTERLIFE > now)
        }));
        if !full {
            break;
        }
    }
    let policies = app.policies.get();
    let upkeep = Upkeep { policies: &policies, rules: &rules };
    for backend in app.backends.values() {
        if let Err(e) = backend.maintain(&upkeep).await {
            tracing::warn!(backend = %backend.kind(), error = %e, "backend upkeep failed; it runs again in a minute");
        }
    }
    Ok(())
}

/// Reads the kill rules in force from the ledger into memory. When a rule held in memory has
/// passed its `expires_at`, its lapse is recorded first (once, whichever replica sees it first).
pub async fn refresh_kills(app: &App) -> Result<(), LedgerError> {
    let now = app.clock.now();
    let lapsed = app.kills.get().state.rules.iter().any(|r| r.expires_at.is_some_and(|e| e <= now));
    if lapsed {
        record_lapses(app).await?;
    }
    let state = app.ledger.kill_state(now).await?;
    app.kills.set(KillSnapshot::new(state, now));
    Ok(())
}

/// Writes one `kill.lapsed` audit event for each rule whose expiry has passed and whose lapse is
/// not yet recorded. Returns the rules that lapsed.
pub async fn record_lapses(app: &App) -> Result<Vec<uuid::Uuid>, LedgerError> {
    let lapsed = app.ledger.record_lapses(app.clock.now(), "system").await?;
    for id in &lapsed {
        tracing::info!(kill_id = %id, "kill.lapsed");
    }
    Ok(lapsed)
}

/// Claims due jobs and runs them, at most `limits.job_concurrency` at a time per backend, so that
/// a backend that is slow or down holds up its own revocations and not the others'. Returns how
/// many ran.
///
/// Jobs are claimed as a backend's slots free up (once at least half of them are free), not
/// batch by batch, so one slow revocation holds up only its own slot. Only jobs about to run are
/// claimed: what waits stays in the queue for other replicas.
pub async fn run_jobs(app: &AppState) -> Result<usize, LedgerError> {
    let concurrency = app.config.limits.job_concurrency.max(1);
    // A kill enqueues one job per credential; its rule is read once per pass, not per job.
    let mut rules: HashMap<uuid::Uuid, Option<Arc<KillRule>>> = HashMap::new();
    let mut running: JoinSet<BackendKind> = JoinSet::new();
    let mut busy: HashMap<BackendKind, usize> = HashMap::new();
    // When each backend's queue was last found empty.
    let mut emptied: HashMap<BackendKind, Instant> = HashMap::new();
    let mut total = 0;
    let mut depth_set = Instant::now();
    let claimed = 'pass: loop {
        // A long pass (a kill of thousands of credentials) keeps the queue-depth gauge current.
        if depth_set.elapsed() >= DEPTH_EVERY {
            set_queue_depth(app).await;
            depth_set = Instant::now();
        }
        for backend in BackendKind::ALL {
            let busy = busy.entry(backend).or_default();
            let free = concurrency - *busy;
            let looked = emptied.get(&backend).is_some_and(|at| at.elapsed() < LOOK_AGAIN);
            if looked || free == 0 || (free * 2 < concurrency && *busy > 0) {
                continue;
            }
            let now = app.clock.now();
            let jobs = match claim(app, backend, free, now, &mut rules).await {
                Ok(jobs) => jobs,
                Err(e) => break 'pass Err(e),
            };
            if jobs.len() < free {
                emptied.insert(backend, Instant::now());
            }
            total += jobs.len();
            *busy += jobs.len();
            for job in jobs {
                let rule = job.kill_id.and_then(|id| rules.get(&id).cloned().flatten());
                let app = app.clone();
                running.spawn(async move {
                    finish(&app, &job, run_job(&app, &job, rule.as_deref()).await).await;
                    backend
                });
            }
        }
        if running.is_empty() {
            break Ok(());
        }
        // A job finished, or an empty queue is due another look (a kill may have filled it).
        tokio::select! {
            done = running.join_next() => {
                if let Some(Ok(backend)) = done {
                    busy.entry(backend).and_modify(|n| *n -= 1);
                }
            }
            _ = tokio::time::sleep(LOOK_AGAIN) => {}
        }
    };
    // Jobs already started finish, whatever happened to a claim (dropping them would abort
    // revocations half-way).
    while running.join_next().await.is_some() {}
    claimed?;
    set_queue_depth(app).await;
    Ok(total)
}

/// How often a running pass of [`run_jobs`] sets `latchkey_job_queue_depth`.
const DEPTH_EVERY: Duration = Duration::from_secs(1);

async fn set_queue_depth(app: &App) {
    if let Ok(depth) = app.ledger.job_queue_depth().await {
        app.metrics.job_queue_depth.set(depth as i64);
    }
}

/// How long a backend whose queue was found empty is left alone while other jobs still run.
const LOOK_AGAIN: Duration = Duration::from_millis(250);

/// Claims up to `limit` due jobs of `backend`'s credentials and reads the kill rules they revoke
/// for that are not in `rules` yet.
async fn claim(
    app: &App,
    backend: BackendKind,
    limit: usize,
    now: DateTime<Utc>,
    rules: &mut HashMap<uuid::Uuid, Option<Arc<KillRule>>>,
) -> Result<Vec<Job>, LedgerError> {
    let lease = now + chrono::Duration::from_std(JOB_LEASE).unwrap_or_default();
    let jobs = app.ledger.claim_jobs(now, backend, limit, lease).await?;
    for id in jobs.iter().filter_map(|j| j.kill_id) {
        if let std::collections::hash_map::Entry::Vacant(slot) = rules.entry(id) {
            slot.insert(app.ledger.kill_rule(id).await?.map(|k| Arc::new(k.rule)));
        }
    }
    Ok(jobs)
}

/// Records a job's outcome, and counts it.
async fn finish(app: &App, job: &Job, outcome: JobOutcome) {
    let label = match &outcome {
        JobOutcome::Done { .. } => "done",
        JobOutcome::Retry { .. } => "retry",
        JobOutcome::Failed { .. } => "failed",
    };
    app.metrics.jobs.get_or_create(&JobLabels { outcome: label.into() }).inc();
    if let Err(e) = app.ledger.finish_job(job, outcome).await {
        tracing::warn!(job_id = %job.id, error = %e, "could not record a job's outcome; it will run again");
    }
}

/// Runs one job: revoke a credential (now, or at its TTL end).
/// `rule`: the kill rule the job revokes for, if any (read by the caller for the whole batch).
async fn run_job(app: &App, job: &Job, rule: Option<&KillRule>) -> JobOutcome {
    let now = app.clock.now();
    let credential = match app.ledger.credential(job.credential_id).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            return JobOutcome::Failed {
                error: "credential not found".into(),
                event: job_event(job, "job.failed", now),
            };
        }
        Err(e) => return retry(job, now, e.to_string()),
    };
    let (target, event_name) = match job.kind {
        JobKind::RevokeAtTtl => (CredentialState::Expired, "credential.expired"),
        JobKind::Revoke => (CredentialState::Revoked, "credential.revoked"),
    };
    let mut event = job_event(job, event_name, now);
    event.capability = Some(credential.capability.clone());
    event.agent = Some(credential.agent.clone());
    event.subject = Some(credential.subject.clone());
    event.repository = credential.repository.clone();
    event.backend = Some(credential.backend.to_string());
    event.fingerprint = credential.fingerprint.clone();
    if !matches!(credential.state, CredentialState::Active | CredentialState::Pending) {
        // Already revoked or expired: nothing to do, and the ledger will not move it.
        return JobOutcome::Done { state: credential.state, event };
    }
    let handle = match credential.handle.as_deref().map(|b| app.sealer.open(credential.id.as_bytes(), b)).transpose() {
        Ok(h) => h,
        Err(e) => return JobOutcome::Failed { error: e.to_string(), event: job_event(job, "job.failed", now) },
    };
    let Some(backend) = app.backends.get(&credential.backend) else {
        return JobOutcome::Failed {
            error: format!("backend {} is not configured", credential.backend),
            event: job_event(job, "job.failed", now),
        };
    };
    // A kill's revocation may refuse more than this one credential at once (AWS session tags).
    let revoked = match rule {
        Some(rule) => backend.revoke_for_kill(&credential, handle.as_deref(), rule).await,
        None => backend.revoke(&credential, handle.as_deref()).await,
    };
    match revoked {
        Ok(()) => JobOutcome::Done { state: target, event },
        // A revocation at TTL end keeps trying after the TTL: the backend's own expiry may be
        // later (GitHub's fixed hour). Any other revocation of an expired credential is moot.
        Err(e) if job.attempts + 1 >= MAX_ATTEMPTS || (job.kind == JobKind::Revoke && credential.expires_at <= now) => {
            let mut event = job_event(job, "job.failed", now);
            event.reason = Some(e.to_string());
            JobOutcome::Failed { error: e.to_string(), event }
        }
        Err(BackendError::Throttled { retry_after, message, .. }) => {
            let wait = chrono::Duration::from_std(retry_after).unwrap_or(chrono::Duration::seconds(60));
            JobOutcome::Retry { run_at: now + wait, error: message }
        }
        Err(e @ BackendError::Unrecorded { .. }) => {
            let mut event = job_event(job, "job.failed", now);
            event.reason = Some(e.to_string());
            JobOutcome::Failed { error: e.to_string(), event }
        }
        Err(e) => retry(job, now, e.to_string()),
    }
}

fn retry(job: &Job, now: DateTime<Utc>, error: String) -> JobOutcome {
    let backoff = 2i64.saturating_pow(job.attempts.min(8)).min(300);
    JobOutcome::Retry { run_at: now + chrono::Duration::seconds(backoff), error }
}

fn job_event(job: &Job, name: &str, now: DateTime<Utc>) -> AuditEvent {
    let mut e = AuditEvent::new(name, now);
    e.actor = Some("system".into());
    e.credential_id = Some(job.credential_id.to_string());
    e.detail =
        Some(json!({ "job_id": job.id, "job": job.kind.as_str(), "kill_id": job.kill_id, "attempts": job.attempts }));
    e
}

/// Finds `pending` credentials left by a crash and makes sure nothing they stand for stays
/// usable: what has a handle is revoked through its backend; the row becomes `failed`.
pub async fn reconcile(app: &App) -> Result<usize, LedgerError> {
    let now = app.clock.now();
    let before = now - chrono::Duration::from_std(RECONCILE_AFTER).unwrap_or_default();
    let pending = app.ledger.pending_credentials(before).await?;
    let mut done = 0;
    for credential in pending {
        let handle = credential.handle.as_deref().and_then(|b| app.sealer.open(credential.id.as_bytes(), b).ok());
        let revoked = match app.backends.get(&credential.backend) {
            Some(backend) => backend.revoke(&credential, handle.as_deref()).await,
            None => Ok(()),
        };
        let mut event = AuditEvent::new("credential.reconciled", now);
        event.actor = Some("system".into());
        event.credential_id = Some(credential.id.to_string());
        event.exchange_id = Some(credential.exchange_id.to_string());
        event.backend = Some(credential.backend.to_string());
        event.capability = Some(credential.capability.clone());
        event.agent = Some(credential.agent.clone());
        match revoked {
            Ok(()) => {
                event.reason = Some("left pending by an interrupted exchange; revoked".into());
                if app
                    .ledger
                    .transition_credential(credential.id, &[CredentialState::Pending], CredentialState::Failed, event)
                    .await?
                {
                    done += 1;
                }
            }
            Err(BackendError::Unrecorded { lives_for, .. }) => {
                // Possibly issued and out of reach: say so loudly, with when it dies by itself.
                let dead_at = credential.created_at + chrono::Duration::from_std(lives_for).unwrap_or_default();
                event.event = "credential.possibly_issued".into();
                event.reason = Some(format!(
                    "left pending by an interrupted exchange before its handle was recorded: possibly issued, \
                     cannot be revoked, dead at {}",
                    crate::audit::format_time(dead_at)
                ));
                event.expiry = Some(crate::audit::format_time(dead_at));
                tracing::error!(
                    credential_id = %credential.id, backend = %credential.backend, dead_at = %dead_at,
                    "ALERT: a credential was possibly issued without a recorded handle and cannot be revoked"
                );
                app.metrics.possibly_issued.inc();
                if app
                    .ledger
                    .transition_credential(credential.id, &[CredentialState::Pending], CredentialState::Failed, event)
                    .await?
                {
                    done += 1;
                }
            }
            Err(e) => {
                tracing::warn!(credential_id = %credential.id, error = %e, "reconciler could not revoke; will retry")
            }
        }
    }
    Ok(done)
}

/// A cheap fingerprint of the policy directory: names, sizes and modification times.
fn dir_signature(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let m = e.metadata().ok()?;
            Some((e.path(), (m.len(), m.modified().ok())))
        })
        .collect()
}

/// Reloads the policies when their files change or on SIGHUP. A set that fails to load is
/// refused with an error event, and the old set keeps serving.
async fn watch_policies(app: AppState, mut last: BTreeMap<PathBuf, (u64, Option<SystemTime>)>) {
    let dir = app.config.resolve(&app.config.policies.dir);
    let mut tick = tokio::time::interval(app.config.policies.reload_interval);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let forced = match hup.as_mut() {
            Some(h) => tokio::select! { _ = tick.tick() => false, _ = h.recv() => true },
            None => {
                tick.tick().await;
                false
            }
        };
        #[cfg(not(unix))]
        let forced = {
            tick.tick().await;
            false
        };
        if forced {
            reload_admin_keys(&app).await;
        }
        let now = dir_signature(&dir);
        if now == last && !forced {
            continue;
        }
        last = now;
        reload_policies(&app).await;
    }
}

/// Re-reads the configuration file and swaps in its `[[admin_key]]` entries and its
/// `[admin_oidc]` identity provider, so that a key can be added or revoked without a restart (on
/// SIGHUP). A file that no longer loads changes
/// nothing. Either way the outcome is an audit event; the event names the keys and roles, never
/// their hashes. Only the admin keys are taken from the file: every other setting needs a
/// restart.
pub async fn reload_admin_keys(app: &App) -> bool {
    let Some(path) = &app.config.path else { return false };
    let now = app.clock.now();
    let (ok, mut event) = match Config::load(path) {
        Ok(config) => {
            // A changed identity provider gets a fresh verifier; an unchanged one keeps its
            // key cache.
            let current = app.admin_oidc.get().as_ref().as_ref().map(|o| o.config.clone());
            if current != config.admin_oidc {
                match config
                    .admin_oidc
                    .as_ref()
                    .map(|c| AdminOidc::new(c, app.config.limits.outbound_timeout, app.clock.clone()))
                    .transpose()
                {
                    Ok(idp) => app.admin_oidc.set(idp),
                    Err(e) => tracing::error!(error = %e, "the new [admin_oidc] does not load; the old one stays"),
                }
            }
            app.admin_keys.set(AdminKeys::new(&config.admin_keys));
            let keys: Vec<_> =
                config.admin_keys.iter().map(|k| serde_json::json!({ "name": k.name, "role": k.role })).collect();
            let mut e = AuditEvent::new("admin.keys_reloaded", now);
            e.detail = Some(serde_json::json!({ "keys": keys }));
            (true, e)
        }
        Err(err) => {
            tracing::error!(error = %err, "admin keys not reloaded: the configuration does not load");
            let mut e = AuditEvent::new("admin.keys_reload_failed", now);
            e.reason = Some(err.to_string());
            (false, e)
        }
    };
    event.actor = Some("system".into());
    if let Err(e) = app.ledger.append_event(event).await {
        tracing::error!(error = %e, "could not audit an admin key reload");
    }
    ok
}

/// Loads the policy directory and swaps it in if it loads cleanly.
pub async fn reload_policies(app: &App) -> bool {
    let dir = app.config.resolve(&app.config.policies.dir);
    let now = app.clock.now();
    match PolicySet::load_dir(&dir, &crate::server::app_policy_context(app)) {
        Ok(set) => {
            let mut event = AuditEvent::new("policy.reloaded", now);
            event.actor = Some("system".into());
            event.detail = Some(
                json!({ "policies": set.policies.values().map(|p| json!({"capability": p.capability, "sha256": p.sha256})).collect::<Vec<_>>() }),
            );
            tracing::info!(policies = set.policies.len(), "policies reloaded");
            app.policies.set(set);
            let _ = app.ledger.append_event(event).await;
            true
        }
        Err(errors) => {
            app.metrics.policy_reload_failures.inc();
            let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
            tracing::error!(errors = ?messages, "policy reload refused; the previous policies keep serving");
            let mut event = AuditEvent::new("policy.reload_failed", now);
            event.actor = Some("system".into());
            event.reason = Some("the new policy set does not load; the previous set keeps serving".into());
            event.detail = Some(json!({ "errors": messages }));
            let _ = app.ledger.append_event(event).await;
            false
        }
    }
}
