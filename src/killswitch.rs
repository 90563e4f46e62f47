//! The kill-switch operations: create (or dry-run) a kill rule, list and show rules with their
//! revocation reports, lift a rule, and revoke one credential on request.
//!
//! The HTTP layer parses a request, calls one function here and maps [`KillSwitchError`] to a
//! status; nothing here knows about HTTP. Every change is written together with its audit event
//! by the ledger, in one transaction.
//!
//! Invariant: when [`create`] returns, the rule is in force on this replica. It is committed
//! under the kill lock shared with activation (DESIGN step 7), so no exchange can activate past
//! it on any replica; and the in-memory rules of step 3 are re-read before answering, so this
//! replica refuses the identity at once instead of at its next refresh.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::app::App;
use crate::audit::{AuditEvent, format_time};
use crate::kill::{KillRule, Selector};
use crate::ledger::{
    CredentialState, KillPage, KillTarget, LedgerError, LiveCredential, NewJob, RevokeRequest, StoredKill,
};

/// Reasons longer than this are refused: a reason is a sentence for the audit trail.
const MAX_REASON: usize = 1000;
/// The longest `expires_in`: a rule meant to stand longer should simply not expire.
const MAX_EXPIRES_IN: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 3600);
/// Listing page sizes.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum KillSwitchError {
    /// The request is malformed or names something that does not exist in a body field.
    #[error("{0}")]
    Invalid(String),
    /// The rule or credential named in the path does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The change is not possible in the current state (a rule already lifted).
    #[error("{0}")]
    Conflict(String),
    /// The store failed; nothing is known to have changed.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

impl KillSwitchError {
    fn from_ledger(e: LedgerError, what: &str) -> Self {
        match e {
            LedgerError::NotFound => KillSwitchError::NotFound(format!("no {what}")),
            LedgerError::Conflict(m) => KillSwitchError::Conflict(m),
            other => KillSwitchError::Unavailable(other.to_string()),
        }
    }
}

/// Who asks: the admin key's name and the request, for the rule and the audit trail.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub key_name: &'a str,
    /// How the audit trail names the caller: `admin-key:<name>` or `oidc:<sub>`.
    pub actor: &'a str,
    pub request_id: &'a str,
}

impl Caller<'_> {
    fn event(&self, name: &str, now: DateTime<Utc>) -> AuditEvent {
        let mut e = AuditEvent::new(name, now);
        e.actor = Some(self.actor.to_owned());
        e.request_id = Some(self.request_id.to_owned());
        e
    }
}

/// `POST /v1/kills`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KillRequest {
    pub selector: Selector,
    pub reason: String,
    #[serde(default)]
    pub dry_run: bool,
    /// A duration such as `2h`, after which the rule lapses by itself.
    #[serde(default)]
    pub expires_in: Option<String>,
}

/// `POST /v1/kills/{id}/lift` and `POST /v1/credentials/{id}/revoke`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// Where one backend's (or all backends') credentials stand after a kill.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Credentials the rule reached: active ones it gave a revocation job, pending ones it marked.
    pub matched: u64,
    /// Revoked at their backend (or, for marked pending rows, never issued: their exchange was
    /// refused and revoked whatever it had minted).
    pub revoked: u64,
    /// Ended by their own expiry before revocation was needed: done, too.
    pub expired: u64,
    /// Revocation not finished yet (queued, or being retried with back-off).
    pub pending: u64,
    /// Revocation given up after its retries; the credential may still be usable until it
    /// expires. An operator must look.
    pub failed: u64,
}

impl Counts {
    fn add(&mut self, o: Outcome) {
        self.matched += 1;
        match o {
            Outcome::Revoked => self.revoked += 1,
            Outcome::Expired => self.expired += 1,
            Outcome::Pending => self.pending += 1,
            Outcome::Failed => self.failed += 1,
        }
    }
}

/// A kill rule's revocation progress, per backend and in total.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub backends: BTreeMap<String, Counts>,
    pub totals: Counts,
    /// What "revoked" means where it is not immediate, per backend.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notes: BTreeMap<String, String>,
}

/// AWS sessions cannot be revoked: "revoked" there means a deny is attached to the role, which
/// IAM enforces after a short delay.
const AWS_NOTE: &str = "deny attached to the role; IAM enforces it within seconds, occasionally longer";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Revoked,
    Expired,
    Pending,
    Failed,
}

/// How one reached credential counts. The credential's state comes first: whatever a job says,
/// a revoked or expired credential is done.
fn outcome(t: &KillTarget) -> Outcome {
    match t.state {
        CredentialState::Revoked | CredentialState::Failed => Outcome::Revoked,
        CredentialState::Expired => Outcome::Expired,
        CredentialState::Active | CredentialState::Pending => match t.job_outcome.as_deref() {
            Some("failed") => Outcome::Failed,
            Some("expired") => Outcome::Expired,
            _ => Outcome::Pending,
        },
    }
}

/// The revocation report of the credentials a rule reached.
pub fn report(targets: &[KillTarget]) -> Report {
    let mut r = Report::default();
    for t in targets {
        let o = outcome(t);
        r.backends.entry(t.backend.to_string()).or_default().add(o);
        r.totals.add(o);
    }
    if r.backends.get("aws").is_some_and(|c| c.revoked > 0) {
        r.notes.insert("aws".into(), AWS_NOTE.into());
    }
    r
}

/// What a dry run found, per backend: live credentials the selector matches now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MatchCounts {
    pub matched: u64,
    /// Would get a revocation job.
    pub active: u64,
    /// Would be marked so that their exchange can never activate them.
    pub pending: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DryRunReport {
    pub backends: BTreeMap<String, MatchCounts>,
    pub totals: MatchCounts,
}

fn dry_run_report(live: &[LiveCredential]) -> DryRunReport {
    let mut r = DryRunReport::default();
    for c in live {
        for counts in [r.backends.entry(c.backend.to_string()).or_default(), &mut r.totals] {
            counts.matched += 1;
            if c.state == CredentialState::Pending {
                counts.pending += 1;
            } else {
                counts.active += 1;
            }
        }
    }
    r
}

/// Where a rule stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleState {
    /// In force: matching exchanges are refused.
    Active,
    /// Lifted by an admin key.
    Lifted,
    /// Past its `expires_at`.
    Lapsed,
}

/// A rule as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KillView {
    pub id: Uuid,
    pub state: RuleState,
    pub selector: Selector,
    pub reason: String,
    pub created_at: String,
    pub created_by: String,
    pub expires_at: Option<String>,
    pub lifted_at: Option<String>,
    pub lifted_by: Option<String>,
    pub lift_reason: Option<String>,
    pub report: Report,
}

impl KillView {
    fn new(stored: StoredKill, targets: &[KillTarget], now: DateTime<Utc>) -> Self {
        let rule = stored.rule;
        let state = if rule.lifted_at.is_some() {
            RuleState::Lifted
        } else if rule.in_force(now) {
            RuleState::Active
        } else {
            RuleState::Lapsed
        };
        KillView {
            id: rule.id,
            state,
            selector: rule.selector,
            reason: rule.reason,
            created_at: format_time(rule.created_at),
            created_by: rule.created_by,
            expires_at: rule.expires_at.map(format_time),
            lifted_at: rule.lifted_at.map(format_time),
            lifted_by: stored.lifted_by,
            lift_reason: stored.lift_reason,
            report: report(targets),
        }
    }
}

/// What `POST /v1/kills` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Created {
    Rule(Box<KillView>),
    /// Nothing was written but the `kill.dry_run` audit event.
    DryRun(Box<DryRun>),
}

/// What a rule with this selector would reach now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DryRun {
    /// Always true: tells a dry run's answer from a rule's.
    pub dry_run: bool,
    pub selector: Selector,
    pub would_match: DryRunReport,
}

fn reason_of(reason: Option<&str>, required: bool) -> Result<Option<String>, KillSwitchError> {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty());
    match reason {
        None if required => Err(KillSwitchError::Invalid("reason is required and must not be empty".into())),
        Some(r) if r.chars().count() > MAX_REASON => {
            Err(KillSwitchError::Invalid(format!("reason is longer than {MAX_REASON} characters")))
        }
        r => Ok(r.map(str::to_owned)),
    }
}

/// Creates a kill rule, or reports what it would match.
pub async fn create(app: &App, req: KillRequest, caller: Caller<'_>) -> Result<Created, KillSwitchError> {
    let now = app.clock.now();
    let reason = reason_of(Some(&req.reason), true)?.unwrap_or_default();
    req.selector.validate().map_err(|e| KillSwitchError::Invalid(e.to_string()))?;
    let expires_at = match req.expires_in.as_deref() {
        None => None,
        Some(text) => {
            let d = humantime::parse_duration(text)
                .map_err(|e| KillSwitchError::Invalid(format!("expires_in {text:?} is not a duration: {e}")))?;
            if d.is_zero() || d > MAX_EXPIRES_IN {
                return Err(KillSwitchError::Invalid("expires_in must be more than 0 and at most 366 days".into()));
            }
            Some(now + chrono::Duration::from_std(d).map_err(|e| KillSwitchError::Invalid(e.to_string()))?)
        }
    };
    // A rule naming a credential that never existed is a typo; refusing it beats a rule that
    // silently matches nothing.
    if let Some(cid) = req.selector.credential {
        let found = app.ledger.credential(cid).await.map_err(|e| KillSwitchError::Unavailable(e.to_string()))?;
        if found.is_none() {
            return Err(KillSwitchError::Invalid(format!("selector.credential: no credential has the id {cid}")));
        }
    }

    if req.dry_run {
        let live =
            app.ledger.kill_matches(&req.selector).await.map_err(|e| KillSwitchError::Unavailable(e.to_string()))?;
        let would_match = dry_run_report(&live);
        let mut event = caller.event("kill.dry_run", now);
        event.reason = Some(reason);
        event.detail = Some(json!({ "selector": req.selector, "would_match": would_match }));
        app.ledger.append_event(event).await.map_err(|e| KillSwitchError::Unavailable(e.to_string()))?;
        return Ok(Created::DryRun(Box::new(DryRun { dry_run: true, selector: req.selector, would_match })));
    }

    let rule = KillRule {
        id: Uuid::now_v7(),
        selector: req.selector,
        reason: reason.clone(),
        created_at: now,
        created_by: caller.key_name.to_owned(),
        expires_at,
        lifted_at: None,
    };
    let mut event = caller.event("kill.created", now);
    event.reason = Some(reason);
    event.expiry = expires_at.map(format_time);
    event.detail = Some(json!({ "kill_id": rule.id, "selector": rule.selector }));
    let effect = app.ledger.create_kill(&rule, event).await.map_err(|e| KillSwitchError::from_ledger(e, "rule"))?;
    // Effective here before the answer: step 3 reads the in-memory rules.
    if let Err(e) = crate::worker::refresh_kills(app).await {
        // The rule is committed, and step 7 enforces it from the store; only the early, in-memory
        // refusal waits for the next refresh.
        tracing::warn!(error = %e, kill_id = %rule.id, "could not refresh the kill rules after a kill");
    }
    // Revocations start now, not at the worker's next tick.
    app.jobs_wake.notify_one();
    tracing::info!(
        kill_id = %rule.id, admin = caller.key_name, pending_marked = effect.pending_marked.len(),
        jobs = effect.jobs.len(), "kill.created"
    );
    show_rule(app, StoredKill { rule, lifted_by: None, lift_reason: None }, now)
        .await
        .map(|v| Created::Rule(Box::new(v)))
}

async fn show_rule(app: &App, stored: StoredKill, now: DateTime<Utc>) -> Result<KillView, KillSwitchError> {
    let targets =
        app.ledger.kill_targets(stored.rule.id).await.map_err(|e| KillSwitchError::Unavailable(e.to_string()))?;
    Ok(KillView::new(stored, &targets, now))
}

/// `GET /v1/kills/{id}`.
pub async fn show(app: &App, id: Uuid) -> Result<KillView, KillSwitchError> {
    let stored = app
        .ledger
        .kill_rule(id)
        .await
        .map_err(|e| KillSwitchError::Unavailable(e.to_string()))?
        .ok_or_else(|| KillSwitchError::NotFound(format!("no kill rule has the id {id}")))?;
    show_rule(app, stored, app.clock.now()).await
}

/// The query of `GET /v1/kills`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    pub limit: Option<usize>,
    pub cursor: Option<String>,
    /// RFC 3339; rules created at or after.
    pub since: Option<String>,
    /// RFC 3339; rules created before.
    pub until: Option<String>,
}

/// One page of rules, oldest first, and the cursor of the next page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page {
    pub items: Vec<KillView>,
    pub next_cursor: Option<String>,
}

fn parse_time(field: &str, text: &str) -> Result<DateTime<Utc>, KillSwitchError> {
    DateTime::parse_from_rfc3339(text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| KillSwitchError::Invalid(format!("{field} must be an RFC 3339 time")))
}

/// Cursors are `<created_at>~<id>` of the last rule seen: opaque to callers, stable because rules
/// are only appended and never deleted.
fn encode_cursor(view: &KillView) -> String {
    format!("{}~{}", view.created_at, view.id)
}

fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid), KillSwitchError> {
    let bad = || KillSwitchError::Invalid("cursor is not one this server issued".into());
    let (at, id) = cursor.split_once('~').ok_or_else(bad)?;
    let at = DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.with_timezone(&Utc);
    Ok((at, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// `GET /v1/kills`.
pub async fn list(app: &App, q: ListQuery) -> Result<Page, KillSwitchError> {
    let now = app.clock.now();
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let page = KillPage {
        after: q.cursor.as_deref().filter(|c| !c.is_empty()).map(decode_cursor).transpose()?,
        since: q.since.as_deref().map(|t| parse_time("since", t)).transpose()?,
        until: q.until.as_deref().map(|t| parse_time("until", t)).transpose()?,
        limit,
    };
    let rules = app.ledger.kill_rules(page).await.map_err(|e| KillSwitchError::Unavailable(e.to_string()))?;
    let full = rules.len() == limit;
    let mut items = Vec::with_capacity(rules.len());
    for stored in rules {
        items.push(show_rule(app, stored, now).await?);
    }
    let next_cursor = if full { items.last().map(encode_cursor) } else { None };
    Ok(Page { items, next_cursor })
}

/// `POST /v1/kills/{id}/lift`: new exchanges go through again; nothing is un-revoked.
pub async fn lift(app: &App, id: Uuid, req: ReasonRequest, caller: Caller<'_>) -> Result<KillView, KillSwitchError> {
    let now = app.clock.now();
    let reason = reason_of(req.reason.as_deref(), true)?.unwrap_or_default();
    let mut event = caller.event("kill.lifted", now);
    event.reason = Some(reason.clone());
    event.detail = Some(json!({ "kill_id": id }));
    let lifted = app
        .ledger
        .lift_kill(id, now, caller.key_name, &reason, event)
        .await
        .map_err(|e| KillSwitchError::from_ledger(e, &format!("kill rule has the id {id}")))?;
    if let Err(e) = crate::worker::refresh_kills(app).await {
        tracing::warn!(error = %e, kill_id = %id, "could not refresh the kill rules after a lift");
    }
    show_rule(app, lifted, now).await
}

/// What `POST /v1/credentials/{id}/revoke` answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RevokeAnswer {
    pub credential_id: Uuid,
    /// The credential's state now (`active` until its revocation job has run).
    pub state: CredentialState,
    /// `queued` (a revocation job was enqueued), `already_queued`, `marked` (a pending
    /// credential that can no longer become active) or `none` (it had already ended).
    pub revocation: &'static str,
    pub message: String,
}

impl RevokeAnswer {
    /// Whether anything is still to happen (the HTTP layer answers 202 then, else 200).
    pub fn accepted(&self) -> bool {
        self.revocation != "none"
    }
}

/// Revokes one credential: a `Revoke` job for an active one, a mark on a pending one.
pub async fn revoke_credential(
    app: &App,
    id: Uuid,
    req: ReasonRequest,
    caller: Caller<'_>,
) -> Result<RevokeAnswer, KillSwitchError> {
    let now = app.clock.now();
    let reason = reason_of(req.reason.as_deref(), false)?;
    let credential = app
        .ledger
        .credential(id)
        .await
        .map_err(|e| KillSwitchError::Unavailable(e.to_string()))?
        .ok_or_else(|| KillSwitchError::NotFound(format!("no credential has the id {id}")))?;
    let mut event = caller.event("credential.revoke_requested", now);
    event.reason = reason;
    event.credential_id = Some(id.to_string());
    event.exchange_id = Some(credential.exchange_id.to_string());
    event.backend = Some(credential.backend.to_string());
    event.agent = Some(credential.agent.clone());
    event.capability = Some(credential.capability.clone());
    event.subject = Some(credential.subject.clone());
    event.repository = credential.repository.clone();
    event.fingerprint = credential.fingerprint.clone();
    let job = NewJob::revoke(&credential, now);
    let done = app
        .ledger
        .request_revoke(job, event)
        .await
        .map_err(|e| KillSwitchError::from_ledger(e, &format!("credential has the id {id}")))?;
    let (state, revocation, message) = match done {
        RevokeRequest::Queued => {
            app.jobs_wake.notify_one();
            (CredentialState::Active, "queued", "revocation queued".to_owned())
        }
        RevokeRequest::AlreadyQueued => {
            app.jobs_wake.notify_one();
            (CredentialState::Active, "already_queued", "a revocation was already queued".to_owned())
        }
        RevokeRequest::Marked => (
            CredentialState::Pending,
            "marked",
            "the credential is still being issued; its exchange will be refused and revoke it".to_owned(),
        ),
        RevokeRequest::Finished(s) => (s, "none", format!("the credential is already {}; nothing changed", s.as_str())),
    };
    Ok(RevokeAnswer { credential_id: id, state, revocation, message })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::BackendKind;

    fn target(backend: BackendKind, state: CredentialState, job_outcome: Option<&str>) -> KillTarget {
        KillTarget {
            credential_id: Uuid::now_v7(),
            backend,
            state,
            has_job: true,
            job_outcome: job_outcome.map(str::to_owned),
        }
    }

    #[test]
    fn the_report_counts_each_credential_once_by_its_state_first() {
        let r = report(&[
            target(BackendKind::Jwt, CredentialState::Revoked, Some("revoked")),
            target(BackendKind::Jwt, CredentialState::Expired, Some("expired")),
            // The TTL job expired it while the kill's job was still queued.
            target(BackendKind::Jwt, CredentialState::Expired, None),
            target(BackendKind::Vault, CredentialState::Active, None),
            target(BackendKind::Vault, CredentialState::Active, Some("failed")),
            // A marked pending row whose exchange was refused.
            target(BackendKind::Vault, CredentialState::Failed, None),
        ]);
        assert_eq!(r.backends["jwt"], Counts { matched: 3, revoked: 1, expired: 2, pending: 0, failed: 0 });
        assert_eq!(r.backends["vault"], Counts { matched: 3, revoked: 1, expired: 0, pending: 1, failed: 1 });
        assert_eq!(r.totals, Counts { matched: 6, revoked: 2, expired: 2, pending: 1, failed: 1 });
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let at = Utc::now();
        let id = Uuid::now_v7();
        let view = KillView {
            id,
            state: RuleState::Active,
            selector: Selector { all: true, ..Default::default() },
            reason: "r".into(),
            created_at: format_time(at),
            created_by: "k".into(),
            expires_at: None,
            lifted_at: None,
            lifted_by: None,
            lift_reason: None,
            report: Report::default(),
        };
        let (t, i) = decode_cursor(&encode_cursor(&view)).unwrap();
        assert_eq!((format_time(t), i), (view.created_at.clone(), id));
        assert!(decode_cursor("42").is_err());
        assert!(decode_cursor("yesterday~x").is_err());
    }

    #[test]
    fn a_reason_is_trimmed_and_required_where_it_must_be() {
        assert!(reason_of(Some("  "), true).is_err());
        assert!(reason_of(None, true).is_err());
        assert_eq!(reason_of(None, false).unwrap(), None);
        assert_eq!(reason_of(Some(" leaked token "), true).unwrap().as_deref(), Some("leaked token"));
        assert!(reason_of(Some(&"x".repeat(MAX_REASON + 1)), true).is_err());
    }
}
