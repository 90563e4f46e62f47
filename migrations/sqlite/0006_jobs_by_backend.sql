-- latchkey ledger, schema version 6: each backend's revocation jobs form a queue of their own.
--
-- * `jobs.backend`: the backend of the job's credential, copied when the job is enqueued, so that
--   the worker claims each backend's due jobs on their own and a backend that is slow or down
--   holds up only its own revocations.
-- * `jobs_due` becomes per backend and ends with `id`, the claim's full order: a claim reads its
--   LIMIT rows off the index instead of sorting every due job first.

ALTER TABLE jobs ADD COLUMN backend TEXT NOT NULL DEFAULT '';
UPDATE jobs SET backend = (SELECT backend FROM credentials WHERE credentials.id = jobs.credential_id);

DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (backend, run_at, id) WHERE done_at IS NULL;
