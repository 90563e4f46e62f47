-- latchkey ledger, schema version 2: what the kill-switch API needs beside the rules.
--
-- * `kill_rules.lifted_by`, `lift_reason`: who lifted a rule and why (the audit event says it
--   too; the rule's own row answers `GET /v1/kills/{id}` without reading the chain).
-- * `kill_rules.lapse_recorded`: set in the same transaction as the rule's one `kill.lapsed`
--   audit event, so that a rule lapses in the audit trail exactly once, across restarts.
-- * `credentials.revoke_requested_by`: the kill rule that marked a pending row
--   `revoke_requested`, so that the rule's revocation report can count the rows it stopped.

ALTER TABLE kill_rules ADD COLUMN lifted_by TEXT;
ALTER TABLE kill_rules ADD COLUMN lift_reason TEXT;
ALTER TABLE kill_rules ADD COLUMN lapse_recorded BOOLEAN NOT NULL DEFAULT FALSE;

ALTER TABLE credentials ADD COLUMN revoke_requested_by TEXT;

CREATE INDEX credentials_revoke_requested_by ON credentials (revoke_requested_by)
    WHERE revoke_requested_by IS NOT NULL;

-- Rules with an expiry that no lapse has been recorded for yet: what the refresher looks at.
CREATE INDEX kill_rules_unrecorded_lapse ON kill_rules (expires_at)
    WHERE expires_at IS NOT NULL AND lifted_at IS NULL AND lapse_recorded = FALSE;

-- A sealed handle is kept only while its credential can still be revoked: rows that already
-- ended lose theirs now, as every later end does in the transaction that ends it.
UPDATE credentials SET handle = NULL WHERE state IN ('revoked', 'expired', 'failed');
