//! What each write command ([`Op`]) does inside the PostgreSQL writer's transaction: the same
//! steps, checks and answers as the SQLite store's, in PostgreSQL's dialect. The writer holds
//! the chain head's row lock for the whole transaction (see [`super::writer`]), so these steps
//! never interleave with another replica's.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::db_err;
use super::read;
use crate::audit::{AuditEvent, chain_hash};
use crate::kill::KillRule;
use crate::ledger::command::{
    Applied, CredentialParams, EventParams, ExchangeParams, FinishParams, Gate, JobParams, KeyParams, Op, Reply,
    check_intent, key_retired_event, resealed_event, retired_credential_event,
};
use crate::ledger::rows::{
    self, id, job_columns, job_from_row, kill_rule_from_row, stored_kill_columns, stored_kill_from_row, ts, ts_opt,
};
use crate::ledger::{
    Activation, CredentialState, ExchangeState, JobKind, KillEffect, LedgerError, Reseal, ResealCount, Retired,
    RevokeRequest, SealedKind, StoredKill,
};
use crate::policy::limits::gcra;

/// The last event of the chain: its sequence number (0 before the first) and hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ChainHead {
    pub(super) seq: i64,
    pub(super) hash: [u8; 32],
}

/// A command's view of the open transaction.
pub(super) struct Tx<'a> {
    pub(super) conn: &'a mut PgConnection,
    pub(super) head: &'a mut ChainHead,
    /// The kill epoch as this transaction last read it, or `None` until read (and again after a
    /// command moved it). Kill creation and lifting move it only under the chain lock this
    /// transaction holds, so once read it holds for every later command of the batch.
    pub(super) kill_epoch: &'a mut Option<i64>,
}

type PgQuery<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

/// Binds `e`'s columns to the next 17 parameters, in `exchange_columns!()` order, with `state`
/// as its state.
fn bind_exchange<'q>(q: PgQuery<'q>, e: &'q ExchangeParams, state: ExchangeState) -> PgQuery<'q> {
    q.bind(&e.id)
        .bind(&e.request_id)
        .bind(&e.created_at)
        .bind(state.as_str())
        .bind(&e.error)
        .bind(&e.reason)
        .bind(&e.issuer)
        .bind(&e.subject)
        .bind(&e.repository)
        .bind(&e.workflow)
        .bind(&e.capability)
        .bind(&e.agent)
        .bind(&e.claims)
        .bind(&e.trace)
        .bind(&e.policy_sha256)
        .bind(&e.release_token_sha256)
        .bind(&e.expires_at)
}

/// [`Tx::issue_local`]'s one statement. `$1` to `$4` spend the `jti` (`$2` null: the issuer
/// sets none), `$5` to `$21` are the exchange ([`bind_exchange`]), `$22` to `$37` its
/// credentials and `$38` to `$43` their jobs, column by column as arrays, and `$44` to `$47` the
/// audit event. Every insert takes its rows from `go`, which is empty when the `jti` was spent
/// already; the answer says whether anything was written.
const ISSUE_LOCAL: &str = concat!(
    "WITH spent AS (",
    "INSERT INTO spent_jti (issuer, jti, capability, keep_until) ",
    "SELECT $1, $2, $3, $4 WHERE $2::text IS NOT NULL ",
    "ON CONFLICT (issuer, jti, capability) DO NOTHING RETURNING 1",
    "), go AS (SELECT 1 FROM spent UNION ALL SELECT 1 WHERE $2::text IS NULL",
    "), exchange AS (INSERT INTO exchanges (",
    rows::exchange_columns!(),
    ") SELECT $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21 FROM go",
    "), credential AS (INSERT INTO credentials (",
    rows::credential_columns!(),
    ") SELECT c.id, c.exchange_id, c.name, c.backend, 'active', c.agent, c.capability, c.issuer, ",
    "c.subject, c.repository, c.workflow, c.created_at, c.expires_at, c.fingerprint, c.handle, ",
    "c.revoke_requested, c.revoked_at FROM go, unnest($22::text[], $23::text[], $24::text[], ",
    "$25::text[], $26::text[], $27::text[], $28::text[], $29::text[], $30::text[], $31::text[], ",
    "$32::text[], $33::text[], $34::text[], $35::bytea[], $36::bool[], $37::text[]) AS c(id, ",
    "exchange_id, name, backend, agent, capability, issuer, subject, repository, workflow, ",
    "created_at, expires_at, fingerprint, handle, revoke_requested, revoked_at)",
    "), job AS (INSERT INTO jobs (id, kind, credential_id, kill_id, run_at, attempts, backend) ",
    "SELECT j.id, j.kind, j.credential_id, j.kill_id, j.run_at, 0, j.backend FROM go, ",
    "unnest($38::text[], $39::text[], $40::text[], $41::text[], $42::text[], $43::text[]) ",
    "AS j(id, kind, credential_id, kill_id, run_at, backend)",
    "), event AS (INSERT INTO audit_events (seq, prev_hash, hash, body) SELECT $44, $45, $46, $47 FROM go",
    ") SELECT EXISTS (SELECT 1 FROM go)"
);

/// The channel kill changes are announced on. On both channels the payload names the schema, so
/// that replicas of another deployment sharing the database ignore them.
pub(super) const KILL_CHANNEL: &str = "latchkey_kills";
/// The channel signing-key changes (a new key, a retirement) are announced on.
pub(super) const KEY_CHANNEL: &str = "latchkey_signing_keys";

impl Tx<'_> {
    pub(super) async fn apply(&mut self, op: &Op) -> Result<Applied, LedgerError> {
        match op {
            Op::Refusal { exchange, event } => {
                if matches!(exchange.state, ExchangeState::Pending | ExchangeState::Allowed) {
                    return Err(LedgerError::Conflict(format!(
                        "a refusal ends denied or failed, not {}",
                        exchange.state.as_str()
                    )));
                }
                self.insert_exchange(exchange, exchange.state).await?;
                self.append(event).await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::Intent { exchange, credentials, event } => {
                self.insert_intent(exchange, credentials).await?;
                self.append(event).await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::IssueLocal { exchange, credentials, gate, jobs, event } => {
                self.issue_local(exchange, credentials, gate, jobs, event).await
            }
            Op::Handle { credential_id, sealed, fingerprint, expires_at } => {
                let n = self
                    .exec(
                        sqlx::query(
                            "UPDATE credentials SET handle = $2, fingerprint = $3, expires_at = $4 \
                             WHERE id = $1 AND state = 'pending'",
                        )
                        .bind(credential_id)
                        .bind(sealed)
                        .bind(fingerprint)
                        .bind(expires_at),
                    )
                    .await?;
                if n == 0 {
                    return Err(self.credential_not_pending(credential_id, "take a handle").await?);
                }
                Ok(Applied::keep(Reply::Done))
            }
            Op::Activate { exchange_id, gate, jobs, event } => self.activate(exchange_id, gate, jobs, event).await,
            Op::Abort { exchange_id, state, error, reason, unrevoked, event } => {
                self.abort(exchange_id, *state, error, reason, unrevoked, event).await
            }
            Op::Transition { id, from, to, event } => self.transition(id, from, *to, event).await,
            Op::CreateKill { rule, selector, event } => self.create_kill(rule, selector, event).await,
            Op::RecordLapses { now, actor } => self.record_lapses(*now, actor).await,
            Op::LiftKill { id, now, by, reason, event } => self.lift_kill(id, now, by, reason, event).await,
            Op::RequestRevoke { job, event } => self.request_revoke(job, event).await,
            Op::Release { revokes, event } => self.release(revokes, event).await,
            Op::EnqueueJobs(jobs) => {
                for job in jobs {
                    self.insert_job(job).await?;
                }
                Ok(Applied::keep(Reply::Done))
            }
            Op::ClaimJobs { now, backend, limit, lease_until } => {
                let jobs = claim_jobs(self.conn, now, backend, *limit, lease_until).await?;
                Ok(Applied::keep(Reply::Jobs(jobs)))
            }
            Op::FinishJob { job_id, outcome } => self.finish_job(job_id, outcome).await,
            Op::AppendEvent(event) => {
                self.append(event).await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::InsertSigningKey { key, event } => {
                self.insert_signing_key(key).await?;
                self.announce(KEY_CHANNEL).await?;
                self.append(event).await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::RetireSigningKey { kid, at, replacement, signed_from, signed_until, event } => {
                self.retire_signing_key(kid, at, replacement.as_deref(), signed_from, signed_until.as_deref(), event)
                    .await
            }
            Op::RecordCheckpoint { checkpoint: c, event } => {
                // Under the chain lock, nothing can move the row between this check and the insert.
                let on_chain: Option<String> = sqlx::query_scalar("SELECT hash FROM audit_events WHERE seq = $1")
                    .bind(c.seq)
                    .fetch_optional(&mut *self.conn)
                    .await
                    .map_err(db_err)?;
                if on_chain.as_deref() != Some(c.hash.as_str()) {
                    return Err(LedgerError::Conflict(format!("event {} does not have the checkpoint's hash", c.seq)));
                }
                self.exec(
                    sqlx::query(
                        "INSERT INTO audit_checkpoints (seq, hash, signed_at, key_id, signature) \
                         VALUES ($1, $2, $3, $4, $5)",
                    )
                    .bind(c.seq)
                    .bind(&c.hash)
                    .bind(&c.signed_at)
                    .bind(&c.key_id)
                    .bind(&c.signature),
                )
                .await?;
                self.append(event).await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::SetStreamPosition { name, seq } => {
                self.exec(
                    sqlx::query(
                        "INSERT INTO audit_stream_positions (name, seq) VALUES ($1, $2) \
                         ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                    )
                    .bind(name)
                    .bind(seq),
                )
                .await?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::Prune { now } => {
                let n = self.exec(sqlx::query("DELETE FROM spent_jti WHERE keep_until < $1").bind(now)).await?;
                // A bucket whose time has passed is as good as a new one.
                self.exec(sqlx::query("DELETE FROM rate_limits WHERE tat < $1").bind(now)).await?;
                Ok(Applied::keep(Reply::Count(n)))
            }
            Op::TakeRate { key, now, interval, tolerance } => {
                // Under the chain lock, so replicas take turns on a bucket.
                let tat: Option<String> = sqlx::query_scalar("SELECT tat FROM rate_limits WHERE key = $1")
                    .bind(key)
                    .fetch_optional(&mut *self.conn)
                    .await
                    .map_err(db_err)?;
                let tat = tat
                    .map(|t| rows::parse_time(&t).ok_or_else(|| rows::corrupt("rate_limits", "tat", "not a time")))
                    .transpose()?;
                match gcra(tat, *now, *interval, *tolerance) {
                    Ok(next) => {
                        self.exec(
                            sqlx::query(
                                "INSERT INTO rate_limits (key, tat) VALUES ($1, $2) \
                                 ON CONFLICT (key) DO UPDATE SET tat = excluded.tat",
                            )
                            .bind(key)
                            .bind(ts(next)),
                        )
                        .await?;
                        Ok(Applied::keep(Reply::Wait(None)))
                    }
                    Err(wait) => Ok(Applied::keep(Reply::Wait(Some(wait)))),
                }
            }
            Op::Reseal { reseals, key_id, now } => self.reseal(reseals, key_id, *now).await,
        }
    }

    async fn insert_signing_key(&mut self, key: &KeyParams) -> Result<(), LedgerError> {
        self.exec(
            sqlx::query(
                "INSERT INTO signing_keys (id, algorithm, sealed_private, public_jwk, created_at, signs_from) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&key.id)
            .bind(&key.algorithm)
            .bind(&key.sealed_private)
            .bind(&key.public_jwk)
            .bind(&key.created_at)
            .bind(&key.signs_from),
        )
        .await?;
        Ok(())
    }

    /// A leaked signing key, retired: the key, its replacement, and the live `jwt` credentials it
    /// signed, all in this one transaction (under the chain lock, so serialized with every other
    /// replica's writes): no reader sees the key gone while its credentials still look live, or
    /// the key gone with nothing left to sign.
    async fn retire_signing_key(
        &mut self,
        kid: &str,
        at: &str,
        replacement: Option<&KeyParams>,
        signed_from: &str,
        signed_until: Option<&str>,
        event: &AuditEvent,
    ) -> Result<Applied, LedgerError> {
        let n = self
            .exec(
                sqlx::query("UPDATE signing_keys SET retired_at = $2 WHERE id = $1 AND retired_at IS NULL")
                    .bind(kid)
                    .bind(at),
            )
            .await?;
        if n == 0 {
            let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM signing_keys WHERE id = $1")
                .bind(kid)
                .fetch_optional(&mut *self.conn)
                .await
                .map_err(db_err)?;
            return Err(match known {
                Some(_) => LedgerError::Conflict(format!("signing key {kid} is already retired")),
                None => LedgerError::NotFound,
            });
        }
        if let Some(key) = replacement {
            self.insert_signing_key(key).await?;
        }
        let left: Option<i32> = sqlx::query_scalar("SELECT 1 FROM signing_keys WHERE retired_at IS NULL LIMIT 1")
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_err)?;
        if left.is_none() {
            return Err(LedgerError::Conflict("retiring the last signing key needs a replacement".into()));
        }
        self.announce(KEY_CHANNEL).await?;
        let rows = sqlx::query(
            "SELECT id, state, agent, capability, subject, repository, fingerprint FROM credentials \
             WHERE backend = 'jwt' AND state IN ('pending', 'active') \
             AND created_at >= $1 AND ($2::text IS NULL OR created_at < $2) AND expires_at > $3 \
             ORDER BY created_at, id",
        )
        .bind(signed_from)
        .bind(signed_until)
        .bind(at)
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_err)?;
        let ended = rows.iter().map(rows::retired_credential_from_row).collect::<Result<Vec<_>, _>>()?;
        let mut retired = Retired::default();
        for c in &ended {
            let cid = id(c.id);
            if c.state == CredentialState::Pending {
                self.exec(sqlx::query("UPDATE credentials SET revoke_requested = TRUE WHERE id = $1").bind(&cid))
                    .await?;
                retired.marked.push(c.id);
            } else {
                self.exec(
                    sqlx::query(
                        "UPDATE credentials SET state = 'revoked', revoked_at = $2, handle = NULL WHERE id = $1",
                    )
                    .bind(&cid)
                    .bind(at),
                )
                .await?;
                retired.revoked.push(c.id);
            }
            self.append(&retired_credential_event(event, kid, c)).await?;
        }
        self.append(&key_retired_event(event.clone(), &retired)).await?;
        Ok(Applied::keep(Reply::Retired(retired)))
    }

    /// Compare-and-set: a blob is replaced only while it is still the one the pass read, so
    /// replicas running the pass at once each change a blob at most once between them.
    async fn reseal(&mut self, reseals: &[Reseal], key_id: &str, now: DateTime<Utc>) -> Result<Applied, LedgerError> {
        let mut count = ResealCount::default();
        for r in reseals {
            let sql = match r.kind {
                SealedKind::CredentialHandle => "UPDATE credentials SET handle = $2 WHERE id = $1 AND handle = $3",
                SealedKind::SigningKey => {
                    "UPDATE signing_keys SET sealed_private = $2 WHERE id = $1 AND sealed_private = $3"
                }
            };
            match (self.exec(sqlx::query(sql).bind(&r.id).bind(&r.new).bind(&r.old)).await?, r.kind) {
                (0, _) => count.skipped += 1,
                (_, SealedKind::CredentialHandle) => count.credentials += 1,
                (_, SealedKind::SigningKey) => count.signing_keys += 1,
            }
        }
        if count.changed() > 0 {
            self.append(&resealed_event(now, key_id, &count)).await?;
        }
        Ok(Applied::keep(Reply::Resealed(count)))
    }

    async fn exec(&mut self, q: PgQuery<'_>) -> Result<u64, LedgerError> {
        q.execute(&mut *self.conn).await.map(|r| r.rows_affected()).map_err(db_err)
    }

    /// Appends one event to the chain; the writer restores the head when it rolls back.
    async fn append(&mut self, event: &EventParams) -> Result<(), LedgerError> {
        let seq = self.head.seq + 1;
        let hash = chain_hash(&self.head.hash, event.body.as_bytes());
        self.exec(
            sqlx::query("INSERT INTO audit_events (seq, prev_hash, hash, body) VALUES ($1, $2, $3, $4)")
                .bind(seq)
                .bind(hex::encode(self.head.hash))
                .bind(hex::encode(hash))
                .bind(&event.body),
        )
        .await?;
        *self.head = ChainHead { seq, hash };
        Ok(())
    }

    /// Inserts `e` in `state` (an exchange may be written in a later state than it was built in).
    async fn insert_exchange(&mut self, e: &ExchangeParams, state: ExchangeState) -> Result<(), LedgerError> {
        let insert = sqlx::query(concat!(
            "INSERT INTO exchanges (",
            rows::exchange_columns!(),
            ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        ));
        self.exec(bind_exchange(insert, e, state)).await?;
        Ok(())
    }

    async fn insert_job(&mut self, j: &JobParams) -> Result<(), LedgerError> {
        self.exec(
            sqlx::query(
                "INSERT INTO jobs (id, kind, credential_id, kill_id, run_at, attempts, backend) \
                 VALUES ($1, $2, $3, $4, $5, 0, $6)",
            )
            .bind(&j.id)
            .bind(j.kind)
            .bind(&j.credential_id)
            .bind(&j.kill_id)
            .bind(&j.run_at)
            .bind(j.backend),
        )
        .await?;
        Ok(())
    }

    async fn insert_intent(
        &mut self,
        exchange: &ExchangeParams,
        credentials: &[CredentialParams],
    ) -> Result<(), LedgerError> {
        check_intent(exchange, credentials)?;
        self.insert_exchange(exchange, exchange.state).await?;
        for c in credentials {
            self.insert_credential(c, c.state).await?;
        }
        Ok(())
    }

    /// Inserts `c` in `state`.
    async fn insert_credential(&mut self, c: &CredentialParams, state: CredentialState) -> Result<(), LedgerError> {
        self.exec(
            sqlx::query(concat!(
                "INSERT INTO credentials (",
                rows::credential_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
            ))
            .bind(&c.id)
            .bind(&c.exchange_id)
            .bind(&c.name)
            .bind(c.backend)
            .bind(state.as_str())
            .bind(&c.agent)
            .bind(&c.capability)
            .bind(&c.issuer)
            .bind(&c.subject)
            .bind(&c.repository)
            .bind(&c.workflow)
            .bind(&c.created_at)
            .bind(&c.expires_at)
            .bind(&c.fingerprint)
            .bind(&c.handle)
            .bind(c.revoke_requested)
            .bind(&c.revoked_at),
        )
        .await?;
        Ok(())
    }

    /// DESIGN step 7, under the chain lock that [`Tx::create_kill`] also holds: an activation
    /// and a kill on any replica are serialized.
    async fn activate(
        &mut self,
        exchange_id: &str,
        gate: &Gate,
        jobs: &[JobParams],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let n = self
            .exec(
                sqlx::query("UPDATE exchanges SET state = 'allowed' WHERE id = $1 AND state = 'pending'")
                    .bind(exchange_id),
            )
            .await?;
        if n == 0 {
            return Err(self.exchange_not_pending(exchange_id, "be activated").await?);
        }

        if let Some(refused) = self.gate(gate, Some(exchange_id)).await? {
            return Ok(Applied::undo(Reply::Activation(refused)));
        }

        self.exec(
            sqlx::query("UPDATE credentials SET state = 'active' WHERE exchange_id = $1 AND state = 'pending'")
                .bind(exchange_id),
        )
        .await?;
        for job in jobs {
            self.insert_job(job).await?;
        }
        self.append(event).await?;
        Ok(Applied::keep(Reply::Activation(Activation::Activated)))
    }

    /// Steps 5 to 7 at once for credentials no outside system holds (`jwt`): the activation's
    /// checks first, then the rows written once, already `allowed` and `active`. No kill can
    /// have marked rows that did not exist, so the gate is the whole check.
    ///
    /// The `jti` is spent and every row written by one statement, [`ISSUE_LOCAL`]: one round
    /// trip instead of one per row (the writer's round trips are what bounds an exchange's cost
    /// here). A replay writes nothing.
    async fn issue_local(
        &mut self,
        exchange: &ExchangeParams,
        credentials: &[CredentialParams],
        gate: &Gate,
        jobs: &[JobParams],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        check_intent(exchange, credentials)?;
        if let Some(refused) = self.checks(gate, None).await? {
            return Ok(Applied::undo(Reply::Activation(refused)));
        }
        let (issuer, jti, capability, keep_until) = match &gate.jti {
            Some((issuer, jti, capability, keep_until)) => {
                (Some(issuer), Some(jti), Some(capability), Some(keep_until))
            }
            None => (None, None, None, None),
        };
        let seq = self.head.seq + 1;
        let hash = chain_hash(&self.head.hash, event.body.as_bytes());
        let column = |f: fn(&CredentialParams) -> Option<&str>| credentials.iter().map(f).collect::<Vec<_>>();
        let row = bind_exchange(
            sqlx::query(ISSUE_LOCAL).bind(issuer).bind(jti).bind(capability).bind(keep_until),
            exchange,
            ExchangeState::Allowed,
        )
        .bind(column(|c| Some(&c.id)))
        .bind(column(|c| Some(&c.exchange_id)))
        .bind(column(|c| Some(&c.name)))
        .bind(column(|c| Some(c.backend)))
        .bind(column(|c| Some(&c.agent)))
        .bind(column(|c| Some(&c.capability)))
        .bind(column(|c| Some(&c.issuer)))
        .bind(column(|c| Some(&c.subject)))
        .bind(column(|c| c.repository.as_deref()))
        .bind(column(|c| c.workflow.as_deref()))
        .bind(column(|c| Some(&c.created_at)))
        .bind(column(|c| Some(&c.expires_at)))
        .bind(column(|c| c.fingerprint.as_deref()))
        .bind(credentials.iter().map(|c| c.handle.as_deref()).collect::<Vec<_>>())
        .bind(credentials.iter().map(|c| c.revoke_requested).collect::<Vec<_>>())
        .bind(column(|c| c.revoked_at.as_deref()))
        .bind(jobs.iter().map(|j| j.id.as_str()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.kind).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.credential_id.as_str()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.kill_id.as_deref()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.run_at.as_str()).collect::<Vec<_>>())
        .bind(jobs.iter().map(|j| j.backend).collect::<Vec<_>>())
        .bind(seq)
        .bind(hex::encode(self.head.hash))
        .bind(hex::encode(hash))
        .bind(&event.body)
        .fetch_one(&mut *self.conn)
        .await
        .map_err(db_err)?;
        let written: bool = row.try_get(0).map_err(db_err)?;
        if !written {
            return Ok(Applied::undo(Reply::Activation(Activation::Replay)));
        }
        *self.head = ChainHead { seq, hash };
        Ok(Applied::keep(Reply::Activation(Activation::Activated)))
    }

    /// The checks every activation passes under the chain lock, and then the `jti` spent: a
    /// refusal, or `None` when the credentials may become active. `exchange_id` names rows
    /// already written pending, which a kill may have marked.
    async fn gate(&mut self, gate: &Gate, exchange_id: Option<&str>) -> Result<Option<Activation>, LedgerError> {
        if let Some(refused) = self.checks(gate, exchange_id).await? {
            return Ok(Some(refused));
        }
        // (4) Single use, across replicas: the primary key makes a second spend a no-op.
        if let Some((issuer, jti, capability, keep_until)) = &gate.jti {
            let n = self
                .exec(
                    sqlx::query(
                        "INSERT INTO spent_jti (issuer, jti, capability, keep_until) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (issuer, jti, capability) DO NOTHING",
                    )
                    .bind(issuer)
                    .bind(jti)
                    .bind(capability)
                    .bind(keep_until),
                )
                .await?;
            if n == 0 {
                return Ok(Some(Activation::Replay));
            }
        }
        Ok(None)
    }

    /// Steps (1) to (3) of the gate: everything but spending the `jti`.
    async fn checks(&mut self, gate: &Gate, exchange_id: Option<&str>) -> Result<Option<Activation>, LedgerError> {
        // (1) A kill created since the in-memory check of step 3 saw the rules: judge again.
        let epoch = match *self.kill_epoch {
            Some(epoch) => epoch,
            None => *self.kill_epoch.insert(read::kill_epoch(&mut *self.conn).await?),
        };
        if epoch != gate.seen_kill_epoch {
            for rule in read::rules_in_force(&mut *self.conn, gate.now).await? {
                if rule.selector.matches(&gate.subject) {
                    return Ok(Some(Activation::Killed { rule_id: Some(rule.id) }));
                }
            }
        }

        // (2) A row a kill marked while pending never becomes active, whatever the epoch says.
        if let Some(exchange_id) = exchange_id {
            let marked: Option<i32> =
                sqlx::query_scalar("SELECT 1 FROM credentials WHERE exchange_id = $1 AND revoke_requested LIMIT 1")
                    .bind(exchange_id)
                    .fetch_optional(&mut *self.conn)
                    .await
                    .map_err(db_err)?;
            if marked.is_some() {
                return Ok(Some(Activation::Killed { rule_id: None }));
            }
        }

        // (3) The policy's max_active, judged with every other activation held off.
        if let Some(limit) = &gate.max_active {
            let live =
                read::live_count(&mut *self.conn, &limit.agent, limit.repository.as_deref(), gate.now, exchange_id)
                    .await?;
            if live.exchanges >= u64::from(limit.limit) {
                return Ok(Some(Activation::Limited { live: live.exchanges }));
            }
        }
        Ok(None)
    }

    async fn abort(
        &mut self,
        exchange_id: &str,
        state: ExchangeState,
        error: &str,
        reason: &str,
        unrevoked: &[String],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        if !matches!(state, ExchangeState::Failed | ExchangeState::Denied) {
            return Err(LedgerError::Conflict(format!("an abort ends failed or denied, not {}", state.as_str())));
        }
        let n = self
            .exec(
                sqlx::query(
                    "UPDATE exchanges SET state = $2, error = $3, reason = $4 WHERE id = $1 AND state = 'pending'",
                )
                .bind(exchange_id)
                .bind(state.as_str())
                .bind(error)
                .bind(reason),
            )
            .await?;
        if n == 0 {
            return Err(self.exchange_not_pending(exchange_id, "be aborted").await?);
        }
        // What could not be revoked stays pending for the reconciler.
        self.exec(
            sqlx::query(
                "UPDATE credentials SET state = 'failed', handle = NULL \
                 WHERE exchange_id = $1 AND state = 'pending' AND NOT (id = ANY($2))",
            )
            .bind(exchange_id)
            .bind(unrevoked),
        )
        .await?;
        self.append(event).await?;
        Ok(Applied::keep(Reply::Done))
    }

    async fn transition(
        &mut self,
        id: &str,
        from: &[CredentialState],
        to: CredentialState,
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let Some(state) = self.credential_state(id).await? else {
            return Err(LedgerError::NotFound);
        };
        if !from.contains(&state) {
            return Ok(Applied::keep(Reply::Moved(false)));
        }
        let revoked_at = if to == CredentialState::Revoked { Some(event.at()?.to_owned()) } else { None };
        // An ended credential's revocation handle is erased in the transaction that ends it.
        let ended = !matches!(to, CredentialState::Pending | CredentialState::Active);
        self.exec(
            sqlx::query(
                "UPDATE credentials SET state = $2, revoked_at = COALESCE($3, revoked_at), \
                 handle = CASE WHEN $4 THEN NULL ELSE handle END WHERE id = $1",
            )
            .bind(id)
            .bind(to.as_str())
            .bind(revoked_at)
            .bind(ended),
        )
        .await?;
        self.append(event).await?;
        Ok(Applied::keep(Reply::Moved(true)))
    }

    /// The kill-switch: after this commits, no activation on any replica can miss the rule,
    /// every pending row it matches is marked, every active credential it matches has a durable
    /// revocation job, and every replica is told to re-read the rules.
    async fn create_kill(
        &mut self,
        rule: &KillRule,
        selector: &str,
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        rule.selector.validate().map_err(|e| LedgerError::Conflict(e.to_string()))?;
        self.bump_kill_epoch().await?;
        let rule_id = id(rule.id);
        self.exec(
            sqlx::query(concat!(
                "INSERT INTO kill_rules (",
                rows::kill_rule_columns!(),
                ") VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ))
            .bind(&rule_id)
            .bind(selector)
            .bind(&rule.reason)
            .bind(ts(rule.created_at))
            .bind(&rule.created_by)
            .bind(ts_opt(rule.expires_at))
            .bind(ts_opt(rule.lifted_at)),
        )
        .await?;

        let mut effect = KillEffect::default();
        if rule.in_force(rule.created_at) {
            let run_at = ts(rule.created_at);
            for exchange in read::live_exchanges(&mut *self.conn).await? {
                if !exchange.matched_by(&rule.selector) {
                    continue;
                }
                for credential in &exchange.credentials {
                    let cid = credential.credential_id;
                    if credential.state == CredentialState::Pending {
                        self.exec(
                            sqlx::query(
                                "UPDATE credentials SET revoke_requested = TRUE, \
                                 revoke_requested_by = COALESCE(revoke_requested_by, $2) WHERE id = $1",
                            )
                            .bind(id(cid))
                            .bind(&rule_id),
                        )
                        .await?;
                        effect.pending_marked.push(cid);
                    } else {
                        let job = JobParams {
                            id: id(Uuid::now_v7()),
                            kind: JobKind::Revoke.as_str(),
                            credential_id: id(cid),
                            backend: credential.backend.as_str(),
                            kill_id: Some(rule_id.clone()),
                            run_at: run_at.clone(),
                        };
                        self.insert_job(&job).await?;
                        effect.jobs.push(cid);
                    }
                }
            }
        }
        self.append(event).await?;
        Ok(Applied::keep(Reply::KillEffect(effect)))
    }

    /// Moves the kill epoch and announces it.
    async fn bump_kill_epoch(&mut self) -> Result<(), LedgerError> {
        *self.kill_epoch = None;
        self.exec(sqlx::query("UPDATE kill_epoch SET epoch = epoch + 1 WHERE id = 1")).await?;
        self.announce(KILL_CHANNEL).await
    }

    /// Tells every replica's listener on `channel` that this schema changed. PostgreSQL delivers
    /// the notification on COMMIT only, and never for a transaction rolled back.
    async fn announce(&mut self, channel: &'static str) -> Result<(), LedgerError> {
        self.exec(sqlx::query("SELECT pg_notify($1, current_schema())::text").bind(channel)).await?;
        Ok(())
    }

    async fn record_lapses(&mut self, now: DateTime<Utc>, actor: &str) -> Result<Applied, LedgerError> {
        let rules = sqlx::query(concat!(
            "SELECT ",
            rows::kill_rule_columns!(),
            " FROM kill_rules WHERE expires_at IS NOT NULL AND expires_at <= $1 AND lifted_at IS NULL \
             AND lapse_recorded = FALSE ORDER BY created_at, id"
        ))
        .bind(ts(now))
        .fetch_all(&mut *self.conn)
        .await
        .map_err(db_err)?
        .iter()
        .map(kill_rule_from_row)
        .collect::<Result<Vec<_>, _>>()?;
        let mut lapsed = Vec::new();
        for rule in rules {
            let Some(expires_at) = rule.expires_at else { continue };
            self.exec(sqlx::query("UPDATE kill_rules SET lapse_recorded = TRUE WHERE id = $1").bind(id(rule.id)))
                .await?;
            let mut event = AuditEvent::new("kill.lapsed", expires_at);
            event.actor = Some(actor.to_owned());
            event.reason = Some(rule.reason.clone());
            event.detail = Some(serde_json::json!({
                "kill_id": rule.id,
                "selector": rule.selector,
                "created_by": rule.created_by,
                "noticed_at": ts(now),
            }));
            self.append(&EventParams::new(&event)).await?;
            lapsed.push(rule.id);
        }
        Ok(Applied::keep(Reply::KillIds(lapsed)))
    }

    async fn lift_kill(
        &mut self,
        rule_id: &str,
        now: &str,
        by: &str,
        reason: &str,
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let Some(stored) = self.stored_kill(rule_id).await? else {
            return Err(LedgerError::NotFound);
        };
        if let Some(at) = stored.rule.lifted_at {
            let who = stored.lifted_by.as_deref().unwrap_or("unknown");
            return Err(LedgerError::Conflict(format!("the rule was already lifted at {} by {who}", ts(at))));
        }
        let now_time = rows::parse_time(now).ok_or_else(|| LedgerError::Conflict(format!("bad time {now:?}")))?;
        if let Some(at) = stored.rule.expires_at.filter(|e| *e <= now_time) {
            return Err(LedgerError::Conflict(format!("the rule already lapsed at {}; nothing to lift", ts(at))));
        }
        self.bump_kill_epoch().await?;
        self.exec(
            sqlx::query("UPDATE kill_rules SET lifted_at = $2, lifted_by = $3, lift_reason = $4 WHERE id = $1")
                .bind(rule_id)
                .bind(now)
                .bind(by)
                .bind(reason),
        )
        .await?;
        self.append(event).await?;
        let lifted = self.stored_kill(rule_id).await?.ok_or(LedgerError::NotFound)?;
        Ok(Applied::keep(Reply::Kill(Box::new(lifted))))
    }

    async fn stored_kill(&mut self, rule_id: &str) -> Result<Option<StoredKill>, LedgerError> {
        let row = sqlx::query(concat!("SELECT ", stored_kill_columns!(), " FROM kill_rules WHERE id = $1"))
            .bind(rule_id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_err)?;
        row.as_ref().map(stored_kill_from_row).transpose()
    }

    async fn revoke_waiting(&mut self, credential_id: &str) -> Result<bool, LedgerError> {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM jobs WHERE credential_id = $1 AND kind = 'revoke' AND done_at IS NULL LIMIT 1",
        )
        .bind(credential_id)
        .fetch_optional(&mut *self.conn)
        .await
        .map_err(db_err)?;
        Ok(waiting.is_some())
    }

    async fn request_revoke(&mut self, job: &JobParams, event: &EventParams) -> Result<Applied, LedgerError> {
        let Some(state) = self.credential_state(&job.credential_id).await? else {
            return Err(LedgerError::NotFound);
        };
        let answer = match state {
            CredentialState::Active => {
                if self.revoke_waiting(&job.credential_id).await? {
                    return Ok(Applied::keep(Reply::Revoke(RevokeRequest::AlreadyQueued)));
                }
                self.insert_job(job).await?;
                RevokeRequest::Queued
            }
            CredentialState::Pending => {
                self.exec(
                    sqlx::query("UPDATE credentials SET revoke_requested = TRUE WHERE id = $1")
                        .bind(&job.credential_id),
                )
                .await?;
                RevokeRequest::Marked
            }
            ended => return Ok(Applied::keep(Reply::Revoke(RevokeRequest::Finished(ended)))),
        };
        self.append(event).await?;
        Ok(Applied::keep(Reply::Revoke(answer)))
    }

    async fn release(
        &mut self,
        revokes: &[(JobParams, EventParams)],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let mut answers = Vec::with_capacity(revokes.len());
        let mut changed = false;
        for (job, credential_event) in revokes {
            let Some(state) = self.credential_state(&job.credential_id).await? else {
                return Err(LedgerError::NotFound);
            };
            let answer = match state {
                CredentialState::Active => {
                    if self.revoke_waiting(&job.credential_id).await? {
                        RevokeRequest::AlreadyQueued
                    } else {
                        self.insert_job(job).await?;
                        self.append(credential_event).await?;
                        changed = true;
                        RevokeRequest::Queued
                    }
                }
                CredentialState::Pending => {
                    let n = self
                        .exec(
                            sqlx::query(
                                "UPDATE credentials SET revoke_requested = TRUE WHERE id = $1 AND NOT revoke_requested",
                            )
                            .bind(&job.credential_id),
                        )
                        .await?;
                    if n > 0 {
                        self.append(credential_event).await?;
                        changed = true;
                    }
                    RevokeRequest::Marked
                }
                ended => RevokeRequest::Finished(ended),
            };
            answers.push(answer);
        }
        if changed {
            self.append(event).await?;
        }
        Ok(Applied::keep(Reply::Revokes(answers)))
    }

    async fn finish_job(&mut self, job_id: &str, outcome: &FinishParams) -> Result<Applied, LedgerError> {
        let n = match outcome {
            FinishParams::Done { state, event } => {
                let outcome = match state {
                    CredentialState::Revoked => "revoked",
                    CredentialState::Expired => "expired",
                    other => {
                        return Err(LedgerError::Conflict(format!(
                            "a finished job leaves its credential revoked or expired, not {}",
                            other.as_str()
                        )));
                    }
                };
                let at = event.at()?.to_owned();
                self.exec(
                    sqlx::query(
                        "UPDATE jobs SET done_at = $2, outcome = $3, attempts = attempts + 1, leased_until = NULL \
                         WHERE id = $1 AND done_at IS NULL",
                    )
                    .bind(job_id)
                    .bind(at)
                    .bind(outcome),
                )
                .await?
            }
            FinishParams::Retry { run_at, error } => {
                self.exec(
                    sqlx::query(
                        "UPDATE jobs SET attempts = attempts + 1, run_at = $2, last_error = $3, leased_until = NULL \
                         WHERE id = $1 AND done_at IS NULL",
                    )
                    .bind(job_id)
                    .bind(run_at)
                    .bind(error),
                )
                .await?
            }
            FinishParams::Failed { error, event } => {
                let at = event.at()?.to_owned();
                self.exec(
                    sqlx::query(
                        "UPDATE jobs SET done_at = $2, outcome = 'failed', attempts = attempts + 1, \
                         last_error = $3, leased_until = NULL WHERE id = $1 AND done_at IS NULL",
                    )
                    .bind(job_id)
                    .bind(at)
                    .bind(error),
                )
                .await?
            }
        };
        if n == 0 {
            let exists: Option<i32> = sqlx::query_scalar("SELECT 1 FROM jobs WHERE id = $1")
                .bind(job_id)
                .fetch_optional(&mut *self.conn)
                .await
                .map_err(db_err)?;
            return Err(match exists {
                None => LedgerError::NotFound,
                Some(_) => LedgerError::Conflict("the job is already done".into()),
            });
        }
        match outcome {
            FinishParams::Done { state, event } => {
                let revoked_at = if *state == CredentialState::Revoked { Some(event.at()?.to_owned()) } else { None };
                self.exec(
                    sqlx::query(
                        "UPDATE credentials SET state = $2, revoked_at = COALESCE($3, revoked_at), handle = NULL \
                         WHERE id = (SELECT credential_id FROM jobs WHERE id = $1) AND state IN ('pending', 'active')",
                    )
                    .bind(job_id)
                    .bind(state.as_str())
                    .bind(revoked_at),
                )
                .await?;
                self.append(event).await?;
            }
            FinishParams::Failed { event, .. } => self.append(event).await?,
            FinishParams::Retry { .. } => {}
        }
        Ok(Applied::keep(Reply::Done))
    }

    async fn credential_state(&mut self, id: &str) -> Result<Option<CredentialState>, LedgerError> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM credentials WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_err)?;
        state
            .map(|s| rows::credential_state(&s).ok_or_else(|| rows::corrupt("credentials", "state", "unknown")))
            .transpose()
    }

    async fn credential_not_pending(&mut self, id: &str, what: &str) -> Result<LedgerError, LedgerError> {
        Ok(match self.credential_state(id).await? {
            None => LedgerError::NotFound,
            Some(s) => LedgerError::Conflict(format!("credential is {}, so it cannot {what}", s.as_str())),
        })
    }

    async fn exchange_not_pending(&mut self, id: &str, what: &str) -> Result<LedgerError, LedgerError> {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM exchanges WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *self.conn)
            .await
            .map_err(db_err)?;
        Ok(match state {
            None => LedgerError::NotFound,
            Some(s) => LedgerError::Conflict(format!("exchange is {s}, so it cannot {what}")),
        })
    }
}

/// Claims up to `limit` due jobs of `backend`'s credentials for this worker until
/// `lease_until`. `SKIP LOCKED` lets workers of every replica claim at once without waiting on
/// each other or taking the same job: a row another claim has locked is skipped, and once its
/// lease is written it is not due any more.
pub(super) async fn claim_jobs(
    conn: &mut PgConnection,
    now: &str,
    backend: &str,
    limit: i64,
    lease_until: &str,
) -> Result<Vec<crate::ledger::Job>, LedgerError> {
    let rows: Vec<PgRow> = sqlx::query(concat!(
        "UPDATE jobs SET leased_until = $3 WHERE id IN (SELECT id FROM jobs WHERE done_at IS NULL AND run_at <= $1 \
         AND (leased_until IS NULL OR leased_until <= $1) \
         AND backend = $4 ORDER BY run_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
         RETURNING ",
        job_columns!()
    ))
    .bind(now)
    .bind(limit)
    .bind(lease_until)
    .bind(backend)
    .fetch_all(conn)
    .await
    .map_err(db_err)?;
    let mut jobs = rows.iter().map(job_from_row).collect::<Result<Vec<_>, _>>()?;
    jobs.sort_by_key(|j| (j.run_at, j.id));
    Ok(jobs)
}
