-- latchkey ledger, schema version 7: the indexes that no query reads are dropped.
--
-- Every index is a B-tree that each exchange writes a page of: an exchange that issues a `jwt`
-- credential touched 26 of them, and the writer's time and the WAL's size follow that count.
-- None of these nine is read:
--
-- * `exchanges_agent`, `_capability`, `_repository`, `_state`, `_subject`, `credentials_agent`,
--   `_capability`: the admin lists took each filter as an optional parameter
--   (`?3 IS NULL OR agent = ?3`), which SQLite cannot plan an index for, so they walked
--   `exchanges_created_at` / `credentials_created_at` newest first and filtered as they went.
--   They now seek to their cursor and time window on those indexes and filter from there.
-- * `credentials_expires_at`: credentials end by their TTL job (`jobs_due`), not by a scan.
-- * `jobs_kill`: a kill's jobs are found through `jobs_credential` (a lookup by `kill_id` made
--   the kill's answer quadratic), and no kill rule is ever deleted, so no foreign-key check
--   needs it either.
--
-- What is kept is read: `*_created_at` (lists, the re-seal and key-retirement passes),
-- `credentials_exchange`, `credentials_state` (live credentials, pending reconciliation),
-- `credentials_repository` (the `max_active` count), `jobs_due`, `jobs_credential`.
-- `IF EXISTS`: an index an operator has already dropped is no error.

DROP INDEX IF EXISTS exchanges_agent;
DROP INDEX IF EXISTS exchanges_capability;
DROP INDEX IF EXISTS exchanges_repository;
DROP INDEX IF EXISTS exchanges_state;
DROP INDEX IF EXISTS exchanges_subject;
DROP INDEX IF EXISTS credentials_agent;
DROP INDEX IF EXISTS credentials_capability;
DROP INDEX IF EXISTS credentials_expires_at;
DROP INDEX IF EXISTS jobs_kill;
