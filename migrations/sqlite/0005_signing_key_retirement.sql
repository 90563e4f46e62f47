-- latchkey ledger, schema version 5: emergency retirement of a `jwt` signing key, and an index
-- for the paged re-seal pass.
--
-- * `signing_keys.retired_at`: when an admin retired the key (a leak): from then on it is out of
--   the JWKS, verifies nothing and signs nothing, on every replica. Never cleared.
-- * `signing_keys.signs_from`: when the key starts signing, for a key that does not follow the
--   usual schedule (created + 5 min 30 s; the first key at once): the replacement made by a
--   retirement signs at once. NULL: the usual schedule.
-- * `credentials_sealed`: the credentials that still hold a sealed handle, by id, so that the
--   re-seal pass pages through them without reading every credential row.

ALTER TABLE signing_keys ADD COLUMN retired_at TEXT;
ALTER TABLE signing_keys ADD COLUMN signs_from TEXT;

CREATE INDEX credentials_sealed ON credentials (id) WHERE handle IS NOT NULL;
