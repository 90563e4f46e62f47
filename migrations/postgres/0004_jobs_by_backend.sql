-- latchkey ledger (PostgreSQL), schema version 4: each backend's revocation jobs form a queue of
-- their own, as in migrations/sqlite/0006_jobs_by_backend.sql.
--
-- * `jobs.backend`: the backend of the job's credential, copied when the job is enqueued, so that
--   the worker claims each backend's due jobs on their own and a backend that is slow or down
--   holds up only its own revocations.

ALTER TABLE jobs ADD COLUMN backend TEXT COLLATE "C" NOT NULL DEFAULT '';
UPDATE jobs SET backend = credentials.backend FROM credentials WHERE credentials.id = jobs.credential_id;
ALTER TABLE jobs ALTER COLUMN backend DROP DEFAULT;

DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (backend, run_at, id) WHERE done_at IS NULL;
