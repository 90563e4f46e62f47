-- latchkey ledger: what auditing needs beside the hash chain.
--
-- * `audit_checkpoints`: signed statements "event `seq` has hash `hash`", Ed25519 with a key
--   kept outside the database. Each is also an `audit.checkpoint` event on the chain and a line
--   on the audit stream, so a copy survives outside the store. `latchkey audit verify` checks
--   every one against the chain: an edited event whose later hashes were recomputed, or a cut
--   tail, disagrees with a checkpoint signed before the tampering.
-- * `audit_stream_positions`: the last sequence number each audit stream delivered, so that a
--   restart resumes the stream instead of losing or repeating events.
-- * Indexes for the auditors' listings (`GET /v1/exchanges`, `GET /v1/credentials`).

CREATE TABLE audit_checkpoints (
    seq       INTEGER PRIMARY KEY,
    hash      TEXT NOT NULL,
    signed_at TEXT NOT NULL,
    key_id    TEXT NOT NULL,
    signature TEXT NOT NULL
);

CREATE TABLE audit_stream_positions (
    name TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);

CREATE INDEX exchanges_repository ON exchanges (repository, created_at);
CREATE INDEX exchanges_state ON exchanges (state, created_at);
CREATE INDEX exchanges_subject ON exchanges (subject, created_at);
CREATE INDEX credentials_created_at ON credentials (created_at);
