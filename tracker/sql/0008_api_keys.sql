-- Keys for machines (`tracker keys create|list|revoke`): a name, the scopes it holds, and the SHA-256
-- of the key. A key is 32 random bytes, so its hash needs no salt or stretching: nothing smaller
-- than the key itself can be guessed from it. A revoked key keeps its row (its name stays in the
-- audit trail's past); a live name is unique, and a revoked one may be given to a new key.
CREATE TABLE api_keys (
    id           bigserial PRIMARY KEY,
    name         text NOT NULL,
    scopes       text[] NOT NULL,
    key_hash     bytea NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE UNIQUE INDEX api_keys_live_name_idx ON api_keys (name) WHERE revoked_at IS NULL;
