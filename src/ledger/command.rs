//! Write commands, independent of the store: what each write of the [`Ledger`](super::Ledger)
//! trait asks for, with its parameters already converted to column values (ids and times as text,
//! audit bodies canonicalized) on the caller's task, so that a store's writer only binds,
//! executes and hashes. Every store runs the same commands with the same meaning; only the SQL
//! dialect differs.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::rows::RetiredCredential;
use super::rows::{id, parse_time, ts, ts_opt};
use super::{
    Abort, Activate, Activation, ActiveLimit, Checkpoint, CredentialRow, CredentialState, ExchangeRow, ExchangeState,
    Handle, Job, JobOutcome, KillEffect, LedgerError, NewJob, Reseal, ResealCount, RetireKey, Retired, RevokeRequest,
    StoredKey, StoredKill,
};
use crate::audit::{AuditEvent, canonical_body};
use crate::kill::{KillRule, KillSubject};

/// An exchange row as column values.
pub(in crate::ledger) struct ExchangeParams {
    pub(in crate::ledger) state: ExchangeState,
    pub(in crate::ledger) id: String,
    pub(in crate::ledger) request_id: String,
    pub(in crate::ledger) created_at: String,
    pub(in crate::ledger) error: Option<String>,
    pub(in crate::ledger) reason: Option<String>,
    pub(in crate::ledger) issuer: Option<String>,
    pub(in crate::ledger) subject: Option<String>,
    pub(in crate::ledger) repository: Option<String>,
    pub(in crate::ledger) workflow: Option<String>,
    pub(in crate::ledger) capability: Option<String>,
    pub(in crate::ledger) agent: Option<String>,
    pub(in crate::ledger) claims: String,
    pub(in crate::ledger) trace: String,
    pub(in crate::ledger) policy_sha256: Option<String>,
    pub(in crate::ledger) release_token_sha256: Option<String>,
    pub(in crate::ledger) expires_at: Option<String>,
}

impl ExchangeParams {
    pub(in crate::ledger) fn new(e: &ExchangeRow) -> Self {
        ExchangeParams {
            state: e.state,
            id: id(e.id),
            request_id: e.request_id.clone(),
            created_at: ts(e.created_at),
            error: e.error.clone(),
            reason: e.reason.clone(),
            issuer: e.issuer.clone(),
            subject: e.subject.clone(),
            repository: e.repository.clone(),
            workflow: e.workflow.clone(),
            capability: e.capability.clone(),
            agent: e.agent.clone(),
            claims: e.claims.to_string(),
            trace: e.trace.to_string(),
            policy_sha256: e.policy_sha256.clone(),
            release_token_sha256: e.release_token_sha256.clone(),
            expires_at: ts_opt(e.expires_at),
        }
    }
}

/// A credential row as column values.
pub(in crate::ledger) struct CredentialParams {
    pub(in crate::ledger) state: CredentialState,
    pub(in crate::ledger) id: String,
    pub(in crate::ledger) exchange_id: String,
    pub(in crate::ledger) name: String,
    pub(in crate::ledger) backend: &'static str,
    pub(in crate::ledger) agent: String,
    pub(in crate::ledger) capability: String,
    pub(in crate::ledger) issuer: String,
    pub(in crate::ledger) subject: String,
    pub(in crate::ledger) repository: Option<String>,
    pub(in crate::ledger) workflow: Option<String>,
    pub(in crate::ledger) created_at: String,
    pub(in crate::ledger) expires_at: String,
    pub(in crate::ledger) fingerprint: Option<String>,
    pub(in crate::ledger) handle: Option<Vec<u8>>,
    pub(in crate::ledger) revoke_requested: bool,
    pub(in crate::ledger) revoked_at: Option<String>,
}

impl CredentialParams {
    pub(in crate::ledger) fn new(c: &CredentialRow) -> Self {
        CredentialParams {
            state: c.state,
            id: id(c.id),
            exchange_id: id(c.exchange_id),
            name: c.name.clone(),
            backend: c.backend.as_str(),
            agent: c.agent.clone(),
            capability: c.capability.clone(),
            issuer: c.issuer.clone(),
            subject: c.subject.clone(),
            repository: c.repository.clone(),
            workflow: c.workflow.clone(),
            created_at: ts(c.created_at),
            expires_at: ts(c.expires_at),
            fingerprint: c.fingerprint.clone(),
            handle: c.handle.clone(),
            revoke_requested: c.revoke_requested,
            revoked_at: ts_opt(c.revoked_at),
        }
    }
}

/// A job as column values.
pub(in crate::ledger) struct JobParams {
    pub(in crate::ledger) id: String,
    pub(in crate::ledger) kind: &'static str,
    pub(in crate::ledger) credential_id: String,
    pub(in crate::ledger) backend: &'static str,
    pub(in crate::ledger) kill_id: Option<String>,
    pub(in crate::ledger) run_at: String,
}

impl JobParams {
    pub(in crate::ledger) fn new(j: &NewJob) -> Self {
        JobParams {
            id: id(j.id),
            kind: j.kind.as_str(),
            credential_id: id(j.credential_id),
            backend: j.backend.as_str(),
            kill_id: j.kill_id.map(id),
            run_at: ts(j.run_at),
        }
    }
}

/// An audit event, canonicalized, with its time as a column value (for `revoked_at`, `done_at`).
pub(in crate::ledger) struct EventParams {
    pub(in crate::ledger) body: String,
    pub(in crate::ledger) at: Result<String, String>,
}

impl EventParams {
    pub(in crate::ledger) fn new(e: &AuditEvent) -> Self {
        // The event's time is when the change it records happened; it is also the time stored on
        // the row (revoked_at, done_at), so that the audit trail and the rows agree.
        let at = parse_time(&e.time).map(ts).ok_or_else(|| format!("event time {:?} is not RFC 3339", e.time));
        EventParams { body: canonical_body(e), at }
    }

    pub(in crate::ledger) fn at(&self) -> Result<&str, LedgerError> {
        self.at.as_deref().map_err(|m| LedgerError::Conflict(m.to_owned()))
    }
}

pub(in crate::ledger) enum FinishParams {
    Done { state: CredentialState, event: EventParams },
    Retry { run_at: String, error: String },
    Failed { error: String, event: EventParams },
}

/// What an activation is judged by, with kill creation held off (DESIGN step 7): the kill epoch
/// the exchange's in-memory check saw, its subject, its `jti` to spend, and its `max_active`.
pub(in crate::ledger) struct Gate {
    pub(in crate::ledger) now: DateTime<Utc>,
    pub(in crate::ledger) seen_kill_epoch: i64,
    pub(in crate::ledger) subject: KillSubject,
    /// `(issuer, jti, capability, keep_until)`.
    pub(in crate::ledger) jti: Option<(String, String, String, String)>,
    pub(in crate::ledger) max_active: Option<ActiveLimit>,
}

/// An intent is a pending exchange with its pending credentials.
pub(in crate::ledger) fn check_intent(
    exchange: &ExchangeParams,
    credentials: &[CredentialParams],
) -> Result<(), LedgerError> {
    if exchange.state != ExchangeState::Pending {
        return Err(LedgerError::Conflict(format!("an intent is pending, not {}", exchange.state.as_str())));
    }
    for c in credentials {
        if c.exchange_id != exchange.id {
            return Err(LedgerError::Conflict(format!("credential {} belongs to another exchange", c.id)));
        }
        if c.state != CredentialState::Pending {
            return Err(LedgerError::Conflict(format!("credential {} is {}, not pending", c.id, c.state.as_str())));
        }
    }
    Ok(())
}

/// One write command.
pub(in crate::ledger) enum Op {
    Refusal {
        exchange: ExchangeParams,
        event: EventParams,
    },
    Intent {
        exchange: ExchangeParams,
        credentials: Vec<CredentialParams>,
        event: EventParams,
    },
    /// Intent and activation in one command, for grants only latchkey holds.
    IssueLocal {
        exchange: ExchangeParams,
        credentials: Vec<CredentialParams>,
        gate: Box<Gate>,
        jobs: Vec<JobParams>,
        event: EventParams,
    },
    Handle {
        credential_id: String,
        sealed: Option<Vec<u8>>,
        fingerprint: String,
        expires_at: String,
    },
    Activate {
        exchange_id: String,
        gate: Box<Gate>,
        jobs: Vec<JobParams>,
        event: EventParams,
    },
    /// One step of a rate bucket; answers [`Reply::Wait`].
    TakeRate {
        key: String,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        tolerance: std::time::Duration,
    },
    Abort {
        exchange_id: String,
        state: ExchangeState,
        error: String,
        reason: String,
        unrevoked: Vec<String>,
        event: EventParams,
    },
    Transition {
        id: String,
        from: Vec<CredentialState>,
        to: CredentialState,
        event: EventParams,
    },
    CreateKill {
        rule: Box<KillRule>,
        selector: String,
        event: EventParams,
    },
    RecordLapses {
        now: DateTime<Utc>,
        actor: String,
    },
    LiftKill {
        id: String,
        now: String,
        by: String,
        reason: String,
        event: EventParams,
    },
    RequestRevoke {
        job: JobParams,
        event: EventParams,
    },
    Release {
        revokes: Vec<(JobParams, EventParams)>,
        event: EventParams,
    },
    EnqueueJobs(Vec<JobParams>),
    ClaimJobs {
        now: String,
        backend: &'static str,
        limit: i64,
        lease_until: String,
    },
    FinishJob {
        job_id: String,
        outcome: FinishParams,
    },
    AppendEvent(EventParams),
    InsertSigningKey {
        key: KeyParams,
        event: EventParams,
    },
    /// Answers [`Reply::Retired`]; the events are made once the ended credentials are known.
    RetireSigningKey {
        kid: String,
        at: String,
        replacement: Option<Box<KeyParams>>,
        signed_from: String,
        signed_until: Option<String>,
        event: Box<AuditEvent>,
    },
    Prune {
        now: String,
    },
    /// Compare-and-set re-seals; `key_id` and `now` make the `sealing.resealed` event.
    Reseal {
        reseals: Vec<Reseal>,
        key_id: String,
        now: DateTime<Utc>,
    },
    RecordCheckpoint {
        checkpoint: Checkpoint,
        event: EventParams,
    },
    SetStreamPosition {
        name: String,
        seq: i64,
    },
}

impl Op {
    pub(in crate::ledger) fn handle(credential_id: Uuid, h: &Handle) -> Op {
        Op::Handle {
            credential_id: id(credential_id),
            sealed: h.sealed.clone(),
            fingerprint: h.fingerprint.clone(),
            expires_at: ts(h.expires_at),
        }
    }

    pub(in crate::ledger) fn activate(a: Activate) -> Op {
        let (exchange_id, gate, jobs, event) = activation(a);
        Op::Activate { exchange_id, gate, jobs, event }
    }

    pub(in crate::ledger) fn issue_local(exchange: &ExchangeRow, credentials: &[CredentialRow], a: Activate) -> Op {
        let (_, gate, jobs, event) = activation(a);
        Op::IssueLocal {
            exchange: ExchangeParams::new(exchange),
            credentials: credentials.iter().map(CredentialParams::new).collect(),
            gate,
            jobs,
            event,
        }
    }

    pub(in crate::ledger) fn abort(a: Abort) -> Op {
        Op::Abort {
            exchange_id: id(a.exchange_id),
            state: a.state,
            error: a.error,
            reason: a.reason,
            unrevoked: a.unrevoked.into_iter().map(id).collect(),
            event: EventParams::new(&a.event),
        }
    }

    pub(in crate::ledger) fn finish_job(job: &Job, outcome: JobOutcome) -> Op {
        let outcome = match outcome {
            JobOutcome::Done { state, event } => FinishParams::Done { state, event: EventParams::new(&event) },
            JobOutcome::Retry { run_at, error } => FinishParams::Retry { run_at: ts(run_at), error },
            JobOutcome::Failed { error, event } => FinishParams::Failed { error, event: EventParams::new(&event) },
        };
        Op::FinishJob { job_id: id(job.id), outcome }
    }

    pub(in crate::ledger) fn insert_signing_key(key: &StoredKey, event: &AuditEvent) -> Op {
        Op::InsertSigningKey { key: KeyParams::new(key), event: EventParams::new(event) }
    }

    pub(in crate::ledger) fn retire_signing_key(r: RetireKey) -> Op {
        Op::RetireSigningKey {
            kid: r.kid,
            at: ts(r.at),
            replacement: r.replacement.as_ref().map(|k| Box::new(KeyParams::new(k))),
            signed_from: ts(r.signed_from),
            signed_until: ts_opt(r.signed_until),
            event: Box::new(r.event),
        }
    }
}

/// A new signing key as column values. A new key is never retired.
pub(in crate::ledger) struct KeyParams {
    pub(in crate::ledger) id: String,
    pub(in crate::ledger) algorithm: String,
    pub(in crate::ledger) sealed_private: Vec<u8>,
    pub(in crate::ledger) public_jwk: String,
    pub(in crate::ledger) created_at: String,
    pub(in crate::ledger) signs_from: Option<String>,
}

impl KeyParams {
    fn new(key: &StoredKey) -> Self {
        KeyParams {
            id: key.id.clone(),
            algorithm: key.algorithm.clone(),
            sealed_private: key.sealed_private.clone(),
            public_jwk: key.public_jwk.to_string(),
            created_at: ts(key.created_at),
            signs_from: ts_opt(key.signs_from),
        }
    }
}

/// The event of one credential a retirement ends: `credential.revoked` (active) or
/// `credential.revoke_requested` (pending), with the actor, request id, time and reason of the
/// retirement's own event. The same event in every store.
pub(in crate::ledger) fn retired_credential_event(
    retirement: &AuditEvent,
    kid: &str,
    c: &RetiredCredential,
) -> EventParams {
    let name = if c.state == CredentialState::Pending { "credential.revoke_requested" } else { "credential.revoked" };
    let mut event = AuditEvent { time: retirement.time.clone(), event: name.into(), ..Default::default() };
    event.actor = retirement.actor.clone();
    event.request_id = retirement.request_id.clone();
    event.reason = retirement.reason.clone();
    event.credential_id = Some(id(c.id));
    event.backend = Some("jwt".into());
    event.agent = Some(c.agent.clone());
    event.capability = Some(c.capability.clone());
    event.subject = Some(c.subject.clone());
    event.repository = c.repository.clone();
    event.fingerprint = c.fingerprint.clone();
    event.detail = Some(serde_json::json!({ "signing_key_retired": kid }));
    EventParams::new(&event)
}

/// The retirement's own event (`signing_key.retired`), with the counts of what it ended added to
/// its `detail`: written after the credentials' events, in the same transaction.
pub(in crate::ledger) fn key_retired_event(mut event: AuditEvent, retired: &Retired) -> EventParams {
    let mut detail = match event.detail.take() {
        Some(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    detail.insert("credentials_revoked".into(), retired.revoked.len().into());
    detail.insert("credentials_marked".into(), retired.marked.len().into());
    event.detail = Some(serde_json::Value::Object(detail));
    EventParams::new(&event)
}

/// What a command answers.
#[derive(Debug)]
pub(in crate::ledger) enum Reply {
    Done,
    Moved(bool),
    Activation(Activation),
    KillEffect(KillEffect),
    KillIds(Vec<Uuid>),
    Kill(Box<StoredKill>),
    Revoke(RevokeRequest),
    Revokes(Vec<RevokeRequest>),
    Jobs(Vec<Job>),
    Count(u64),
    Wait(Option<std::time::Duration>),
    Resealed(ResealCount),
    Retired(Retired),
}

/// The `sealing.resealed` event of a re-seal command that changed something: the same event in
/// every store. Counts and the key id only: a blob, even sealed, never enters the audit trail.
pub(in crate::ledger) fn resealed_event(now: DateTime<Utc>, key_id: &str, count: &ResealCount) -> EventParams {
    let mut event = AuditEvent::new("sealing.resealed", now);
    event.actor = Some("system".into());
    event.detail = Some(serde_json::json!({
        "key_id": key_id,
        "credentials": count.credentials,
        "signing_keys": count.signing_keys,
        "skipped": count.skipped,
    }));
    EventParams::new(&event)
}

/// A command's answer and whether its changes stay.
pub(in crate::ledger) struct Applied {
    pub(in crate::ledger) reply: Reply,
    pub(in crate::ledger) keep: bool,
}

impl Applied {
    pub(in crate::ledger) fn keep(reply: Reply) -> Self {
        Applied { reply, keep: true }
    }

    pub(in crate::ledger) fn undo(reply: Reply) -> Self {
        Applied { reply, keep: false }
    }
}

/// An activation's parameters as column values: the exchange id, what it is judged by, its jobs
/// and its event.
fn activation(a: Activate) -> (String, Box<Gate>, Vec<JobParams>, EventParams) {
    let gate = Box::new(Gate {
        now: a.now,
        seen_kill_epoch: a.seen_kill_epoch,
        subject: a.subject,
        jti: a.jti.map(|j| (j.issuer, j.jti, j.capability, ts(j.keep_until))),
        max_active: a.max_active,
    });
    (id(a.exchange_id), gate, a.jobs.iter().map(JobParams::new).collect(), EventParams::new(&a.event))
}
