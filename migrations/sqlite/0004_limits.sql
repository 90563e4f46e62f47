-- latchkey ledger: rate limits of policies' [limits].
--
-- One row per bucket (a capability, or a capability and an identity): the GCRA "theoretical
-- arrival time", as fixed-width RFC 3339 text. A bucket whose time has passed is deleted by the
-- periodic prune: it is as good as a new one.
CREATE TABLE rate_limits (
    key TEXT PRIMARY KEY,
    tat TEXT NOT NULL
);

CREATE INDEX rate_limits_tat ON rate_limits (tat);
