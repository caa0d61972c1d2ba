-- Identity: tenants, users, API keys (hashes only), refresh-token families and their tokens
-- (hashes only), and the security events the auth layer records.
-- Times are Unix seconds (UTC). Role lists are JSON arrays of strings.

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) STRICT;

-- Bumped by every change that must end a credential at once (key revoked, user disabled,
-- session revoked). Each gateway polls it and drops its caches when it moves, so a change
-- made by another process (the CLI, another replica) takes effect within one poll.
INSERT INTO meta (key, value) VALUES ('auth_epoch', 0);

CREATE TABLE tenants (
    name       TEXT PRIMARY KEY,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL REFERENCES tenants(name),
    username      TEXT NOT NULL UNIQUE,
    -- argon2id PHC string; NULL: this user cannot log in with a password.
    password_hash TEXT,
    roles         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    disabled_at   INTEGER
) STRICT;

CREATE TABLE api_keys (
    key_id      TEXT PRIMARY KEY,
    user_id     TEXT NOT NULL REFERENCES users(id),
    name        TEXT NOT NULL,
    -- HMAC-SHA256 of the secret under the server pepper (the pepper is not in this database).
    secret_hmac BLOB NOT NULL,
    roles       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked_at  INTEGER
) STRICT;
CREATE INDEX api_keys_user ON api_keys(user_id);

-- A login session: every refresh token rotated from one grant. Its id is the access tokens' `sid`.
CREATE TABLE refresh_families (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL REFERENCES users(id),
    key_id              TEXT REFERENCES api_keys(key_id),
    created_at          INTEGER NOT NULL,
    absolute_expires_at INTEGER NOT NULL,
    revoked_at          INTEGER,
    revoked_reason      TEXT
) STRICT;
CREATE INDEX refresh_families_user ON refresh_families(user_id);
CREATE INDEX refresh_families_key ON refresh_families(key_id);

CREATE TABLE refresh_tokens (
    -- HMAC-SHA256 of the token under the server pepper.
    token_hmac      BLOB PRIMARY KEY,
    family_id       TEXT NOT NULL REFERENCES refresh_families(id),
    issued_at       INTEGER NOT NULL,
    idle_expires_at INTEGER NOT NULL,
    spent_at        INTEGER
) STRICT;
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);

CREATE TABLE security_events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    at        INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    user_id   TEXT,
    key_id    TEXT,
    family_id TEXT
) STRICT;
