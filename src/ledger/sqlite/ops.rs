//! What each write command ([`Op`]) does inside the SQLite writer's transaction.
//!
//! A command answers [`Applied::keep`] when its changes must stay and [`Applied::undo`] when the
//! answer itself means "nothing changed" (a killed or replayed activation); the writer takes its
//! changes back in that case and on any error (see `writer.rs`). A command may run twice: once
//! in a batch that was rolled back whole, then again; it never keeps state outside the
//! transaction.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};
use uuid::Uuid;

use super::codec::{
    self, credential_columns, exchange_columns, exec, job_columns, job_from_row, kill_rule_columns, kill_rule_from_row,
    query_all, query_opt, stored_kill_columns, stored_kill_from_row,
};
use super::writer::ChainHead;
use crate::audit::{AuditEvent, chain_hash};
use crate::kill::KillRule;
use crate::ledger::command::{
    Applied, CredentialParams, EventParams, ExchangeParams, FinishParams, Gate, JobParams, KeyParams, Op, Reply,
    check_intent, key_retired_event, resealed_event, retired_credential_event,
};
use crate::ledger::rows::{self, LiveExchange, LiveRow, id, ts, ts_opt};
use crate::ledger::{
    Activation, CredentialState, ExchangeState, JobKind, KillEffect, LedgerError, Reseal, ResealCount, Retired,
    RevokeRequest, SealedKind, StoredKill,
};
use crate::policy::limits::gcra;

const INSERT_EXCHANGE: &str = concat!(
    "INSERT INTO exchanges (",
    exchange_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
);

const INSERT_CREDENTIAL: &str = concat!(
    "INSERT INTO credentials (",
    credential_columns!(),
    ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)"
);

const INSERT_JOB: &str = "INSERT INTO jobs (id, kind, credential_id, kill_id, run_at, attempts, backend) \
     VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)";

const INSERT_EVENT: &str = "INSERT INTO audit_events (seq, prev_hash, hash, body) VALUES (?1, ?2, ?3, ?4)";

/// A command's view of the open transaction: the write connection and the chain head.
pub(super) struct Tx<'a> {
    pub(super) conn: &'a Connection,
    pub(super) head: &'a mut ChainHead,
}

impl Tx<'_> {
    pub(super) fn apply(&mut self, op: &Op) -> Result<Applied, LedgerError> {
        match op {
            Op::Refusal { exchange, event } => {
                if matches!(exchange.state, ExchangeState::Pending | ExchangeState::Allowed) {
                    return Err(LedgerError::Conflict(format!(
                        "a refusal ends denied or failed, not {}",
                        exchange.state.as_str()
                    )));
                }
                self.insert_exchange(exchange, exchange.state)?;
                self.append(event)?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::Intent { exchange, credentials, event } => {
                self.insert_intent(exchange, credentials)?;
                self.append(event)?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::IssueLocal { exchange, credentials, gate, jobs, event } => {
                self.issue_local(exchange, credentials, gate, jobs, event)
            }
            Op::Handle { credential_id, sealed, fingerprint, expires_at } => {
                // Only a pending row takes a handle: an active row's handle is what revocation
                // relies on, and a finished row has nothing left to revoke. A row a kill marked
                // `revoke_requested` still takes it: the exchange needs it to revoke.
                let n = exec(
                    self.conn,
                    "UPDATE credentials SET handle = ?2, fingerprint = ?3, expires_at = ?4 \
                     WHERE id = ?1 AND state = 'pending'",
                    params![credential_id, sealed, fingerprint, expires_at],
                )?;
                if n == 0 {
                    return Err(self.credential_not_pending(credential_id, "take a handle")?);
                }
                Ok(Applied::keep(Reply::Done))
            }
            Op::Activate { exchange_id, gate, jobs, event } => self.activate(exchange_id, gate, jobs, event),
            Op::Abort { exchange_id, state, error, reason, unrevoked, event } => {
                self.abort(exchange_id, *state, error, reason, unrevoked, event)
            }
            Op::Transition { id, from, to, event } => self.transition(id, from, *to, event),
            Op::CreateKill { rule, selector, event } => self.create_kill(rule, selector, event),
            Op::RecordLapses { now, actor } => self.record_lapses(*now, actor),
            Op::LiftKill { id, now, by, reason, event } => self.lift_kill(id, now, by, reason, event),
            Op::RequestRevoke { job, event } => self.request_revoke(job, event),
            Op::Release { revokes, event } => self.release(revokes, event),
            Op::EnqueueJobs(jobs) => {
                for job in jobs {
                    self.insert_job(job)?;
                }
                Ok(Applied::keep(Reply::Done))
            }
            Op::ClaimJobs { now, backend, limit, lease_until } => self.claim_jobs(now, backend, *limit, lease_until),
            Op::FinishJob { job_id, outcome } => self.finish_job(job_id, outcome),
            Op::AppendEvent(event) => {
                self.append(event)?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::InsertSigningKey { key, event } => {
                self.insert_signing_key(key)?;
                self.append(event)?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::RetireSigningKey { kid, at, replacement, signed_from, signed_until, event } => {
                self.retire_signing_key(kid, at, replacement.as_deref(), signed_from, signed_until.as_deref(), event)
            }
            Op::RecordCheckpoint { checkpoint: c, event } => {
                // Under the writer, nothing can move the row between this check and the insert.
                let on_chain = query_opt(self.conn, "SELECT hash FROM audit_events WHERE seq = ?1", [c.seq], |r| {
                    codec::Cols::new(r, "audit_events").text(0, "hash")
                })?;
                if on_chain.as_deref() != Some(c.hash.as_str()) {
                    return Err(LedgerError::Conflict(format!("event {} does not have the checkpoint's hash", c.seq)));
                }
                exec(
                    self.conn,
                    "INSERT INTO audit_checkpoints (seq, hash, signed_at, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![c.seq, c.hash, c.signed_at, c.key_id, c.signature],
                )?;
                self.append(event)?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::SetStreamPosition { name, seq } => {
                exec(
                    self.conn,
                    "INSERT INTO audit_stream_positions (name, seq) VALUES (?1, ?2) \
                     ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
                    params![name, seq],
                )?;
                Ok(Applied::keep(Reply::Done))
            }
            Op::Prune { now } => {
                let n = exec(self.conn, "DELETE FROM spent_jti WHERE keep_until < ?1", [&now])?;
                // A bucket whose time has passed is as good as a new one.
                exec(self.conn, "DELETE FROM rate_limits WHERE tat < ?1", [&now])?;
                Ok(Applied::keep(Reply::Count(n as u64)))
            }
            Op::TakeRate { key, now, interval, tolerance } => {
                let tat = query_opt(self.conn, "SELECT tat FROM rate_limits WHERE key = ?1", [&key], |r| {
                    codec::Cols::new(r, "rate_limits").time(0, "tat")
                })?;
                match gcra(tat, *now, *interval, *tolerance) {
                    Ok(next) => {
                        exec(
                            self.conn,
                            "INSERT INTO rate_limits (key, tat) VALUES (?1, ?2) \
                             ON CONFLICT (key) DO UPDATE SET tat = excluded.tat",
                            params![key, ts(next)],
                        )?;
                        Ok(Applied::keep(Reply::Wait(None)))
                    }
                    Err(wait) => Ok(Applied::keep(Reply::Wait(Some(wait)))),
                }
            }
            Op::Reseal { reseals, key_id, now } => self.reseal(reseals, key_id, *now),
        }
    }

    fn insert_signing_key(&self, key: &KeyParams) -> Result<(), LedgerError> {
        exec(
            self.conn,
            "INSERT INTO signing_keys (id, algorithm, sealed_private, public_jwk, created_at, signs_from) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![key.id, key.algorithm, key.sealed_private, key.public_jwk, key.created_at, key.signs_from],
        )?;
        Ok(())
    }

    /// A leaked signing key, retired: the key, its replacement, and the live `jwt` credentials it
    /// signed, all in this one command, so that no reader ever sees the key gone while its
    /// credentials still look live, or the key gone with nothing left to sign.
    fn retire_signing_key(
        &mut self,
        kid: &str,
        at: &str,
        replacement: Option<&KeyParams>,
        signed_from: &str,
        signed_until: Option<&str>,
        event: &AuditEvent,
    ) -> Result<Applied, LedgerError> {
        let n = exec(
            self.conn,
            "UPDATE signing_keys SET retired_at = ?2 WHERE id = ?1 AND retired_at IS NULL",
            params![kid, at],
        )?;
        if n == 0 {
            let known = query_opt(self.conn, "SELECT 1 FROM signing_keys WHERE id = ?1", [kid], |_| Ok(()))?;
            return Err(match known {
                Some(()) => LedgerError::Conflict(format!("signing key {kid} is already retired")),
                None => LedgerError::NotFound,
            });
        }
        if let Some(key) = replacement {
            self.insert_signing_key(key)?;
        }
        let left = query_opt(self.conn, "SELECT 1 FROM signing_keys WHERE retired_at IS NULL LIMIT 1", [], |_| Ok(()))?;
        if left.is_none() {
            return Err(LedgerError::Conflict("retiring the last signing key needs a replacement".into()));
        }
        let ended = query_all(
            self.conn,
            "SELECT id, state, agent, capability, subject, repository, fingerprint FROM credentials \
             WHERE backend = 'jwt' AND state IN ('pending', 'active') \
             AND created_at >= ?1 AND (?2 IS NULL OR created_at < ?2) AND expires_at > ?3 \
             ORDER BY created_at, id",
            params![signed_from, signed_until, at],
            |r| rows::retired_credential_from_row(r),
        )?;
        let mut retired = Retired::default();
        for c in &ended {
            let cid = id(c.id);
            if c.state == CredentialState::Pending {
                exec(self.conn, "UPDATE credentials SET revoke_requested = TRUE WHERE id = ?1", [&cid])?;
                retired.marked.push(c.id);
            } else {
                exec(
                    self.conn,
                    "UPDATE credentials SET state = 'revoked', revoked_at = ?2, handle = NULL WHERE id = ?1",
                    params![cid, at],
                )?;
                retired.revoked.push(c.id);
            }
            self.append(&retired_credential_event(event, kid, c))?;
        }
        self.append(&key_retired_event(event.clone(), &retired))?;
        Ok(Applied::keep(Reply::Retired(retired)))
    }

    /// Compare-and-set: a blob is replaced only while it is still the one the pass read.
    fn reseal(&mut self, reseals: &[Reseal], key_id: &str, now: DateTime<Utc>) -> Result<Applied, LedgerError> {
        let mut count = ResealCount::default();
        for r in reseals {
            let sql = match r.kind {
                SealedKind::CredentialHandle => "UPDATE credentials SET handle = ?2 WHERE id = ?1 AND handle = ?3",
                SealedKind::SigningKey => {
                    "UPDATE signing_keys SET sealed_private = ?2 WHERE id = ?1 AND sealed_private = ?3"
                }
            };
            match (exec(self.conn, sql, params![r.id, r.new, r.old])?, r.kind) {
                (0, _) => count.skipped += 1,
                (_, SealedKind::CredentialHandle) => count.credentials += 1,
                (_, SealedKind::SigningKey) => count.signing_keys += 1,
            }
        }
        if count.changed() > 0 {
            self.append(&resealed_event(now, key_id, &count))?;
        }
        Ok(Applied::keep(Reply::Resealed(count)))
    }

    /// Appends one event to the chain. The in-memory head moves with the row: the writer puts
    /// the head back whenever it takes a command's changes back.
    fn append(&mut self, event: &EventParams) -> Result<(), LedgerError> {
        let seq = self.head.seq + 1;
        let hash = chain_hash(&self.head.hash, event.body.as_bytes());
        exec(self.conn, INSERT_EVENT, params![seq, hex::encode(self.head.hash), hex::encode(hash), event.body])?;
        *self.head = ChainHead { seq, hash };
        Ok(())
    }

    /// Inserts `e` in `state` (an exchange may be written in a later state than it was built in).
    fn insert_exchange(&self, e: &ExchangeParams, state: ExchangeState) -> Result<(), LedgerError> {
        exec(
            self.conn,
            INSERT_EXCHANGE,
            params![
                e.id,
                e.request_id,
                e.created_at,
                state.as_str(),
                e.error,
                e.reason,
                e.issuer,
                e.subject,
                e.repository,
                e.workflow,
                e.capability,
                e.agent,
                e.claims,
                e.trace,
                e.policy_sha256,
                e.release_token_sha256,
                e.expires_at,
            ],
        )?;
        Ok(())
    }

    fn insert_job(&self, j: &JobParams) -> Result<(), LedgerError> {
        exec(self.conn, INSERT_JOB, params![j.id, j.kind, j.credential_id, j.kill_id, j.run_at, j.backend])?;
        Ok(())
    }

    fn insert_intent(
        &mut self,
        exchange: &ExchangeParams,
        credentials: &[CredentialParams],
    ) -> Result<(), LedgerError> {
        // Intent is recorded before any backend is called: everything starts pending, so that a
        // crash leaves rows the reconciler recognizes.
        check_intent(exchange, credentials)?;
        self.insert_exchange(exchange, exchange.state)?;
        for c in credentials {
            self.insert_credential(c, c.state)?;
        }
        Ok(())
    }

    /// Inserts `c` in `state`.
    fn insert_credential(&self, c: &CredentialParams, state: CredentialState) -> Result<(), LedgerError> {
        exec(
            self.conn,
            INSERT_CREDENTIAL,
            params![
                c.id,
                c.exchange_id,
                c.name,
                c.backend,
                state.as_str(),
                c.agent,
                c.capability,
                c.issuer,
                c.subject,
                c.repository,
                c.workflow,
                c.created_at,
                c.expires_at,
                c.fingerprint,
                c.handle,
                c.revoke_requested,
                c.revoked_at,
            ],
        )?;
        Ok(())
    }

    /// DESIGN step 7. In SQLite every write runs on the one writer connection inside `BEGIN
    /// IMMEDIATE`, so reading `kill_epoch` here is already serialized with [`Tx::create_kill`]'s
    /// bump of it; a PostgreSQL store takes the same row lock explicitly.
    fn activate(
        &mut self,
        exchange_id: &str,
        gate: &Gate,
        jobs: &[JobParams],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let n = exec(
            self.conn,
            "UPDATE exchanges SET state = 'allowed' WHERE id = ?1 AND state = 'pending'",
            [exchange_id],
        )?;
        if n == 0 {
            return Err(self.exchange_not_pending(exchange_id, "be activated")?);
        }

        if let Some(refused) = self.gate(gate, Some(exchange_id))? {
            return Ok(Applied::undo(Reply::Activation(refused)));
        }

        exec(
            self.conn,
            "UPDATE credentials SET state = 'active' WHERE exchange_id = ?1 AND state = 'pending'",
            [exchange_id],
        )?;
        for job in jobs {
            self.insert_job(job)?;
        }
        self.append(event)?;
        Ok(Applied::keep(Reply::Activation(Activation::Activated)))
    }

    /// Steps 5 to 7 at once for credentials no outside system holds (`jwt`): the checks of the
    /// activation come first, then the rows are written once, already `allowed` and `active`.
    /// No kill can have marked rows that did not exist, so the gate is the whole check.
    fn issue_local(
        &mut self,
        exchange: &ExchangeParams,
        credentials: &[CredentialParams],
        gate: &Gate,
        jobs: &[JobParams],
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        check_intent(exchange, credentials)?;
        if let Some(refused) = self.gate(gate, None)? {
            return Ok(Applied::undo(Reply::Activation(refused)));
        }
        self.insert_exchange(exchange, ExchangeState::Allowed)?;
        for c in credentials {
            self.insert_credential(c, CredentialState::Active)?;
        }
        for job in jobs {
            self.insert_job(job)?;
        }
        self.append(event)?;
        Ok(Applied::keep(Reply::Activation(Activation::Activated)))
    }

    /// The checks every activation passes, with kill creation held off: a refusal, or `None`
    /// when the credentials may become active (and the `jti` is then spent). `exchange_id` names
    /// rows already written pending, which a kill may have marked.
    fn gate(&mut self, gate: &Gate, exchange_id: Option<&str>) -> Result<Option<Activation>, LedgerError> {
        // (1) A kill created since the in-memory check of step 3 saw the rules: judge again with
        // the rules as stored now.
        if self.kill_epoch()? != gate.seen_kill_epoch {
            for rule in self.rules_in_force(gate.now)? {
                if rule.selector.matches(&gate.subject) {
                    return Ok(Some(Activation::Killed { rule_id: Some(rule.id) }));
                }
            }
        }

        // (2) A kill that matched while the rows were pending marked them; whatever the epoch
        // says, a marked row never becomes active.
        if let Some(exchange_id) = exchange_id {
            let marked = query_opt(
                self.conn,
                "SELECT 1 FROM credentials WHERE exchange_id = ?1 AND revoke_requested = TRUE LIMIT 1",
                [exchange_id],
                |_| Ok(()),
            )?;
            if marked.is_some() {
                return Ok(Some(Activation::Killed { rule_id: None }));
            }
        }

        // (3) The policy's max_active, judged with every other activation held off.
        if let Some(limit) = &gate.max_active {
            let live =
                super::read::live_count(self.conn, &limit.agent, limit.repository.as_deref(), gate.now, exchange_id)?;
            if live.exchanges >= u64::from(limit.limit) {
                return Ok(Some(Activation::Limited { live: live.exchanges }));
            }
        }

        // (4) Single use: the binding check. The primary key makes a second spend a no-op.
        if let Some((issuer, jti, capability, keep_until)) = &gate.jti {
            let n = exec(
                self.conn,
                "INSERT INTO spent_jti (issuer, jti, capability, keep_until) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (issuer, jti, capability) DO NOTHING",
                params![issuer, jti, capability, keep_until],
            )?;
            if n == 0 {
                return Ok(Some(Activation::Replay));
            }
        }
        Ok(None)
    }

    fn abort(
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
        let n = exec(
            self.conn,
            "UPDATE exchanges SET state = ?2, error = ?3, reason = ?4 WHERE id = ?1 AND state = 'pending'",
            params![exchange_id, state.as_str(), error, reason],
        )?;
        if n == 0 {
            return Err(self.exchange_not_pending(exchange_id, "be aborted")?);
        }
        let pending = query_all(
            self.conn,
            "SELECT id FROM credentials WHERE exchange_id = ?1 AND state = 'pending'",
            [exchange_id],
            |r| codec::Cols::new(r, "credentials").text(0, "id"),
        )?;
        // What could not be revoked stays pending: the reconciler retries it, and a `failed` row
        // would claim that nothing is issued.
        for cid in pending.iter().filter(|c| !unrevoked.contains(c)) {
            exec(self.conn, "UPDATE credentials SET state = 'failed', handle = NULL WHERE id = ?1", [cid])?;
        }
        self.append(event)?;
        Ok(Applied::keep(Reply::Done))
    }

    fn transition(
        &mut self,
        id: &str,
        from: &[CredentialState],
        to: CredentialState,
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let Some(state) = self.credential_state(id)? else {
            return Err(LedgerError::NotFound);
        };
        if !from.contains(&state) {
            return Ok(Applied::keep(Reply::Moved(false)));
        }
        let revoked_at = if to == CredentialState::Revoked { Some(event.at()?) } else { None };
        // A credential that has ended needs no revocation handle any more: it is erased in the
        // transaction that ends it (DESIGN "Sealing").
        let ended = !matches!(to, CredentialState::Pending | CredentialState::Active);
        exec(
            self.conn,
            "UPDATE credentials SET state = ?2, revoked_at = COALESCE(?3, revoked_at), \
             handle = CASE WHEN ?4 THEN NULL ELSE handle END WHERE id = ?1",
            params![id, to.as_str(), revoked_at, ended],
        )?;
        self.append(event)?;
        Ok(Applied::keep(Reply::Moved(true)))
    }

    /// The kill-switch, under the kill lock (see [`Tx::activate`]): after this commits, no
    /// activation can miss the rule, every pending row it matches is marked, and every active
    /// credential it matches has a durable revocation job.
    fn create_kill(&mut self, rule: &KillRule, selector: &str, event: &EventParams) -> Result<Applied, LedgerError> {
        rule.selector.validate().map_err(|e| LedgerError::Conflict(e.to_string()))?;
        exec(self.conn, "UPDATE kill_epoch SET epoch = epoch + 1 WHERE id = 1", [])?;
        let rule_id = id(rule.id);
        exec(
            self.conn,
            concat!("INSERT INTO kill_rules (", kill_rule_columns!(), ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"),
            params![
                rule_id,
                selector,
                rule.reason,
                ts(rule.created_at),
                rule.created_by,
                ts_opt(rule.expires_at),
                ts_opt(rule.lifted_at),
            ],
        )?;

        let mut effect = KillEffect::default();
        if rule.in_force(rule.created_at) {
            let run_at = ts(rule.created_at);
            for exchange in live_exchanges(self.conn)? {
                if !exchange.matched_by(&rule.selector) {
                    continue;
                }
                for credential in &exchange.credentials {
                    let cid = &credential.credential_id;
                    let cid_text = id(*cid);
                    match credential.state {
                        CredentialState::Pending => {
                            // The first rule to mark a row is the one its report counts it under.
                            exec(
                                self.conn,
                                "UPDATE credentials SET revoke_requested = TRUE, \
                                 revoke_requested_by = COALESCE(revoke_requested_by, ?2) WHERE id = ?1",
                                params![cid_text, rule_id],
                            )?;
                            effect.pending_marked.push(*cid);
                        }
                        _ => {
                            let job = JobParams {
                                id: id(Uuid::now_v7()),
                                kind: JobKind::Revoke.as_str(),
                                credential_id: cid_text,
                                backend: credential.backend.as_str(),
                                kill_id: Some(rule_id.clone()),
                                run_at: run_at.clone(),
                            };
                            self.insert_job(&job)?;
                            effect.jobs.push(*cid);
                        }
                    }
                }
            }
        }
        self.append(event)?;
        Ok(Applied::keep(Reply::KillEffect(effect)))
    }

    /// Records the lapse of every rule whose expiry has passed, once: the flag and the event
    /// are written together, and a rule whose flag is set is never looked at again.
    fn record_lapses(&mut self, now: DateTime<Utc>, actor: &str) -> Result<Applied, LedgerError> {
        let rules = query_all(
            self.conn,
            concat!(
                "SELECT ",
                kill_rule_columns!(),
                " FROM kill_rules WHERE expires_at IS NOT NULL AND expires_at <= ?1 AND lifted_at IS NULL \
                 AND lapse_recorded = FALSE ORDER BY created_at, id"
            ),
            [ts(now)],
            |r| kill_rule_from_row(r),
        )?;
        let mut lapsed = Vec::new();
        for rule in rules {
            let Some(expires_at) = rule.expires_at else { continue };
            exec(self.conn, "UPDATE kill_rules SET lapse_recorded = TRUE WHERE id = ?1", [id(rule.id)])?;
            // The event's time is when the rule lapsed, not when a refresher noticed.
            let mut event = AuditEvent::new("kill.lapsed", expires_at);
            event.actor = Some(actor.to_owned());
            event.reason = Some(rule.reason.clone());
            event.detail = Some(serde_json::json!({
                "kill_id": rule.id,
                "selector": rule.selector,
                "created_by": rule.created_by,
                "noticed_at": ts(now),
            }));
            self.append(&EventParams::new(&event))?;
            lapsed.push(rule.id);
        }
        Ok(Applied::keep(Reply::KillIds(lapsed)))
    }

    /// Lifts a rule under the kill lock: the epoch moves, so an activation that judged with
    /// the rule in memory re-reads the rules. Nothing that was revoked comes back.
    fn lift_kill(
        &mut self,
        rule_id: &str,
        now: &str,
        by: &str,
        reason: &str,
        event: &EventParams,
    ) -> Result<Applied, LedgerError> {
        let Some(stored) = self.stored_kill(rule_id)? else {
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
        exec(self.conn, "UPDATE kill_epoch SET epoch = epoch + 1 WHERE id = 1", [])?;
        exec(
            self.conn,
            "UPDATE kill_rules SET lifted_at = ?2, lifted_by = ?3, lift_reason = ?4 WHERE id = ?1",
            params![rule_id, now, by, reason],
        )?;
        self.append(event)?;
        let lifted = self.stored_kill(rule_id)?.ok_or(LedgerError::NotFound)?;
        Ok(Applied::keep(Reply::Kill(Box::new(lifted))))
    }

    fn stored_kill(&self, rule_id: &str) -> Result<Option<StoredKill>, LedgerError> {
        query_opt(
            self.conn,
            concat!("SELECT ", stored_kill_columns!(), " FROM kill_rules WHERE id = ?1"),
            [rule_id],
            |r| stored_kill_from_row(r),
        )
    }

    /// One credential revoked on request: an active one gets a revocation job (one at a time),
    /// a pending one is marked so that its exchange can never activate it.
    fn request_revoke(&mut self, job: &JobParams, event: &EventParams) -> Result<Applied, LedgerError> {
        let Some(state) = self.credential_state(&job.credential_id)? else {
            return Err(LedgerError::NotFound);
        };
        let answer = match state {
            CredentialState::Active => {
                let waiting = query_opt(
                    self.conn,
                    "SELECT 1 FROM jobs WHERE credential_id = ?1 AND kind = 'revoke' AND done_at IS NULL LIMIT 1",
                    [&job.credential_id],
                    |_| Ok(()),
                )?;
                if waiting.is_some() {
                    return Ok(Applied::keep(Reply::Revoke(RevokeRequest::AlreadyQueued)));
                }
                self.insert_job(job)?;
                RevokeRequest::Queued
            }
            CredentialState::Pending => {
                exec(self.conn, "UPDATE credentials SET revoke_requested = TRUE WHERE id = ?1", [&job.credential_id])?;
                RevokeRequest::Marked
            }
            ended => return Ok(Applied::keep(Reply::Revoke(RevokeRequest::Finished(ended)))),
        };
        self.append(event)?;
        Ok(Applied::keep(Reply::Revoke(answer)))
    }

    /// An exchange given back by its holder: every credential revoked as [`Self::request_revoke`]
    /// would, in one transaction, with `event` (`exchange.released`) written only when something
    /// changed. Unlike an admin's request, a pending row already marked is left alone, so that a
    /// repeated release writes nothing at all.
    fn release(&mut self, revokes: &[(JobParams, EventParams)], event: &EventParams) -> Result<Applied, LedgerError> {
        let mut answers = Vec::with_capacity(revokes.len());
        let mut changed = false;
        for (job, credential_event) in revokes {
            let Some(state) = self.credential_state(&job.credential_id)? else {
                return Err(LedgerError::NotFound);
            };
            let answer = match state {
                CredentialState::Active => {
                    let waiting = query_opt(
                        self.conn,
                        "SELECT 1 FROM jobs WHERE credential_id = ?1 AND kind = 'revoke' AND done_at IS NULL LIMIT 1",
                        [&job.credential_id],
                        |_| Ok(()),
                    )?;
                    if waiting.is_some() {
                        RevokeRequest::AlreadyQueued
                    } else {
                        self.insert_job(job)?;
                        self.append(credential_event)?;
                        changed = true;
                        RevokeRequest::Queued
                    }
                }
                CredentialState::Pending => {
                    let n = exec(
                        self.conn,
                        "UPDATE credentials SET revoke_requested = TRUE WHERE id = ?1 AND NOT revoke_requested",
                        [&job.credential_id],
                    )?;
                    if n > 0 {
                        self.append(credential_event)?;
                        changed = true;
                    }
                    RevokeRequest::Marked
                }
                ended => RevokeRequest::Finished(ended),
            };
            answers.push(answer);
        }
        if changed {
            self.append(event)?;
        }
        Ok(Applied::keep(Reply::Revokes(answers)))
    }

    fn claim_jobs(&self, now: &str, backend: &str, limit: i64, lease_until: &str) -> Result<Applied, LedgerError> {
        // Claiming is a write (it sets the lease), so it runs on the writer: two workers can never
        // claim the same job while its lease stands. Ties of `run_at` come in index order, which
        // is the order they were enqueued (rowid): `jobs_due` reads them without a sort.
        let jobs = query_all(
            self.conn,
            concat!(
                "SELECT ",
                job_columns!(),
                " FROM jobs WHERE done_at IS NULL AND run_at <= ?1 \
                 AND (leased_until IS NULL OR leased_until <= ?1) \
                 AND backend = ?3 ORDER BY run_at LIMIT ?2"
            ),
            params![now, limit, backend],
            |r| job_from_row(r),
        )?;
        for job in &jobs {
            exec(self.conn, "UPDATE jobs SET leased_until = ?2 WHERE id = ?1", params![id(job.id), lease_until])?;
        }
        Ok(Applied::keep(Reply::Jobs(jobs)))
    }

    fn finish_job(&mut self, job_id: &str, outcome: &FinishParams) -> Result<Applied, LedgerError> {
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
                let at = event.at()?;
                exec(
                    self.conn,
                    "UPDATE jobs SET done_at = ?2, outcome = ?3, attempts = attempts + 1, leased_until = NULL \
                     WHERE id = ?1 AND done_at IS NULL",
                    params![job_id, at, outcome],
                )?
            }
            FinishParams::Retry { run_at, error } => exec(
                self.conn,
                "UPDATE jobs SET attempts = attempts + 1, run_at = ?2, last_error = ?3, leased_until = NULL \
                 WHERE id = ?1 AND done_at IS NULL",
                params![job_id, run_at, error],
            )?,
            FinishParams::Failed { error, event } => exec(
                self.conn,
                "UPDATE jobs SET done_at = ?2, outcome = 'failed', attempts = attempts + 1, last_error = ?3, \
                 leased_until = NULL WHERE id = ?1 AND done_at IS NULL",
                params![job_id, event.at()?, error],
            )?,
        };
        if n == 0 {
            let exists = query_opt(self.conn, "SELECT 1 FROM jobs WHERE id = ?1", [job_id], |_| Ok(()))?;
            return Err(match exists {
                None => LedgerError::NotFound,
                Some(()) => LedgerError::Conflict("the job is already done".into()),
            });
        }
        match outcome {
            FinishParams::Done { state, event } => {
                // The credential the job was stored with, not the caller's copy. Only a live row
                // moves: a credential already revoked or expired keeps its first end.
                let revoked_at = if *state == CredentialState::Revoked { Some(event.at()?) } else { None };
                exec(
                    self.conn,
                    "UPDATE credentials SET state = ?2, revoked_at = COALESCE(?3, revoked_at), handle = NULL \
                     WHERE id = (SELECT credential_id FROM jobs WHERE id = ?1) AND state IN ('pending', 'active')",
                    params![job_id, state.as_str(), revoked_at],
                )?;
                self.append(event)?;
            }
            FinishParams::Failed { event, .. } => self.append(event)?,
            FinishParams::Retry { .. } => {}
        }
        Ok(Applied::keep(Reply::Done))
    }

    fn kill_epoch(&self) -> Result<i64, LedgerError> {
        query_opt(self.conn, "SELECT epoch FROM kill_epoch WHERE id = 1", [], |r| {
            codec::Cols::new(r, "kill_epoch").int(0, "epoch")
        })?
        .ok_or_else(|| LedgerError::Corrupt("kill_epoch: the row is missing".into()))
    }

    fn rules_in_force(&self, now: DateTime<Utc>) -> Result<Vec<KillRule>, LedgerError> {
        rules_in_force(self.conn, now)
    }

    fn credential_state(&self, id: &str) -> Result<Option<CredentialState>, LedgerError> {
        query_opt(self.conn, "SELECT state FROM credentials WHERE id = ?1", [id], |r| {
            let s = codec::Cols::new(r, "credentials").text(0, "state")?;
            rows::credential_state(&s).ok_or_else(|| LedgerError::Corrupt("credentials.state: unknown".into()))
        })
    }

    /// Why a conditional update of a pending credential changed nothing.
    fn credential_not_pending(&self, id: &str, what: &str) -> Result<LedgerError, LedgerError> {
        Ok(match self.credential_state(id)? {
            None => LedgerError::NotFound,
            Some(s) => LedgerError::Conflict(format!("credential is {}, so it cannot {what}", s.as_str())),
        })
    }

    /// Why a conditional update of a pending exchange changed nothing.
    fn exchange_not_pending(&self, id: &str, what: &str) -> Result<LedgerError, LedgerError> {
        let state = query_opt(self.conn, "SELECT state FROM exchanges WHERE id = ?1", [id], |r| {
            codec::Cols::new(r, "exchanges").text(0, "state")
        })?;
        Ok(match state {
            None => LedgerError::NotFound,
            Some(s) => LedgerError::Conflict(format!("exchange is {s}, so it cannot {what}")),
        })
    }
}

/// The kill rules in force at `now`, oldest first (so the rule named in an answer is stable).
pub(super) fn rules_in_force(conn: &Connection, now: DateTime<Utc>) -> Result<Vec<KillRule>, LedgerError> {
    let mut rules = query_all(
        conn,
        concat!(
            "SELECT ",
            kill_rule_columns!(),
            " FROM kill_rules WHERE lifted_at IS NULL AND (expires_at IS NULL OR expires_at > ?1) \
             ORDER BY created_at, id"
        ),
        [ts(now)],
        |r| kill_rule_from_row(r),
    )?;
    // The text comparison above works at millisecond precision; this one is exact.
    rules.retain(|r| r.in_force(now));
    Ok(rules)
}

/// Every exchange that holds pending or active credentials, as a kill subject.
pub(super) fn live_exchanges(conn: &Connection) -> Result<Vec<LiveExchange>, LedgerError> {
    let rows = query_all(conn, rows::LIVE_CREDENTIALS, [], |r| {
        let c = codec::Cols::new(r, "credentials");
        Ok(LiveRow {
            exchange_id: c.text(0, "exchange_id")?,
            id: c.text(1, "id")?,
            state: c.text(2, "state")?,
            agent: c.text(3, "agent")?,
            capability: c.text(4, "capability")?,
            issuer: c.text(5, "issuer")?,
            subject: c.text(6, "subject")?,
            repository: c.opt_text(7, "repository")?,
            workflow: c.opt_text(8, "workflow")?,
            claims: c.text(9, "claims")?,
            backend: c.text(10, "backend")?,
        })
    })?;
    rows::group_live(rows)
}
