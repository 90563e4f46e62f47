//! The ledger: exchanges, credentials, kill rules, jobs and the audit chain.
//!
//! One [`Ledger`] trait, one implementation per store, chosen at start-up from the store URL.
//! Every method that changes state also takes the audit event(s) that record the change and
//! writes them in the same transaction, so the audit chain can never disagree with the data.

mod command;
pub mod postgres;
mod rows;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::audit::{AuditEvent, StoredEvent};
use crate::kill::{KillRule, KillSubject};
use crate::policy::BackendKind;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store cannot be reached or refused the write (disk full, read-only, locked).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The schema is older or newer than this binary; run `latchkey migrate`.
    #[error("{0}")]
    Schema(String),
    #[error("not found")]
    NotFound,
    /// A state transition that the row's current state does not allow.
    #[error("conflict: {0}")]
    Conflict(String),
    /// Stored data that cannot be read back (a corrupt row, an unparsable column).
    #[error("corrupt store data: {0}")]
    Corrupt(String),
}

/// Where an exchange stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExchangeState {
    /// Intent recorded, minting under way (or interrupted by a crash).
    Pending,
    /// Credentials issued.
    Allowed,
    /// Refused: no policy, a kill rule, or a rejected subject token.
    Denied,
    /// A backend failed; everything minted was revoked.
    Failed,
}

impl ExchangeState {
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeState::Pending => "pending",
            ExchangeState::Allowed => "allowed",
            ExchangeState::Denied => "denied",
            ExchangeState::Failed => "failed",
        }
    }
}

/// One exchange request and its decision. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRow {
    pub id: Uuid,
    pub request_id: String,
    pub created_at: DateTime<Utc>,
    pub state: ExchangeState,
    /// The RFC 6749 error code for refusals (`access_denied`, `invalid_grant`, …), else empty.
    pub error: Option<String>,
    /// The full reason, for auditors: never shown to the caller.
    pub reason: Option<String>,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub capability: Option<String>,
    pub agent: Option<String>,
    /// The verified claims (JSON object), or `null` when the token was rejected.
    pub claims: Value,
    /// The decision trace (JSON array of [`crate::policy::TraceStep`]).
    pub trace: Value,
    pub policy_sha256: Option<String>,
    /// Hex SHA-256 of the release token; the token itself is never stored.
    pub release_token_sha256: Option<String>,
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialState {
    Pending,
    Active,
    Revoked,
    Expired,
    /// Minting failed and nothing was issued (or what was issued was revoked).
    Failed,
}

impl CredentialState {
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialState::Pending => "pending",
            CredentialState::Active => "active",
            CredentialState::Revoked => "revoked",
            CredentialState::Expired => "expired",
            CredentialState::Failed => "failed",
        }
    }
}

/// One credential. `handle` is the sealed revocation handle; never the secret a caller got,
/// except where revocation needs it (GitHub tokens), and then only sealed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CredentialRow {
    pub id: Uuid,
    pub exchange_id: Uuid,
    pub name: String,
    pub backend: BackendKind,
    pub state: CredentialState,
    pub agent: String,
    pub capability: String,
    pub issuer: String,
    pub subject: String,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub fingerprint: Option<String>,
    #[serde(skip)]
    pub handle: Option<Vec<u8>>,
    /// Set by a kill rule while the row was pending: it must never become active.
    pub revoke_requested: bool,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// The revocation handle of one minted credential, recorded the moment its backend answers.
#[derive(Debug, Clone)]
pub struct Handle {
    /// Sealed with [`crate::seal`]; `None` when the backend needs nothing to revoke.
    pub sealed: Option<Vec<u8>>,
    pub fingerprint: String,
    pub expires_at: DateTime<Utc>,
}

/// A single-use subject token being spent (DESIGN step 2).
#[derive(Debug, Clone)]
pub struct SpentJti {
    pub issuer: String,
    pub jti: String,
    pub capability: String,
    /// `exp` + leeway: the row can be pruned after this.
    pub keep_until: DateTime<Utc>,
}

/// The activation of step 7.
#[derive(Debug, Clone)]
pub struct Activate {
    pub exchange_id: Uuid,
    /// Kill rules are judged in force at this time.
    pub now: DateTime<Utc>,
    /// The kill epoch that the in-memory check of step 3 saw. When the store's epoch differs,
    /// the rules are read from the store inside the transaction and checked again.
    pub seen_kill_epoch: i64,
    /// What kill selectors are matched against.
    pub subject: KillSubject,
    pub jti: Option<SpentJti>,
    /// The policy's `max_active`, if it sets one.
    pub max_active: Option<ActiveLimit>,
    /// Jobs to enqueue with the activation (revoke at TTL end).
    pub jobs: Vec<NewJob>,
    pub event: AuditEvent,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    Activated,
    /// A kill rule matched (or a row was marked `revoke_requested`); nothing was activated.
    Killed {
        rule_id: Option<Uuid>,
    },
    /// The `jti` was already spent for this capability; nothing was activated.
    Replay,
    /// The identity already holds `max_active` live exchanges; nothing was activated.
    Limited {
        live: u64,
    },
}

/// A policy's `max_active`: how many live exchanges one identity (agent + repository) may hold.
/// Checked inside [`Ledger::activate`], serialized with every other activation (across replicas
/// too), so concurrent exchanges cannot together pass it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveLimit {
    pub agent: String,
    pub repository: Option<String>,
    pub limit: u32,
}

/// An identity's live exchanges: how many, and when the first of them ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveCount {
    pub exchanges: u64,
    pub first_end: Option<DateTime<Utc>>,
}

/// How a failed exchange ends (step 6, all-or-nothing).
#[derive(Debug, Clone)]
pub struct Abort {
    pub exchange_id: Uuid,
    pub state: ExchangeState,
    pub error: String,
    pub reason: String,
    /// Credentials whose revocation did not succeed: they stay `pending` for the reconciler.
    pub unrevoked: Vec<Uuid>,
    pub event: AuditEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Revoke a credential at the end of its policy TTL.
    RevokeAtTtl,
    /// Revoke a credential now (kill rule, release, admin).
    Revoke,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::RevokeAtTtl => "revoke_at_ttl",
            JobKind::Revoke => "revoke",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: Uuid,
    pub kind: JobKind,
    pub credential_id: Uuid,
    /// The credential's backend: each backend's jobs are a queue of their own.
    pub backend: BackendKind,
    pub kill_id: Option<Uuid>,
    pub run_at: DateTime<Utc>,
}

impl NewJob {
    /// A revocation of `credential` due at `run_at`, on its backend's queue.
    pub fn revoke(credential: &CredentialRow, run_at: DateTime<Utc>) -> NewJob {
        NewJob {
            id: Uuid::now_v7(),
            kind: JobKind::Revoke,
            credential_id: credential.id,
            backend: credential.backend,
            kill_id: None,
            run_at,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: Uuid,
    pub kind: JobKind,
    pub credential_id: Uuid,
    pub kill_id: Option<Uuid>,
    pub run_at: DateTime<Utc>,
    pub attempts: u32,
    pub last_error: Option<String>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub enum JobOutcome {
    /// Done: the credential moves to `state` (revoked or expired), recorded by `event`.
    Done { state: CredentialState, event: AuditEvent },
    /// Try again at `run_at`.
    Retry { run_at: DateTime<Utc>, error: String },
    /// Given up for good (the credential stays as it is), recorded by `event`.
    Failed { error: String, event: AuditEvent },
}

/// A signing key of the `jwt` backend, sealed.
#[derive(Debug, Clone)]
pub struct StoredKey {
    pub id: String,
    pub algorithm: String,
    pub sealed_private: Vec<u8>,
    /// The public JWK (JSON object).
    pub public_jwk: Value,
    pub created_at: DateTime<Utc>,
    /// When it starts signing, for a key off the usual schedule (the replacement a retirement
    /// makes signs at once); `None`: the usual schedule (see [`crate::backend::jwt`]).
    pub signs_from: Option<DateTime<Utc>>,
    /// When an admin retired it: from then on it is neither published nor used, anywhere.
    pub retired_at: Option<DateTime<Utc>>,
}

/// The emergency retirement of a `jwt` signing key (a leak), as one transaction.
#[derive(Debug, Clone)]
pub struct RetireKey {
    pub kid: String,
    /// The retirement time: `signing_keys.retired_at`, `revoked_at` of the credentials it ends.
    pub at: DateTime<Utc>,
    /// A new key that signs at once, when nothing else would sign after the retirement.
    pub replacement: Option<StoredKey>,
    /// The live `jwt` credentials created while the key signed, in `[from, until)`, are ended
    /// with it: the active ones revoked, the pending ones marked `revoke_requested`.
    pub signed_from: DateTime<Utc>,
    pub signed_until: Option<DateTime<Utc>>,
    /// `signing_key.retired`; the store adds the counts of what it ended. Each credential gets
    /// a `credential.revoked` event made from it (same actor, request id and reason).
    pub event: AuditEvent,
}

/// What a retirement ended besides the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Retired {
    /// Active `jwt` credentials now revoked.
    pub revoked: Vec<Uuid>,
    /// Pending `jwt` credentials marked `revoke_requested`: they can never become active.
    pub marked: Vec<Uuid>,
}

/// Where a sealed blob is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SealedKind {
    /// `credentials.handle`: a revocation handle (a GitHub token, a Vault accessor), whose
    /// associated data is the credential id.
    CredentialHandle,
    /// `signing_keys.sealed_private`: a `jwt` signing key, whose associated data names its kid.
    SigningKey,
}

/// A sealed blob as stored, for the re-seal pass. Without the sealing key it reveals nothing,
/// but it is still never printed: `Debug` shows where it lives and which key sealed it.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedBlob {
    pub kind: SealedKind,
    /// The credential id or the kid.
    pub id: String,
    pub blob: Vec<u8>,
}

impl std::fmt::Debug for SealedBlob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBlob")
            .field("kind", &self.kind)
            .field("id", &self.id)
            .field("key_id", &crate::seal::Sealer::key_id_of(&self.blob))
            .finish()
    }
}

/// Where a page of [`Ledger::sealed_blobs`] ends: the kind and id of its last blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobCursor {
    pub kind: SealedKind,
    pub id: String,
}

impl SealedBlob {
    /// The cursor of the page that ends with this blob.
    pub fn cursor(&self) -> BlobCursor {
        BlobCursor { kind: self.kind, id: self.id.clone() }
    }
}

/// One re-seal: the blob at `kind`/`id` becomes `new`, but only if it is still exactly `old`
/// (compare-and-set): a replica that re-sealed it first, or a revocation that erased it, wins.
#[derive(Clone)]
pub struct Reseal {
    pub kind: SealedKind,
    pub id: String,
    pub old: Vec<u8>,
    pub new: Vec<u8>,
}

impl std::fmt::Debug for Reseal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reseal").field("kind", &self.kind).field("id", &self.id).finish_non_exhaustive()
    }
}

/// What one [`Ledger::reseal`] call changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ResealCount {
    /// Credential handles now under the current key.
    pub credentials: u64,
    /// Signing keys now under the current key.
    pub signing_keys: u64,
    /// Blobs that had changed since they were read (another replica re-sealed them, or the
    /// credential ended and its handle was erased): left as they are.
    pub skipped: u64,
}

impl ResealCount {
    pub fn changed(&self) -> u64 {
        self.credentials + self.signing_keys
    }
}

/// Current kill rules and the epoch they belong to.
#[derive(Debug, Clone, Default)]
pub struct KillState {
    pub epoch: i64,
    pub rules: Vec<KillRule>,
}

/// What a kill rule did when it was created.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KillEffect {
    /// Pending credentials marked `revoke_requested`.
    pub pending_marked: Vec<Uuid>,
    /// Active credentials that got a revocation job.
    pub jobs: Vec<Uuid>,
}

/// A kill rule as stored, with what the store keeps beside it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredKill {
    pub rule: KillRule,
    /// The admin key that lifted the rule, and why.
    pub lifted_by: Option<String>,
    pub lift_reason: Option<String>,
}

/// One page of kill rules, oldest first. The cursor is the `(created_at, id)` of the last rule
/// of the previous page: rules are only ever appended, so a page never shifts.
#[derive(Debug, Clone, Default)]
pub struct KillPage {
    pub after: Option<(DateTime<Utc>, Uuid)>,
    /// Rules created at or after `since` and before `until`.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// One credential a kill rule reached: an active credential it gave a revocation job, or a
/// pending one it marked `revoke_requested`.
#[derive(Debug, Clone, PartialEq)]
pub struct KillTarget {
    pub credential_id: Uuid,
    pub backend: BackendKind,
    /// The credential's state now.
    pub state: CredentialState,
    /// Whether the rule enqueued a revocation job for it (else it marked a pending row).
    pub has_job: bool,
    /// How that job ended (`revoked`, `expired`, `failed`); `None` while it is not done.
    pub job_outcome: Option<String>,
}

/// A live (pending or active) credential, as a dry run counts it.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveCredential {
    pub credential_id: Uuid,
    pub backend: BackendKind,
    pub state: CredentialState,
}

/// What `POST /v1/credentials/{id}/revoke` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RevokeRequest {
    /// The credential was active: a revocation job was enqueued.
    Queued,
    /// The credential was active and a revocation job was already waiting: nothing changed.
    AlreadyQueued,
    /// The credential was pending: it was marked `revoke_requested` and can never become active.
    Marked,
    /// The credential had already ended (revoked, expired, failed): nothing changed.
    Finished(CredentialState),
}

/// Which credentials a listing wants by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateFilter {
    /// Exactly this state.
    Is(CredentialState),
    /// Usable now: `pending` or `active`, and not yet past `expires_at`.
    Live,
}

/// A page of credentials, newest first. The cursor is the `(created_at, id)` of the last row of
/// the previous page: rows are only appended (a state change never moves a row), so a page never
/// shifts while new rows arrive. Every filter given must match; strings match exactly.
#[derive(Debug, Clone, Default)]
pub struct CredentialQuery {
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub subject: Option<String>,
    pub backend: Option<BackendKind>,
    pub exchange: Option<Uuid>,
    pub state: Option<StateFilter>,
    /// What [`StateFilter::Live`] compares `expires_at` with.
    pub now: Option<DateTime<Utc>>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// A page of exchanges, newest first, paged like [`CredentialQuery`].
#[derive(Debug, Clone, Default)]
pub struct ExchangeQuery {
    pub before: Option<(DateTime<Utc>, Uuid)>,
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub workflow: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub decision: Option<ExchangeState>,
    /// Exchanges that have a credential of this backend.
    pub backend: Option<BackendKind>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// A page of audit events, oldest first, after sequence number `after`.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub after: i64,
    /// An event name (`kill.created`), or a prefix ending in `*` (`kill.*`).
    pub event: Option<String>,
    pub actor: Option<String>,
    pub agent: Option<String>,
    pub capability: Option<String>,
    pub repository: Option<String>,
    pub subject: Option<String>,
    pub credential: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: usize,
}

/// A signed statement that the audit chain's event `seq` has hash `hash` (DESIGN "Store").
/// The signature covers [`crate::checkpoint::signed_message`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    /// Hex SHA-256: the chain hash of event `seq`.
    pub hash: String,
    /// RFC 3339, UTC, milliseconds.
    pub signed_at: String,
    /// Names the public key: the first 16 hex digits of its SHA-256.
    pub key_id: String,
    /// Ed25519 signature, base64 (standard alphabet).
    pub signature: String,
}

#[async_trait]
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// A refused exchange (bad request, rejected token, policy denial): the exchange row with its
    /// trace, and its audit event.
    async fn record_refusal(&self, exchange: &ExchangeRow, event: AuditEvent) -> Result<(), LedgerError>;

    /// Step 5: the exchange (state `pending`) and one `pending` credential per grant, durable
    /// before any backend is called.
    async fn record_intent(
        &self,
        exchange: &ExchangeRow,
        credentials: &[CredentialRow],
        event: AuditEvent,
    ) -> Result<(), LedgerError>;

    /// Step 6: a grant's revocation handle, recorded as soon as its backend answers.
    async fn record_handle(&self, credential_id: Uuid, handle: &Handle) -> Result<(), LedgerError>;

    /// Step 7: flips the exchange's credentials from `pending` to `active`, spends the `jti` and
    /// enqueues the TTL jobs, in one transaction serialized with kill creation. Nothing changes
    /// unless the answer is [`Activation::Activated`].
    async fn activate(&self, activate: Activate) -> Result<Activation, LedgerError>;

    /// Steps 5 to 7 in one transaction, for an exchange whose every grant comes from a backend
    /// that keeps no state outside latchkey ([`crate::backend::Backend::is_local`]): until the
    /// answer leaves this process, which only happens after this commit, nothing it minted exists
    /// anywhere else, so a separate intent record would protect nothing. `credentials` carry
    /// their fingerprints and expiry. Nothing at all is written unless the answer is
    /// [`Activation::Activated`].
    async fn issue_local(
        &self,
        exchange: &ExchangeRow,
        credentials: &[CredentialRow],
        activate: Activate,
    ) -> Result<Activation, LedgerError>;

    /// Ends an exchange that could not complete: its credentials become `failed` (except
    /// `unrevoked`, left `pending` for the reconciler) and the exchange `failed` or `denied`.
    async fn abort(&self, abort: Abort) -> Result<(), LedgerError>;

    /// Whether a `jti` was already spent for this capability (an early, advisory check; the
    /// binding one is inside [`Ledger::activate`]).
    async fn jti_spent(&self, issuer: &str, jti: &str, capability: &str) -> Result<bool, LedgerError>;

    async fn exchange(&self, id: Uuid) -> Result<Option<ExchangeRow>, LedgerError>;
    async fn credential(&self, id: Uuid) -> Result<Option<CredentialRow>, LedgerError>;
    async fn credentials_of_exchange(&self, exchange_id: Uuid) -> Result<Vec<CredentialRow>, LedgerError>;

    /// `pending` credentials created before `before`: what the reconciler looks at.
    async fn pending_credentials(&self, before: DateTime<Utc>) -> Result<Vec<CredentialRow>, LedgerError>;

    /// Moves a credential to `to` if it is in one of `from`; returns whether it moved. The event
    /// is written only when it did.
    async fn transition_credential(
        &self,
        id: Uuid,
        from: &[CredentialState],
        to: CredentialState,
        event: AuditEvent,
    ) -> Result<bool, LedgerError>;

    /// Creates a kill rule under the kill lock: bumps the epoch, marks matching `pending` rows
    /// `revoke_requested`, enqueues one `revoke` job per matching `active` credential.
    async fn create_kill(&self, rule: &KillRule, event: AuditEvent) -> Result<KillEffect, LedgerError>;

    /// The kill rules in force (not lifted, not lapsed at `now`) and the current epoch.
    async fn kill_state(&self, now: DateTime<Utc>) -> Result<KillState, LedgerError>;

    /// The rules whose `expires_at` has passed at `now` and whose lapse was not yet recorded:
    /// records it, with one `kill.lapsed` event per rule (naming `actor`), in one transaction.
    /// A rule lapses in the audit trail exactly once, whichever replica or restart sees it first.
    async fn record_lapses(&self, now: DateTime<Utc>, actor: &str) -> Result<Vec<Uuid>, LedgerError>;

    /// Lifts a rule: sets `lifted_at` and bumps the kill epoch (so activations re-read the
    /// rules), with its audit event. `NotFound` for an unknown rule, `Conflict` for one already
    /// lifted or lapsed. Nothing is un-revoked.
    async fn lift_kill(
        &self,
        id: Uuid,
        now: DateTime<Utc>,
        by: &str,
        reason: &str,
        event: AuditEvent,
    ) -> Result<StoredKill, LedgerError>;

    async fn kill_rule(&self, id: Uuid) -> Result<Option<StoredKill>, LedgerError>;
    async fn kill_rules(&self, page: KillPage) -> Result<Vec<StoredKill>, LedgerError>;
    /// Every credential a rule reached, for its revocation report.
    async fn kill_targets(&self, id: Uuid) -> Result<Vec<KillTarget>, LedgerError>;
    /// The live credentials a selector matches now, judged as [`Ledger::create_kill`] would.
    async fn kill_matches(&self, selector: &crate::kill::Selector) -> Result<Vec<LiveCredential>, LedgerError>;

    /// Revokes one credential on request, in one transaction with `event` (written only when
    /// something changed): an active one gets `job`, a pending one is marked.
    async fn request_revoke(&self, job: NewJob, event: AuditEvent) -> Result<RevokeRequest, LedgerError>;

    /// Gives an exchange back (`POST /v1/release`): each `(job, event)` names one of its
    /// credentials and is applied as [`Ledger::request_revoke`] would, all in one transaction;
    /// `event` (`exchange.released`) is written only when something changed, so a repeated
    /// release writes nothing. Answers one [`RevokeRequest`] per credential, in order.
    async fn release_exchange(
        &self,
        revokes: Vec<(NewJob, AuditEvent)>,
        event: AuditEvent,
    ) -> Result<Vec<RevokeRequest>, LedgerError>;

    async fn enqueue_jobs(&self, jobs: &[NewJob]) -> Result<(), LedgerError>;
    /// Claims up to `limit` jobs due at `now` of `backend`'s credentials, hidden from other
    /// workers until `lease_until`. Each backend's jobs are a queue of their own.
    async fn claim_jobs(
        &self,
        now: DateTime<Utc>,
        backend: BackendKind,
        limit: usize,
        lease_until: DateTime<Utc>,
    ) -> Result<Vec<Job>, LedgerError>;
    async fn finish_job(&self, job: &Job, outcome: JobOutcome) -> Result<(), LedgerError>;
    /// Jobs not yet done, for metrics.
    async fn job_queue_depth(&self) -> Result<u64, LedgerError>;

    /// Appends one event on its own (admin calls, policy reloads).
    async fn append_event(&self, event: AuditEvent) -> Result<(), LedgerError>;
    /// Events with a sequence number above `after`, in order.
    async fn events(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, LedgerError>;

    /// Events matching a query, oldest first.
    async fn list_events(&self, query: EventQuery) -> Result<Vec<StoredEvent>, LedgerError>;
    /// The last event's sequence number and hash (`0` and the genesis hash when empty).
    async fn audit_head(&self) -> Result<(i64, String), LedgerError>;
    /// A page of credentials; never their handles.
    async fn list_credentials(&self, query: CredentialQuery) -> Result<Vec<CredentialRow>, LedgerError>;
    async fn list_exchanges(&self, query: ExchangeQuery) -> Result<Vec<ExchangeRow>, LedgerError>;

    /// Stores a checkpoint with its audit event, in one transaction. `Conflict` unless event
    /// `checkpoint.seq` exists with exactly `checkpoint.hash`: a checkpoint only ever vouches
    /// for what is on the chain.
    async fn record_checkpoint(&self, checkpoint: &Checkpoint, event: AuditEvent) -> Result<(), LedgerError>;
    /// Every stored checkpoint, by sequence number.
    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError>;
    async fn latest_checkpoint(&self) -> Result<Option<Checkpoint>, LedgerError>;

    /// The last sequence number the named audit stream delivered, if it ever ran.
    async fn stream_position(&self, name: &str) -> Result<Option<i64>, LedgerError>;
    async fn set_stream_position(&self, name: &str, seq: i64) -> Result<(), LedgerError>;

    /// Every signing key, retired ones included, oldest first.
    async fn signing_keys(&self) -> Result<Vec<StoredKey>, LedgerError>;
    async fn insert_signing_key(&self, key: &StoredKey, event: AuditEvent) -> Result<(), LedgerError>;

    /// Retires a signing key in one transaction: sets its `retired_at`, inserts the replacement
    /// if there is one, ends the live `jwt` credentials of the window, and writes the events.
    /// `NotFound` for an unknown kid; `Conflict` for a key already retired, or when no key would
    /// be left unretired (nothing could sign).
    async fn retire_signing_key(&self, retire: RetireKey) -> Result<Retired, LedgerError>;

    /// One step of a rate limit's bucket `key` (GCRA, see [`crate::policy::limits`]): `None`
    /// when the exchange may go (and the bucket is charged), else how long to wait. Kept in the
    /// store, so a rate is counted across replicas.
    async fn take_rate(
        &self,
        key: &str,
        now: DateTime<Utc>,
        interval: std::time::Duration,
        tolerance: std::time::Duration,
    ) -> Result<Option<std::time::Duration>, LedgerError>;

    /// The identity's live exchanges at `now` (an early, advisory check of `max_active`; the
    /// binding one is inside [`Ledger::activate`]).
    async fn live_count(
        &self,
        agent: &str,
        repository: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<LiveCount, LedgerError>;

    /// One page of the sealed blobs the store holds: the handles of credentials that still have
    /// one (a handle is erased when its credential ends) and the `jwt` signing keys, ordered by
    /// kind (credential handles first) then id, at most `limit`, after the blob named by
    /// `after`. A page shorter than `limit` is the last. Keyset paging: blobs that arrive or go
    /// meanwhile never make a page repeat or skip another blob.
    async fn sealed_blobs(&self, after: Option<&BlobCursor>, limit: usize) -> Result<Vec<SealedBlob>, LedgerError>;

    /// Applies re-seals, each only if its blob is still exactly `old`, in one transaction; when
    /// at least one blob changed, one `sealing.resealed` event (at `now`, naming the current key
    /// id and the counts, never a blob) is written with them. Replicas running the same pass at
    /// once do no harm: the second finds its blobs changed and skips them.
    async fn reseal(&self, reseals: Vec<Reseal>, key_id: &str, now: DateTime<Utc>) -> Result<ResealCount, LedgerError>;

    /// Deletes spent `jti`s past their `keep_until`, and rate buckets that have refilled.
    async fn prune(&self, now: DateTime<Utc>) -> Result<u64, LedgerError>;

    /// Whether the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), LedgerError>;

    /// For a store that other processes share (PostgreSQL): woken whenever the kill rules may
    /// have changed elsewhere, so that this replica re-reads them at once. `None` when this
    /// process is the store's only writer (SQLite): then every change is made here, and the
    /// code that makes it refreshes the rules itself.
    fn kill_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// Like [`Ledger::kill_changes`], for the `jwt` signing keys: woken when another process
    /// created or retired one, so that a retired key stops signing here at once.
    fn key_changes(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
}

/// What verifying the audit chain reads: the events in order and the stored checkpoints. Every
/// [`Ledger`] is one; so is [`sqlite::AuditFile`], which reads a store file without the server.
#[async_trait]
pub trait AuditSource: Send + Sync {
    /// Events with a sequence number above `after`, in order.
    async fn chain(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, LedgerError>;
    async fn stored_checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError>;
}

#[async_trait]
impl<L: Ledger + ?Sized> AuditSource for L {
    async fn chain(&self, after: i64, limit: usize) -> Result<Vec<StoredEvent>, LedgerError> {
        self.events(after, limit).await
    }
    async fn stored_checkpoints(&self) -> Result<Vec<Checkpoint>, LedgerError> {
        self.checkpoints().await
    }
}

/// Opens the ledger named by a store URL. `migrate` applies pending migrations first (`dev`,
/// `migrate`); otherwise an unmigrated or newer schema is an error.
pub async fn open(url: &str, migrate: bool, settings: &postgres::Settings) -> Result<Arc<dyn Ledger>, LedgerError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        sqlite::open(std::path::Path::new(path), migrate).await
    } else if is_postgres(url) {
        postgres::open(url, migrate, settings).await
    } else {
        Err(unsupported(url))
    }
}

fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

fn unsupported(url: &str) -> LedgerError {
    // Only the scheme is shown: the rest of a URL can hold a password.
    let scheme = url.split_once("://").map_or("(none)", |(s, _)| s);
    LedgerError::Schema(format!("unsupported store URL scheme {scheme:?}: use sqlite://PATH or postgres://…"))
}

/// Opens a store to verify its audit chain (`latchkey audit verify --store`). A SQLite file is
/// opened read-only, without its lock, so this works on a copy or beside a running server; a
/// PostgreSQL store is read through an ordinary connection and never migrated.
pub async fn open_audit_source(url: &str) -> Result<Box<dyn AuditSource>, LedgerError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Box::new(sqlite::AuditFile::open(std::path::Path::new(path))?))
    } else if is_postgres(url) {
        Ok(Box::new(postgres::AuditDatabase::open(url).await?))
    } else {
        Err(unsupported(url))
    }
}
