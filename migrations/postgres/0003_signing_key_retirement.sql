-- latchkey ledger on PostgreSQL: emergency retirement of a `jwt` signing key, and an index for
-- the paged re-seal pass, as migrations/sqlite's 0005_signing_key_retirement.
ALTER TABLE signing_keys ADD COLUMN retired_at TEXT COLLATE "C";
ALTER TABLE signing_keys ADD COLUMN signs_from TEXT COLLATE "C";

CREATE INDEX credentials_sealed ON credentials (id) WHERE handle IS NOT NULL;
