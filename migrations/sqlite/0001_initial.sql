-- latchkey ledger, schema version 1.
--
-- Conventions (shared with migrations/postgres, so that both stores mean the same thing):
-- * ids are UUIDs in their hyphenated lowercase text form;
-- * timestamps are RFC 3339 UTC strings of fixed width with milliseconds and a `Z`
--   (`2025-01-31T12:00:00.000Z`), so text order is time order;
-- * JSON documents (claims, traces, selectors, JWKs) are stored as text;
-- * booleans are written TRUE/FALSE;
-- * no secret is ever stored, except sealed revocation handles and sealed signing keys.

-- One row per exchange request, allowed or not.
CREATE TABLE exchanges (
    id                   TEXT PRIMARY KEY,
    request_id           TEXT NOT NULL,
    created_at           TEXT NOT NULL,
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
    expires_at           TEXT
);

CREATE INDEX exchanges_created_at ON exchanges (created_at);
CREATE INDEX exchanges_agent ON exchanges (agent, created_at);
CREATE INDEX exchanges_capability ON exchanges (capability, created_at);

-- One row per grant of an exchange. `handle` is sealed; `revoke_requested` is set by a kill
-- rule on a pending row and forbids its activation.
CREATE TABLE credentials (
    id               TEXT PRIMARY KEY,
    exchange_id      TEXT NOT NULL REFERENCES exchanges (id),
    name             TEXT NOT NULL,
    backend          TEXT NOT NULL CHECK (backend IN ('github', 'aws', 'vault', 'jwt')),
    state            TEXT NOT NULL CHECK (state IN ('pending', 'active', 'revoked', 'expired', 'failed')),
    agent            TEXT NOT NULL,
    capability       TEXT NOT NULL,
    issuer           TEXT NOT NULL,
    subject          TEXT NOT NULL,
    repository       TEXT,
    workflow         TEXT,
    created_at       TEXT NOT NULL,
    expires_at       TEXT NOT NULL,
    fingerprint      TEXT,
    handle           BLOB,
    revoke_requested BOOLEAN NOT NULL DEFAULT FALSE,
    revoked_at       TEXT
);

CREATE INDEX credentials_exchange ON credentials (exchange_id);
CREATE INDEX credentials_state ON credentials (state, created_at);
CREATE INDEX credentials_expires_at ON credentials (expires_at);
CREATE INDEX credentials_agent ON credentials (agent, created_at);
CREATE INDEX credentials_capability ON credentials (capability, created_at);
CREATE INDEX credentials_repository ON credentials (repository, created_at);

-- Single-use subject tokens (DESIGN step 2): spent once per capability, kept until the token
-- could no longer be presented (`exp` + leeway), then pruned.
CREATE TABLE spent_jti (
    issuer     TEXT NOT NULL,
    jti        TEXT NOT NULL,
    capability TEXT NOT NULL,
    keep_until TEXT NOT NULL,
    PRIMARY KEY (issuer, jti, capability)
);

CREATE INDEX spent_jti_keep_until ON spent_jti (keep_until);

-- Kill rules. A rule is never deleted: lifting sets `lifted_at`.
CREATE TABLE kill_rules (
    id         TEXT PRIMARY KEY,
    selector   TEXT NOT NULL,
    reason     TEXT NOT NULL,
    created_at TEXT NOT NULL,
    created_by TEXT NOT NULL,
    expires_at TEXT,
    lifted_at  TEXT
);

CREATE INDEX kill_rules_created_at ON kill_rules (created_at);

-- The kill lock of DESIGN step 7: exactly one row. Every kill creation bumps `epoch` and every
-- activation reads it in the same transaction, so the two are serialized and an activation
-- that raced a kill sees it.
CREATE TABLE kill_epoch (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    epoch BIGINT NOT NULL
);

INSERT INTO kill_epoch (id, epoch) VALUES (1, 0);

-- Durable background work. A job is due when `run_at` has passed, it is not done, and any
-- lease (a worker's claim) has ended.
CREATE TABLE jobs (
    id            TEXT PRIMARY KEY,
    kind          TEXT NOT NULL CHECK (kind IN ('revoke_at_ttl', 'revoke')),
    credential_id TEXT NOT NULL REFERENCES credentials (id),
    kill_id       TEXT REFERENCES kill_rules (id),
    run_at        TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    leased_until  TEXT,
    done_at       TEXT,
    outcome       TEXT CHECK (outcome IN ('revoked', 'expired', 'failed'))
);

CREATE INDEX jobs_due ON jobs (run_at) WHERE done_at IS NULL;
CREATE INDEX jobs_credential ON jobs (credential_id);
CREATE INDEX jobs_kill ON jobs (kill_id);

-- The hash-chained audit log. `body` is the exact canonical JSON (RFC 8785) that was hashed;
-- `hash` = hex SHA-256(prev hash bytes ‖ body). Rows are only ever appended.
CREATE TABLE audit_events (
    seq       INTEGER PRIMARY KEY,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    body      TEXT NOT NULL
);

-- Signing keys of the `jwt` backend; the private key is sealed.
CREATE TABLE signing_keys (
    id             TEXT PRIMARY KEY,
    algorithm      TEXT NOT NULL,
    sealed_private BLOB NOT NULL,
    public_jwk     TEXT NOT NULL,
    created_at     TEXT NOT NULL
);
