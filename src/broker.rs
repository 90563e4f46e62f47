//! The exchange: DESIGN.md steps 1–8 in one function, top to bottom.
//!
//! Reading the request (step 1: size limits, form or JSON) is the HTTP layer's; everything from
//! verification to the answer is here, so the order of the security checks can be read in one
//! place. Every way out of [`exchange`] leaves a ledger row and an audit event behind.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::app::{App, KillSnapshot};
use crate::audit::{AuditEvent, format_time};
use crate::backend::{BackendError, MintRequest, Minted, SecretFields};
use crate::kill::KillSubject;
use crate::ledger::{
    Abort, Activate, Activation, ActiveLimit, CredentialRow, CredentialState, ExchangeRow, ExchangeState, Handle,
    JobKind, NewJob, SpentJti,
};
use crate::metrics::{ExchangeLabels, LimitLabels};
use crate::oidc::VerifiedClaims;
use crate::policy::{AuthorizedGrant, BackendKind, Limits, Narrowing, Outcome};

/// Leeway granted on token times; a spent `jti` is kept until `exp` + this.
const LEEWAY_SECONDS: i64 = 60;

/// A token-exchange request, parsed and size-checked by the HTTP layer.
#[derive(Debug)]
pub struct ExchangeRequest {
    pub subject_token: SecretString,
    pub capability: String,
    pub narrow: Option<Narrowing>,
    pub request_id: String,
}

/// One credential handed to the caller.
#[derive(Debug)]
pub struct IssuedCredential {
    pub id: Uuid,
    pub name: String,
    pub backend: BackendKind,
    pub expires_at: DateTime<Utc>,
    pub fingerprint: String,
    pub secret: SecretFields,
}

/// A successful exchange. Holds secrets: it is turned into the response body and dropped.
#[derive(Debug)]
pub struct Exchanged {
    pub exchange_id: Uuid,
    pub release_token: SecretString,
    pub capability: String,
    pub agent: String,
    pub expires_at: DateTime<Utc>,
    pub expires_in: i64,
    pub access_token: SecretString,
    pub issued_token_type: &'static str,
    pub token_type: &'static str,
    pub credentials: Vec<IssuedCredential>,
}

/// Why an exchange was refused. Messages are what the caller may see: short, and they never
/// reveal a policy. The full reason is in the ledger and the audit trail.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// A malformed request (RFC 6749 `invalid_request`).
    #[error("{0}")]
    InvalidRequest(String),
    /// The subject token was rejected, replays included (`invalid_grant`).
    #[error("{0}")]
    InvalidGrant(String),
    /// No policy allows it, a kill rule blocks it, or the narrowing is too wide (`access_denied`).
    #[error("{0}")]
    AccessDenied(String),
    /// A backend or the store failed; nothing was left issued (`temporarily_unavailable`).
    #[error("{0}")]
    Unavailable(String),
    /// A limit of the policy (or the source address) was reached: try again after `retry_after`
    /// (`slow_down`, 429).
    #[error("{message}")]
    SlowDown { message: String, retry_after: std::time::Duration },
}

impl ExchangeError {
    pub fn code(&self) -> &'static str {
        match self {
            ExchangeError::InvalidRequest(_) => "invalid_request",
            ExchangeError::InvalidGrant(_) => "invalid_grant",
            ExchangeError::AccessDenied(_) => "access_denied",
            ExchangeError::Unavailable(_) => "temporarily_unavailable",
            ExchangeError::SlowDown { .. } => "slow_down",
        }
    }
}

/// Runs one token exchange, and counts its outcome (`latchkey_exchanges_total`), whichever step
/// ended it.
pub async fn exchange(app: &App, req: ExchangeRequest) -> Result<Exchanged, ExchangeError> {
    let capability = req.capability.clone();
    let result = run(app, req).await;
    let decision = match &result {
        Ok(_) => "allowed",
        Err(ExchangeError::AccessDenied(_)) => "denied",
        Err(ExchangeError::SlowDown { .. }) => "limited",
        Err(ExchangeError::Unavailable(_)) => "failed",
        Err(ExchangeError::InvalidGrant(_) | ExchangeError::InvalidRequest(_)) => "invalid",
    };
    app.metrics.exchanges.get_or_create(&labels(&capability, decision)).inc();
    result
}

/// The exchange itself, DESIGN steps 2 to 8.
async fn run(app: &App, req: ExchangeRequest) -> Result<Exchanged, ExchangeError> {
    let now = app.clock.now();
    let mut row = ExchangeRow::started(&req, now);

    // Step 2: verify the subject token against its configured issuer.
    let claims = match app.verifier.verify(req.subject_token.expose_secret()).await {
        Ok(claims) => claims,
        Err(e) => {
            let err = ExchangeError::InvalidGrant(format!("subject token rejected: {e}"));
            return Err(refuse(app, row, err, e.code().to_owned()).await);
        }
    };
    row.identify(&claims);
    let single_use = app.verifier.issuer(&claims.issuer).is_none_or(|i| i.single_use);
    // Single use: the `jti` to spend, at activation, where the store makes a second spend fail.
    let spent_jti = match (single_use, claims.jti()) {
        (true, Some(jti)) => Some(SpentJti {
            issuer: claims.issuer.clone(),
            jti: jti.to_owned(),
            capability: req.capability.clone(),
            keep_until: DateTime::from_timestamp(claims.expires_at() + LEEWAY_SECONDS, 0).unwrap_or(now),
        }),
        _ => None,
    };

    // Step 4: authorize against the capability's policy, narrowed by the caller.
    let decision = app.policies.get().decide(&req.capability, &claims, req.narrow.as_ref());
    row.trace = serde_json::to_value(&decision.trace).unwrap_or(Value::Null);
    row.policy_sha256 = decision.policy_sha256.clone();
    let (agent, ttl, grants, limits) = match decision.outcome {
        Outcome::Allow { agent, ttl, grants, limits } => (agent, ttl, grants, limits),
        Outcome::Deny(reason) => {
            let err = ExchangeError::AccessDenied(reason.public_message().to_owned());
            return Err(refuse(app, row, err, format!("policy: {}", json!(reason).as_str().unwrap_or("denied"))).await);
        }
    };
    row.agent = Some(agent.clone());

    // Step 3: kill rules, checked in memory. They name agents, so this follows the policy
    // lookup that assigns the agent; either way a killed identity is refused before any mint.
    // Rules that cannot be confirmed fresh fail the exchange closed.
    let kills = fresh_kills(app).await?;
    let subject = kill_subject(&claims, &agent, &req.capability);
    if let Some(rule) = kills.state.rules.iter().find(|r| r.in_force(now) && r.selector.matches(&subject)) {
        let err = ExchangeError::AccessDenied("this identity is blocked by a kill rule".into());
        return Err(refuse(app, row, err, format!("kill rule {}", rule.id)).await);
    }

    // A replayed token is refused before anything is spent on it: a rate charged, a backend
    // called. When neither would happen (local grants, no rate), activation's binding check is
    // the whole check and this read is saved.
    let local = grants.iter().all(|g| app.backends.get(&g.spec.backend()).is_some_and(|b| b.is_local()));
    if let Some(jti) = spent_jti.as_ref().filter(|_| !local || limits.charges_rate()) {
        let spent = app.ledger.jti_spent(&jti.issuer, &jti.jti, &jti.capability).await.map_err(|e| unavailable(&e))?;
        if spent {
            let err = ExchangeError::InvalidGrant("subject token already used for this capability".into());
            return Err(refuse(app, row, err, "replayed jti".into()).await);
        }
    }

    // The policy's limits, after the kill check (a killed identity hears 403, not "wait"). Rates
    // are counted in the store, so across replicas; `max_active` is checked again, binding, at
    // activation.
    if let Some((err, reason, limit)) = over_limit(app, &req.capability, &subject, &limits, now).await? {
        let labels = LimitLabels { capability: req.capability.clone(), limit: limit.to_owned() };
        app.metrics.limits_hit.get_or_create(&labels).inc();
        return Err(refuse(app, row, err, reason).await);
    }
    let max_active = limits.max_active.map(|limit| ActiveLimit {
        agent: agent.clone(),
        repository: subject.repository.clone(),
        limit,
    });

    // Step 5: record intent, durably, before any backend is called. Grants whose backends keep
    // no state outside latchkey (jwt) need none: steps 5 to 7 then commit as one transaction.
    let pending: Vec<CredentialRow> = grants.iter().map(|g| row.pending_credential(g, now)).collect();
    let expires_at = pending.iter().map(|c| c.expires_at).max().unwrap_or(now + to_chrono(ttl));
    let (release_token, release_hash) = new_release_token();
    row.state = ExchangeState::Pending;
    row.release_token_sha256 = Some(release_hash);
    row.expires_at = Some(expires_at);
    if !local {
        let event = exchange_event("exchange.started", &row, now);
        app.ledger.record_intent(&row, &pending, event).await.map_err(|e| unavailable(&e))?;
    }

    // Step 6: mint each grant in policy order (aws last); record each handle as it arrives.
    let mut minted: Vec<(&CredentialRow, Minted)> = Vec::with_capacity(grants.len());
    for (grant, credential) in grants.iter().zip(&pending) {
        let result = match app.backends.get(&grant.spec.backend()) {
            Some(backend) => {
                let request = MintRequest {
                    credential_id: credential.id,
                    grant,
                    agent: &agent,
                    capability: &req.capability,
                    claims: &claims,
                    now,
                    expires_at: credential.expires_at,
                };
                match backend_slot(app, grant.spec.backend()).await {
                    Ok(_slot) => backend.mint(request).await,
                    Err(e) => Err(e),
                }
            }
            None => Err(BackendError::Unavailable {
                backend: grant.spec.backend(),
                message: "the backend is not configured".into(),
            }),
        };
        let m = match result {
            Ok(m) => m,
            Err(e) => {
                let state = if matches!(e, BackendError::Refused { .. }) {
                    ExchangeState::Denied
                } else {
                    ExchangeState::Failed
                };
                return Err(abort(app, &row, local, minted, state, failed(&grant.name, &e)).await);
            }
        };
        if local {
            minted.push((credential, m));
            continue;
        }
        let handle = Handle {
            sealed: m.handle.as_ref().map(|h| app.sealer.seal(credential.id.as_bytes(), h.expose_secret())),
            fingerprint: m.fingerprint.clone(),
            expires_at: m.expires_at,
        };
        let recorded = app.ledger.record_handle(credential.id, &handle).await;
        minted.push((credential, m));
        if let Err(e) = recorded {
            let reason = format!("grant {}: recording its handle: {e}", grant.name);
            return Err(abort(app, &row, local, minted, ExchangeState::Failed, (unavailable(&e), reason)).await);
        }
    }

    // Step 7: activate, serialized with kill creation; the store has the last word on kills.
    let mut event = exchange_event("exchange.allowed", &row, now);
    event.decision = Some("allowed".into());
    event.expiry = Some(format_time(expires_at));
    event.detail = Some(json!({
        "credentials": minted.iter().map(|(c, m)| json!({
            "id": c.id, "name": c.name, "backend": c.backend, "fingerprint": m.fingerprint,
            "expires_at": format_time(m.expires_at),
        })).collect::<Vec<_>>(),
        "trace": row.trace,
    }));
    let jobs = minted
        .iter()
        .map(|(c, m)| NewJob {
            id: Uuid::now_v7(),
            kind: JobKind::RevokeAtTtl,
            credential_id: c.id,
            backend: c.backend,
            kill_id: None,
            run_at: m.expires_at,
        })
        .collect();
    let mut subject = subject;
    subject.credentials = pending.iter().map(|c| c.id).collect();
    let activation = Activate {
        exchange_id: row.id,
        now,
        seen_kill_epoch: kills.state.epoch,
        subject,
        jti: spent_jti,
        max_active,
        jobs,
        event,
    };
    let activated = if local {
        let issued: Vec<CredentialRow> = minted
            .iter()
            .map(|(c, m)| CredentialRow {
                fingerprint: Some(m.fingerprint.clone()),
                expires_at: m.expires_at,
                ..(*c).clone()
            })
            .collect();
        app.ledger.issue_local(&row, &issued, activation).await
    } else {
        app.ledger.activate(activation).await
    };
    match activated {
        Ok(Activation::Activated) => {}
        Ok(Activation::Killed { rule_id }) => {
            let reason = match rule_id {
                Some(id) => format!("kill rule {id} landed during the exchange"),
                None => "a kill rule marked the credentials during the exchange".into(),
            };
            let err = ExchangeError::AccessDenied("this identity is blocked by a kill rule".into());
            return Err(abort(app, &row, local, minted, ExchangeState::Denied, (err, reason)).await);
        }
        Ok(Activation::Limited { live }) => {
            let labels = LimitLabels { capability: req.capability.clone(), limit: "max_active".into() };
            app.metrics.limits_hit.get_or_create(&labels).inc();
            let err = slow_down(std::time::Duration::from_secs(1));
            let reason =
                format!("limit max_active {}: {live} live exchanges at activation", limits.max_active.unwrap_or(0));
            return Err(abort(app, &row, local, minted, ExchangeState::Denied, (err, reason)).await);
        }
        Ok(Activation::Replay) => {
            let err = ExchangeError::InvalidGrant("subject token already used for this capability".into());
            return Err(abort(app, &row, local, minted, ExchangeState::Denied, (err, "replayed jti".into())).await);
        }
        Err(e) => {
            return Err(abort(app, &row, local, minted, ExchangeState::Failed, (unavailable(&e), e.to_string())).await);
        }
    }

    // Step 8: answer. The secrets leave here, once.
    let first = minted.first().map(|(_, m)| (m.access_token.clone(), m.issued_token_type, m.token_type));
    let (access_token, issued_token_type, token_type) =
        first.unwrap_or_else(|| (SecretString::from(String::new()), "urn:latchkey:token-type:none", "N_A"));
    Ok(Exchanged {
        exchange_id: row.id,
        release_token,
        capability: req.capability,
        agent,
        expires_at,
        expires_in: (expires_at - now).num_seconds(),
        access_token,
        issued_token_type,
        token_type,
        credentials: minted
            .into_iter()
            .map(|(c, m)| IssuedCredential {
                id: c.id,
                name: c.name.clone(),
                backend: c.backend,
                expires_at: m.expires_at,
                fingerprint: m.fingerprint,
                secret: m.secret,
            })
            .collect(),
    })
}

/// Records a refusal that happened before any intent was written, and returns the error.
async fn refuse(app: &App, mut row: ExchangeRow, err: ExchangeError, reason: String) -> ExchangeError {
    let now = row.created_at;
    row.state = ExchangeState::Denied;
    row.error = Some(err.code().to_owned());
    row.reason = Some(reason.clone());
    let mut event = exchange_event("exchange.denied", &row, now);
    event.decision = Some("denied".into());
    event.reason = Some(reason);
    event.detail = Some(json!({ "error": err.code(), "trace": row.trace }));
    if let Err(e) = app.ledger.record_refusal(&row, event).await {
        // The caller is refused either way; a refusal that could not be recorded is loud.
        tracing::error!(request_id = %row.request_id, error = %e, "could not record a refused exchange");
    }
    err
}

/// All-or-nothing: revokes what was minted, ends the exchange, and returns the error. A
/// credential whose revocation fails stays `pending` so that the reconciler retries it.
async fn abort(
    app: &App,
    row: &ExchangeRow,
    local: bool,
    minted: Vec<(&CredentialRow, Minted)>,
    state: ExchangeState,
    (err, reason): (ExchangeError, String),
) -> ExchangeError {
    let now = app.clock.now();
    let mut unrevoked = Vec::new();
    for (credential, m) in &minted {
        let Some(backend) = app.backends.get(&credential.backend) else { continue };
        let handle = m.handle.as_ref().map(|h| h.expose_secret().as_slice());
        if let Err(e) = backend.revoke(credential, handle).await {
            tracing::error!(credential_id = %credential.id, error = %e, "could not revoke after a failed exchange");
            unrevoked.push(credential.id);
        }
    }
    let mut event =
        exchange_event(if state == ExchangeState::Denied { "exchange.denied" } else { "exchange.failed" }, row, now);
    event.decision = Some(state.as_str().into());
    event.reason = Some(reason.clone());
    event.detail = Some(json!({
        "error": err.code(),
        "revoked": minted.iter().map(|(c, _)| c.id).filter(|id| !unrevoked.contains(id)).collect::<Vec<_>>(),
        "unrevoked": unrevoked,
        "trace": row.trace,
    }));
    let recorded = if local {
        // Nothing of this exchange is on record yet: record it as refused, like an early refusal.
        let mut row = row.clone();
        (row.state, row.error, row.reason) = (state, Some(err.code().into()), Some(reason));
        app.ledger.record_refusal(&row, event).await
    } else {
        app.ledger.abort(Abort { exchange_id: row.id, state, error: err.code().into(), reason, unrevoked, event }).await
    };
    if let Err(e) = recorded {
        tracing::error!(exchange_id = %row.id, error = %e, "could not record an aborted exchange; the reconciler will find it");
    }
    err
}

/// A grant that could not be minted. A backend that refuses the grant as the policy asks it (the
/// GitHub installation lacks a permission, say) is `access_denied`: retrying will not help. Any
/// other failure is `temporarily_unavailable`. The backend's message goes to the audit trail only.
fn failed(grant: &str, e: &BackendError) -> (ExchangeError, String) {
    let err = match e {
        BackendError::Refused { .. } => ExchangeError::AccessDenied(format!(
            "grant {grant:?} cannot be issued as the policy asks; nothing was issued"
        )),
        _ => ExchangeError::Unavailable(format!("could not issue grant {grant:?}; nothing was issued")),
    };
    (err, format!("grant {grant}: {e}"))
}

/// The kill rules to judge an exchange by. With a store other replicas share, a kill made on
/// another replica reaches this one through the store: rules read longer ago than
/// [`crate::server::KILL_FRESHNESS`] are read again now, and when that fails the exchange is
/// refused as unavailable rather than judged by rules that may miss a kill. (With SQLite every
/// kill is made in this process, which refreshes its rules before answering it.)
async fn fresh_kills(app: &App) -> Result<Arc<KillSnapshot>, ExchangeError> {
    let kills = app.kills.get();
    if app.ledger.kill_changes().is_none() || kills.age() <= crate::server::KILL_FRESHNESS {
        return Ok(kills);
    }
    let error = match tokio::time::timeout(KILL_REFRESH_TIMEOUT, crate::worker::refresh_kills(app)).await {
        Ok(Ok(())) => return Ok(app.kills.get()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no answer within {KILL_REFRESH_TIMEOUT:?}"),
    };
    tracing::error!(error, age_ms = kills.age().as_millis() as u64, "exchange.kill_rules_stale");
    Err(ExchangeError::Unavailable("kill rules cannot be confirmed fresh; nothing was issued".into()))
}

/// The first limit of `limits` this exchange would pass: the error, the reason for the audit
/// trail and the limit's name. `max_active` is read first (it charges nothing), then the rates,
/// the identity's before the capability's.
async fn over_limit(
    app: &App,
    capability: &str,
    subject: &KillSubject,
    limits: &Limits,
    now: DateTime<Utc>,
) -> Result<Option<(ExchangeError, String, &'static str)>, ExchangeError> {
    if let Some(max) = limits.max_active {
        let live = app
            .ledger
            .live_count(&subject.agent, subject.repository.as_deref(), now)
            .await
            .map_err(|e| unavailable(&e))?;
        if live.exchanges >= u64::from(max) {
            // The first of them to end frees a place.
            let wait = live.first_end.and_then(|t| (t - now).to_std().ok()).unwrap_or_default();
            let reason = format!("limit max_active {max}: {} live exchanges", live.exchanges);
            return Ok(Some((slow_down(wait), reason, "max_active")));
        }
    }
    let repository = subject.repository.as_deref().unwrap_or("");
    let buckets = [
        (
            "per_identity",
            limits.per_identity,
            format!("identity\u{1f}{capability}\u{1f}{}\u{1f}{repository}", subject.agent),
        ),
        ("per_capability", limits.per_capability, format!("capability\u{1f}{capability}")),
    ];
    for (name, rate, key) in buckets {
        let Some(rate) = rate else { continue };
        let wait =
            app.ledger.take_rate(&key, now, rate.interval(), rate.tolerance()).await.map_err(|e| unavailable(&e))?;
        if let Some(wait) = wait {
            return Ok(Some((slow_down(wait), format!("limit {name} {rate}"), name)));
        }
    }
    Ok(None)
}

/// A place among the backend's calls in flight (`[limits] backend_concurrency`). Waiting is
/// bounded by the outbound timeout: a backend that is slow for everyone fails its own exchanges
/// with 503 instead of piling them up.
async fn backend_slot(app: &App, kind: BackendKind) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, BackendError> {
    let Some(slots) = app.backend_slots.get(&kind) else { return Ok(None) };
    match tokio::time::timeout(app.config.limits.outbound_timeout, slots.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(Some(permit)),
        _ => Err(BackendError::Unavailable {
            backend: kind,
            message: format!(
                "{} calls already in flight; none finished in time",
                app.config.limits.backend_concurrency
            ),
        }),
    }
}

/// A limit's refusal: the caller learns how long to wait, never which limit of which policy.
fn slow_down(wait: std::time::Duration) -> ExchangeError {
    ExchangeError::SlowDown {
        message: "too many exchanges for this identity; retry later".into(),
        retry_after: wait.max(std::time::Duration::from_secs(1)),
    }
}

/// How long an exchange waits to re-read stale kill rules before it fails closed.
const KILL_REFRESH_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

fn unavailable(e: &crate::ledger::LedgerError) -> ExchangeError {
    tracing::error!(error = %e, "ledger unavailable");
    ExchangeError::Unavailable("the credential store is unavailable; nothing was issued".into())
}

fn to_chrono(d: std::time::Duration) -> chrono::Duration {
    // Policy TTLs are at most 12 h, far inside chrono's range.
    chrono::Duration::from_std(d).unwrap_or(chrono::Duration::hours(12))
}

fn labels(capability: &str, decision: &str) -> ExchangeLabels {
    ExchangeLabels { capability: capability.to_owned(), decision: decision.to_owned() }
}

/// 256 random bits for the caller, and the SHA-256 the ledger keeps.
fn new_release_token() -> (SecretString, String) {
    use base64::Engine;
    use sha2::Digest;
    let mut raw = [0u8; 32];
    aws_lc_rs::rand::fill(&mut raw).expect("the system random source works");
    let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    let hash = hex::encode(sha2::Sha256::digest(token.as_bytes()));
    (token.into(), hash)
}

pub(crate) fn kill_subject(claims: &VerifiedClaims, agent: &str, capability: &str) -> KillSubject {
    claims_kill_subject(claims.claims(), agent, capability)
}

/// What kill selectors are matched against, for claims that were not (or not yet) verified:
/// `/v1/explain` asks whether a rule would block them.
pub(crate) fn claims_kill_subject(claims: &crate::oidc::Claims, agent: &str, capability: &str) -> KillSubject {
    KillSubject {
        agent: agent.to_owned(),
        capability: capability.to_owned(),
        issuer: claims.issuer.clone(),
        subject: claims.subject.clone(),
        repository: claims.repository.clone(),
        workflow: claims.workflow.clone(),
        claims: claims.claims.clone(),
        credentials: Vec::new(),
    }
}

/// The audit event of an exchange, with the identity fields filled from its row.
fn exchange_event(name: &str, row: &ExchangeRow, now: DateTime<Utc>) -> AuditEvent {
    let mut e = AuditEvent::new(name, now);
    e.request_id = Some(row.request_id.clone());
    e.actor = row.subject.clone();
    e.exchange_id = Some(row.id.to_string());
    e.issuer = row.issuer.clone();
    e.subject = row.subject.clone();
    e.repository = row.repository.clone();
    e.workflow = row.workflow.clone();
    // GitHub Actions' `run_id`, GitLab's `pipeline_id`.
    e.run_id = ["run_id", "pipeline_id"].iter().find_map(|k| row.claims.get(*k).and_then(crate::policy::claim_text));
    e.capability = row.capability.clone();
    e.agent = row.agent.clone();
    e.policy_hash = row.policy_sha256.clone();
    e
}

impl ExchangeRow {
    fn started(req: &ExchangeRequest, now: DateTime<Utc>) -> ExchangeRow {
        ExchangeRow {
            id: Uuid::now_v7(),
            request_id: req.request_id.clone(),
            created_at: now,
            state: ExchangeState::Pending,
            error: None,
            reason: None,
            issuer: None,
            subject: None,
            repository: None,
            workflow: None,
            capability: Some(req.capability.clone()),
            agent: None,
            claims: Value::Null,
            trace: Value::Array(Vec::new()),
            policy_sha256: None,
            release_token_sha256: None,
            expires_at: None,
        }
    }

    fn identify(&mut self, claims: &VerifiedClaims) {
        self.issuer = Some(claims.issuer.clone());
        self.subject = Some(claims.subject.clone());
        self.repository = claims.repository.clone();
        self.workflow = claims.workflow.clone();
        self.claims = Value::Object(claims.claims().claims.clone());
    }

    fn pending_credential(&self, grant: &AuthorizedGrant, now: DateTime<Utc>) -> CredentialRow {
        CredentialRow {
            id: Uuid::now_v7(),
            exchange_id: self.id,
            name: grant.name.clone(),
            backend: grant.spec.backend(),
            state: CredentialState::Pending,
            agent: self.agent.clone().unwrap_or_default(),
            capability: self.capability.clone().unwrap_or_default(),
            issuer: self.issuer.clone().unwrap_or_default(),
            subject: self.subject.clone().unwrap_or_default(),
            repository: self.repository.clone(),
            workflow: self.workflow.clone(),
            created_at: now,
            expires_at: now + to_chrono(grant.ttl),
            fingerprint: None,
            handle: None,
            revoke_requested: false,
            revoked_at: None,
        }
    }
}
