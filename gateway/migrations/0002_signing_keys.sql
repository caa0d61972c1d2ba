-- The Ed25519 access-token signing key set, shared by every replica: one row holding the key
-- set (kids, seeds, creation and end of verification) sealed with XChaCha20-Poly1305 under a
-- key derived from the pepper (which is not in this database). `version` moves on every
-- change; a writer replaces only the version it read, so concurrent rotations have one winner.
CREATE TABLE signing_keys (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    version    INTEGER NOT NULL,
    sealed     BLOB NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
