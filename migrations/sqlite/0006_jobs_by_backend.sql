-- latchkey ledger, schema version 6: each backend's revocation jobs form a queue of their own.
--
-- * `jobs.backend`: the backend of the job's credential, copied when the job is enqueued, so that
--   the worker claims each backend's due jobs on their own and a backend that is slow or down
--   holds up only its own revocations.
-- * `jobs_due` becomes per backend. A claim takes a backend's due jobs by `run_at`, ties in the
--   order they were enqueued, straight off the index: it reads its LIMIT rows and no more (the
--   old order, `run_at, id`, sorted every due job first). The index holds no `id`, so that an
--   exchange's TTL job adds little to it.

ALTER TABLE jobs ADD COLUMN backend TEXT NOT NULL DEFAULT '';
UPDATE jobs SET backend = (SELECT backend FROM credentials WHERE credentials.id = jobs.credential_id);

DROP INDEX jobs_due;
CREATE INDEX jobs_due ON jobs (backend, run_at) WHERE done_at IS NULL;
