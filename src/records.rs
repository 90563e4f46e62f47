//! What auditors read: credentials, exchanges and audit events, filtered and paged.
//!
//! The HTTP layer hands the raw query string's fields here and maps [`RecordsError`]; nothing
//! here knows about HTTP. No listing ever carries a secret: credential handles stay in the store
//! and release tokens are not even shown as their hash.
//!
//! Paging: credentials and exchanges come newest first with a cursor `<created_at>~<id>` of the
//! last row shown, events oldest first with the sequence number of the last event shown. Rows are
//! only ever appended and a page is "rows strictly beyond the cursor", so a page never shifts
//! while new rows arrive.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::app::App;
use crate::audit::StoredEvent;
use crate::ledger::{
    CredentialQuery, CredentialRow, CredentialState, EventQuery, ExchangeQuery, ExchangeRow, ExchangeState,
    LedgerError, StateFilter,
};
use crate::policy::BackendKind;

pub const DEFAULT_LIMIT: usize = 100;
pub const MAX_LIMIT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// A filter, cursor or limit that does not parse.
    #[error("{0}")]
    Invalid(String),
    #[error("the store is unavailable: {0}")]
    Unavailable(#[from] LedgerError),
}

fn invalid(m: impl Into<String>) -> RecordsError {
    RecordsError::Invalid(m.into())
}

/// One page of a listing.
#[derive(Debug, Clone, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

/// `since`/`until`: an RFC 3339 time, or a duration (`7d`, `90m`) meaning that long before now.
pub fn parse_time(field: &str, text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, RecordsError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| invalid(format!("{field} must be an RFC 3339 time or a duration such as 7d")))?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|d| now.checked_sub_signed(d))
        .ok_or_else(|| invalid(format!("{field} is too far in the past")))
}

fn opt_time(field: &str, text: Option<&str>, now: DateTime<Utc>) -> Result<Option<DateTime<Utc>>, RecordsError> {
    text.filter(|t| !t.is_empty()).map(|t| parse_time(field, t, now)).transpose()
}

fn limit(l: Option<usize>) -> Result<usize, RecordsError> {
    match l {
        None => Ok(DEFAULT_LIMIT),
        Some(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(invalid(format!("limit must be between 1 and {MAX_LIMIT}"))),
    }
}

fn encode_cursor(at: DateTime<Utc>, id: Uuid) -> String {
    format!("{}~{id}", crate::audit::format_time(at))
}

fn decode_cursor(cursor: Option<&str>) -> Result<Option<(DateTime<Utc>, Uuid)>, RecordsError> {
    let Some(cursor) = cursor.filter(|c| !c.is_empty()) else { return Ok(None) };
    let bad = || invalid("cursor is not one this server issued");
    let (at, id) = cursor.split_once('~').ok_or_else(bad)?;
    let at = DateTime::parse_from_rfc3339(at).map_err(|_| bad())?.with_timezone(&Utc);
    Ok(Some((at, Uuid::parse_str(id).map_err(|_| bad())?)))
}

fn backend(text: Option<&str>) -> Result<Option<BackendKind>, RecordsError> {
    text.filter(|t| !t.is_empty())
        .map(|t| {
            serde_json::from_value(Value::String(t.to_owned()))
                .map_err(|_| invalid(format!("backend {t:?} is not one of github, aws, vault, jwt")))
        })
        .transpose()
}

fn nonempty(s: Option<String>) -> Option<String> {
    s.filter(|s| !s.is_empty())
}

/// `GET /v1/credentials` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialFilters {
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub subject: Option<String>,
    pub backend: Option<String>,
    /// `pending`, `active`, `revoked`, `expired`, `failed`, or `live` (pending or active, and
    /// not past its expiry).
    pub state: Option<String>,
    pub exchange: Option<Uuid>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// A credential as auditors see it: where it came from, where it stands; never a secret.
#[derive(Debug, Clone, Serialize)]
pub struct CredentialView {
    pub id: Uuid,
    pub exchange_id: Uuid,
    pub name: String,
    pub backend: BackendKind,
    pub state: CredentialState,
    /// Pending or active and not past `expires_at`: usable, as far as latchkey knows.
    pub live: bool,
    pub agent: String,
    pub capability: String,
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub created_at: String,
    pub expires_at: String,
    pub revoked_at: Option<String>,
    /// SHA-256 of the secret, base64: matches GitHub's `hashed_token`.
    pub fingerprint: Option<String>,
    pub revoke_requested: bool,
}

impl CredentialView {
    fn new(r: CredentialRow, now: DateTime<Utc>) -> Self {
        let live = matches!(r.state, CredentialState::Pending | CredentialState::Active) && r.expires_at > now;
        CredentialView {
            id: r.id,
            exchange_id: r.exchange_id,
            name: r.name,
            backend: r.backend,
            state: r.state,
            live,
            agent: r.agent,
            capability: r.capability,
            issuer: r.issuer,
            subject: r.subject,
            repository: r.repository,
            workflow: r.workflow,
            created_at: crate::audit::format_time(r.created_at),
            expires_at: crate::audit::format_time(r.expires_at),
            revoked_at: r.revoked_at.map(crate::audit::format_time),
            fingerprint: r.fingerprint,
            revoke_requested: r.revoke_requested,
        }
    }
}

fn credential_state(text: &str) -> Result<StateFilter, RecordsError> {
    Ok(match text {
        "live" => StateFilter::Live,
        "pending" => StateFilter::Is(CredentialState::Pending),
        "active" => StateFilter::Is(CredentialState::Active),
        "revoked" => StateFilter::Is(CredentialState::Revoked),
        "expired" => StateFilter::Is(CredentialState::Expired),
        "failed" => StateFilter::Is(CredentialState::Failed),
        other => {
            return Err(invalid(format!(
                "state {other:?} is not one of live, pending, active, revoked, expired, failed"
            )));
        }
    })
}

/// `GET /v1/credentials`.
pub async fn credentials(app: &App, f: CredentialFilters) -> Result<Page<CredentialView>, RecordsError> {
    let now = app.clock.now();
    let limit = limit(f.limit)?;
    let q = CredentialQuery {
        before: decode_cursor(f.cursor.as_deref())?,
        agent: nonempty(f.agent),
        capability: nonempty(f.capability),
        repository: nonempty(f.repository),
        workflow: nonempty(f.workflow),
        subject: nonempty(f.subject),
        backend: backend(f.backend.as_deref())?,
        exchange: f.exchange,
        state: f.state.as_deref().filter(|s| !s.is_empty()).map(credential_state).transpose()?,
        now: Some(now),
        since: opt_time("since", f.since.as_deref(), now)?,
        until: opt_time("until", f.until.as_deref(), now)?,
        limit,
    };
    let rows = app.ledger.list_credentials(q).await?;
    let next_cursor = (rows.len() == limit).then(|| rows.last().map(|r| encode_cursor(r.created_at, r.id))).flatten();
    Ok(Page { items: rows.into_iter().map(|r| CredentialView::new(r, now)).collect(), next_cursor })
}

/// `GET /v1/exchanges` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExchangeFilters {
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    /// `allowed`, `denied`, `failed` or `pending`.
    pub decision: Option<String>,
    /// Exchanges that issued (or tried to issue) a credential of this backend.
    pub backend: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    pub cursor: Option<String>,
}

/// An exchange as auditors see it: the decision, its full reason and trace, the policy hash.
#[derive(Debug, Clone, Serialize)]
pub struct ExchangeView {
    pub id: Uuid,
    pub request_id: String,
    pub created_at: String,
    pub decision: ExchangeState,
    /// The RFC 6749 error code the caller got.
    pub error: Option<String>,
    /// The full reason, which the caller did not get.
    pub reason: Option<String>,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub run_id: Option<String>,
    pub capability: Option<String>,
    pub agent: Option<String>,
    pub policy_sha256: Option<String>,
    pub expires_at: Option<String>,
    /// Every rule the decision went through.
    pub trace: Value,
    /// The verified claims of the subject token (`null` when it was rejected).
    pub claims: Value,
}

impl From<ExchangeRow> for ExchangeView {
    fn from(r: ExchangeRow) -> Self {
        // As the audit events name it: GitHub Actions' `run_id`, GitLab's `pipeline_id`.
        let run_id =
            ["run_id", "pipeline_id"].iter().find_map(|k| r.claims.get(*k).and_then(crate::policy::claim_text));
        ExchangeView {
            id: r.id,
            request_id: r.request_id,
            created_at: crate::audit::format_time(r.created_at),
            decision: r.state,
            error: r.error,
            reason: r.reason,
            issuer: r.issuer,
            subject: r.subject,
            repository: r.repository,
            workflow: r.workflow,
            run_id,
            capability: r.capability,
            agent: r.agent,
            policy_sha256: r.policy_sha256,
            expires_at: r.expires_at.map(crate::audit::format_time),
            trace: r.trace,
            claims: r.claims,
        }
    }
}

fn decision(text: &str) -> Result<ExchangeState, RecordsError> {
    Ok(match text {
        "allowed" => ExchangeState::Allowed,
        "denied" => ExchangeState::Denied,
        "failed" => ExchangeState::Failed,
        "pending" => ExchangeState::Pending,
        other => return Err(invalid(format!("decision {other:?} is not one of allowed, denied, failed, pending"))),
    })
}

/// `GET /v1/exchanges`.
pub async fn exchanges(app: &App, f: ExchangeFilters) -> Result<Page<ExchangeView>, RecordsError> {
    let now = app.clock.now();
    let limit = limit(f.limit)?;
    let q = ExchangeQuery {
        before: decode_cursor(f.cursor.as_deref())?,
        agent: nonempty(f.agent),
        capability: nonempty(f.capability),
        repository: nonempty(f.repository),
        workflow: nonempty(f.workflow),
        subject: nonempty(f.subject),
        issuer: nonempty(f.issuer),
        decision: f.decision.as_deref().filter(|s| !s.is_empty()).map(decision).transpose()?,
        backend: backend(f.backend.as_deref())?,
        since: opt_time("since", f.since.as_deref(), now)?,
        until: opt_time("until", f.until.as_deref(), now)?,
        limit,
    };
    let rows = app.ledger.list_exchanges(q).await?;
    let next_cursor = (rows.len() == limit).then(|| rows.last().map(|r| encode_cursor(r.created_at, r.id))).flatten();
    Ok(Page { items: rows.into_iter().map(ExchangeView::from).collect(), next_cursor })
}

/// `GET /v1/audit` query.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilters {
    /// An event name, or a prefix ending in `*` (`kill.*`).
    pub event: Option<String>,
    /// `admin-key:<name>`, `system`, or a token subject.
    pub actor: Option<String>,
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub subject: Option<String>,
    pub credential: Option<String>,
    pub since: Option<String>,
    pub until: Option<String>,
    pub limit: Option<usize>,
    /// The sequence number of the last event seen.
    pub cursor: Option<String>,
}

/// An event with its place in the chain: the item of `GET /v1/audit` and a line of the stream.
#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub seq: i64,
    pub hash: String,
    pub prev_hash: String,
    pub event: Value,
}

impl From<&StoredEvent> for EventView {
    fn from(e: &StoredEvent) -> Self {
        EventView {
            seq: e.seq,
            hash: e.hash.clone(),
            prev_hash: e.prev_hash.clone(),
            event: serde_json::from_str(&e.body).unwrap_or(Value::Null),
        }
    }
}

/// A page of events, and the chain head seen before the page was read.
#[derive(Debug, Clone, Serialize)]
pub struct EventPage {
    pub items: Vec<EventView>,
    pub next_cursor: Option<String>,
    /// The last sequence number of the chain when the read began. When `next_cursor` is `null`,
    /// every matching event up to here was in `items`, so a follower resumes from the larger of
    /// this and the last item's `seq` instead of scanning again what matched nothing.
    pub head_seq: i64,
}

/// `GET /v1/audit`: `next_cursor` is the last event's sequence number when the page is full.
pub async fn events(app: &App, f: EventFilters) -> Result<EventPage, RecordsError> {
    let now = app.clock.now();
    let limit = limit(f.limit)?;
    let after = match f.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => c.parse::<i64>().map_err(|_| invalid("cursor must be a sequence number"))?,
    };
    let q = EventQuery {
        after,
        event: nonempty(f.event),
        actor: nonempty(f.actor),
        agent: nonempty(f.agent),
        capability: nonempty(f.capability),
        repository: nonempty(f.repository),
        subject: nonempty(f.subject),
        credential: nonempty(f.credential),
        since: opt_time("since", f.since.as_deref(), now)?,
        until: opt_time("until", f.until.as_deref(), now)?,
        limit,
    };
    let (head_seq, _) = app.ledger.audit_head().await?;
    let rows = app.ledger.list_events(q).await?;
    let next_cursor = if rows.len() == limit { rows.last().map(|e| e.seq.to_string()) } else { None };
    Ok(EventPage { items: rows.iter().map(EventView::from).collect(), next_cursor, head_seq })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_a_duration_ago() {
        let now = DateTime::parse_from_rfc3339("2025-01-08T00:00:00Z").unwrap().with_timezone(&Utc);
        assert_eq!(parse_time("since", "7d", now).unwrap().to_rfc3339(), "2025-01-01T00:00:00+00:00");
        assert_eq!(parse_time("since", "2025-01-02T03:04:05Z", now).unwrap().to_rfc3339(), "2025-01-02T03:04:05+00:00");
        assert!(parse_time("since", "last week", now).is_err());
    }

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        let id = Uuid::now_v7();
        let at = Utc::now();
        let (t, i) = decode_cursor(Some(&encode_cursor(at, id))).unwrap().unwrap();
        assert_eq!((crate::audit::format_time(t), i), (crate::audit::format_time(at), id));
        assert!(decode_cursor(Some("42")).is_err());
        assert!(decode_cursor(Some("")).unwrap().is_none());
    }

    #[test]
    fn limits_are_bounded_and_states_named() {
        assert_eq!(limit(None).unwrap(), DEFAULT_LIMIT);
        assert!(limit(Some(0)).is_err());
        assert!(limit(Some(MAX_LIMIT + 1)).is_err());
        assert_eq!(credential_state("live").unwrap(), StateFilter::Live);
        assert!(credential_state("alive").is_err());
        assert!(decision("maybe").is_err());
        assert!(backend(Some("gcp")).is_err());
    }
}
