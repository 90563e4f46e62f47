-- latchkey ledger on PostgreSQL, schema version 1: the same tables, columns and meanings as
-- migrations/sqlite (versions 1 to 3 there), so that both stores hold the same data and the audit
-- chain is byte for byte the same.
--
-- Conventions shared with migrations/sqlite:
-- * ids are UUIDs in their hyphenated lowercase text form;
-- * timestamps are RFC 3339 UTC strings of fixed width with milliseconds and a `Z`
--   (`2025-01-31T12:00:00.000Z`), so text order is time order (columns use the C collation so
--   that ordering is byte order whatever the database's locale);
-- * JSON documents (claims, traces, selectors, JWKs) are stored as text, exactly as written;
-- * no secret is ever stored, except sealed revocation handles and sealed signing keys.
--
-- Beside them, two tables only PostgreSQL needs, because several replicas write:
-- * `audit_head`: the chain head, one row. Every write transaction locks it first (`FOR
--   UPDATE`), which serializes writers across replicas: the chain never forks, and kill
--   creation and activation (DESIGN step 7) are serialized too.
-- * `latchkey_schema`: the schema version, which `serve` checks and `migrate` advances.

CREATE TABLE exchanges (
    id                   TEXT COLLATE "C" PRIMARY KEY,
    request_id           TEXT NOT NULL,
    created_at           TEXT COLLATE "C" NOT NULL,
    state                TEXT NOT NULL CHECK (state IN ('pending', 'allowed', 'denied', 'failed')),
    error                TEXT,
    reason               TEXT,
    issuer               TEXT,
    subject              TEXT,
    repository           TEXT,
    workflow             TEXT,
    capability           TEXT,
    agent                TEXT,
    claims               TEXT NOT NULL,
    trace                TEXT NOT NULL,
    policy_sha256        TEXT,
    release_token_sha256 TEXT,
    expires_at           TEXT COLLATE "C"
);

CREATE INDEX exchanges_created_at ON exchanges (created_at, id);
CREATE INDEX exchanges_agent ON exchanges (agent, created_at);
CREATE INDEX exchanges_capability ON exchanges (capability, created_at);
CREATE INDEX exchanges_repository ON exchanges (repository, created_at);
CREATE INDEX exchanges_state ON exchanges (state, created_at);
CREATE INDEX exchanges_subject ON exchanges (subject, created_at);

CREATE TABLE credentials (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    exchange_id         TEXT COLLATE "C" NOT NULL REFERENCES exchanges (id),
    name                TEXT NOT NULL,
    backend             TEXT NOT NULL CHECK (backend IN ('github', 'aws', 'vault', 'jwt')),
    state               TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked', 'expired', 'failed')),
    agent               TEXT NOT NULL,
    capability          TEXT NOT NULL,
    issuer              TEXT NOT NULL,
    subject             TEXT NOT NULL,
    repository          TEXT,
    workflow            TEXT,
    created_at          TEXT COLLATE "C" NOT NULL,
    expires_at          TEXT COLLATE "C" NOT NULL,
    fingerprint         TEXT,
    handle              BYTEA,
    revoke_requested    BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_at          TEXT COLLATE "C",
    revoke_requested_by TEXT COLLATE "C"
);

CREATE INDEX credentials_exchange ON credentials (exchange_id);
CREATE INDEX credentials_state ON credentials (state, created_at);
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_agent ON credentials (agent, created_at);
CREATE INDEX credentials_capability ON credentials (capability, created_at);
CREATE INDEX credentials_repository ON credentials (repository, created_at);
CREATE INDEX credentials_created_at ON credentials (created_at, id);
CREATE INDEX credentials_revoke_requested_by ON credentials (revoke_requested_by)
    WHERE revoke_requested_by IS NOT NULL;

CREATE TABLE spent_jti (
    issuer     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    capability TEXT NOT NULL,
    keep_until TEXT COLLATE "C" NOT NULL,
    PRIMARY KEY (issuer, jti, capability)
);

CREATE INDEX spent_jti_keep_until ON spent_jti (keep_until);

CREATE TABLE kill_rules (
    id             TEXT COLLATE "C" PRIMARY KEY,
    selector       TEXT NOT NULL,
    reason         TEXT NOT NULL,
    created_at     TEXT COLLATE "C" NOT NULL,
    created_by     TEXT NOT NULL,
    expires_at     TEXT COLLATE "C",
    lifted_at      TEXT COLLATE "C",
    lifted_by      TEXT,
    lift_reason    TEXT,
    lapse_recorded BOOLEAN NOT NULL DEFAULT FALSE
);

CREATE INDEX kill_rules_created_at ON kill_rules (created_at, id);
CREATE INDEX kill_rules_unrecorded_lapse ON kill_rules (expires_at)
    WHERE expires_at IS NOT NULL AND lifted_at IS NULL AND lapse_recorded = FALSE;

-- The kill epoch of DESIGN step 7: every kill creation and lift bumps it; an activation whose
-- in-memory rules are of an older epoch re-reads the rules inside its transaction.
CREATE TABLE kill_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);

INSERT INTO kill_epoch (id, epoch) VALUES (1, 0);

CREATE TABLE jobs (
    id            TEXT COLLATE "C" PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('revoke_at_ttl', 'revoke')),
    credential_id TEXT COLLATE "C" NOT NULL REFERENCES credentials (id),
    kill_id       TEXT COLLATE "C" REFERENCES kill_rules (id),
    run_at        TEXT COLLATE "C" NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    leased_until  TEXT COLLATE "C",
    done_at       TEXT COLLATE "C",
    outcome       TEXT CHECK (outcome IN ('revoked', 'expired', 'failed'))
);

CREATE INDEX jobs_due ON jobs (run_at, id) WHERE done_at IS NULL;
CREATE INDEX jobs_credential ON jobs (credential_id);
CREATE INDEX jobs_kill ON jobs (kill_id);

CREATE TABLE audit_events (
    seq       BIGINT PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    body      TEXT NOT NULL
);

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT NOT NULL,
    hash TEXT NOT NULL
);

INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TABLE audit_checkpoints (
    seq       BIGINT PRIMARY KEY,
    hash      TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    signature TEXT NOT NULL
);

CREATE TABLE audit_stream_positions (
    name TEXT PRIMARY KEY,
    seq  BIGINT NOT NULL
);

CREATE TABLE signing_keys (
    id             TEXT COLLATE "C" PRIMARY KEY,
    algorithm      TEXT NOT NULL,
    sealed_private BYTEA NOT NULL,
    public_jwk     TEXT NOT NULL,
    created_at     TEXT COLLATE "C" NOT NULL
);
