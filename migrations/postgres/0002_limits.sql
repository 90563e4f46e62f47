-- latchkey ledger on PostgreSQL: rate limits of policies' [limits], as migrations/sqlite's
-- 0004_limits. Updated under the chain head lock like every write, so replicas count together.
CREATE TABLE rate_limits (
    key TEXT PRIMARY KEY,
    tat TEXT COLLATE "C" NOT NULL
);

CREATE INDEX rate_limits_tat ON rate_limits (tat);
