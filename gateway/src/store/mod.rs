//! The store: tenants, users, API keys (hashes only), refresh-token families and their tokens,
//! security events, the revocation epoch. Two engines behind [`Store`]: the embedded default
//! [`sqlite::SqliteStore`] (WAL, in the data directory) and [`postgres::PostgresStore`], shared
//! by several gateway replicas. Both take their schema from the one list [`MIGRATIONS`]
//! (`gateway/migrations/`, written for SQLite; [`postgres_dialect`] adapts the few type names).
//!
//! The trait is synchronous: SQLite calls are short, and async callers run them on the blocking
//! pool (see [`crate::auth`]). Every operation that must hold under concurrency (rotating a
//! refresh token, revoking a family) is one transaction inside the implementation, never a
//! read-then-write by the caller.

pub mod postgres;
pub mod sqlite;

use std::sync::Arc;

use serde::Serialize;

use crate::config::{Config, StoreKind};

/// The schema, in order, for both engines. Never edit a shipped migration: add the next one.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_identity.sql"),
    include_str!("../../migrations/0002_signing_keys.sql"),
];

/// A migration as PostgreSQL takes it: the SQLite text with its storage classes renamed
/// (`INTEGER` → `BIGINT`, `BLOB` → `BYTEA`, an autoincrement key → `BIGSERIAL`) and `STRICT`
/// dropped. The migrations keep to the SQL both engines share, so this is all it takes.
pub fn postgres_dialect(sqlite: &str) -> String {
    sqlite
        .replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGSERIAL PRIMARY KEY")
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
        .replace(") STRICT;", ");")
}

/// Opens the configured store, bringing its schema up to date.
pub fn open(config: &Config) -> StoreResult<Arc<dyn Store>> {
    Ok(match config.store().kind {
        StoreKind::Sqlite => Arc::new(sqlite::SqliteStore::open_in(&config.data_dir)?),
        StoreKind::Postgres => Arc::new(postgres::PostgresStore::open(config)?),
    })
}

/// A store failure. Callers map it to a 500/503; its text never carries a secret.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already exists")]
    Conflict(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("store: {0}")]
    Backend(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tenant {
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct User {
    pub id: String,
    pub tenant: String,
    pub username: String,
    /// The argon2id PHC string; never serialised.
    #[serde(skip)]
    pub password_hash: Option<String>,
    pub roles: Vec<String>,
    pub created_at: i64,
    pub disabled_at: Option<i64>,
}

pub struct NewUser<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub username: &'a str,
    pub password_hash: Option<&'a str>,
    pub roles: &'a [String],
    pub now: i64,
}

/// An API key as stored, joined with its owner's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub user_id: String,
    pub username: String,
    pub tenant: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hmac: Vec<u8>,
    pub roles: Vec<String>,
    /// The owner's roles: a key's rights are the intersection with these.
    #[serde(skip)]
    pub user_roles: Vec<String>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    #[serde(skip)]
    pub user_disabled: bool,
}

impl ApiKeyRecord {
    /// Usable now: not revoked, not expired, owner enabled.
    pub fn is_active(&self, now: i64) -> bool {
        self.revoked_at.is_none() && !self.user_disabled && self.expires_at.is_none_or(|e| now < e)
    }
}

pub struct NewApiKey<'a> {
    pub key_id: &'a str,
    pub user_id: &'a str,
    pub name: &'a str,
    pub secret_hmac: &'a [u8],
    pub roles: &'a [String],
    pub now: i64,
    pub expires_at: Option<i64>,
}

/// A refresh family (login session) with everything needed to decide whether it still stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub family_id: String,
    pub user_id: String,
    pub username: String,
    pub tenant: String,
    pub user_roles: Vec<String>,
    pub user_disabled: bool,
    pub key_id: Option<String>,
    pub key_roles: Option<Vec<String>>,
    /// The key is revoked or expired (only for sessions opened with an API key).
    pub key_inactive: bool,
    pub absolute_expires_at: i64,
    pub revoked: bool,
}

impl Session {
    pub fn is_active(&self, now: i64) -> bool {
        !self.revoked && !self.user_disabled && !self.key_inactive && now < self.absolute_expires_at
    }
}

pub struct NewFamily<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub key_id: Option<&'a str>,
    pub now: i64,
    pub absolute_expires_at: i64,
}

/// A refresh token to insert: its hash and idle deadline.
pub struct NewRefreshToken<'a> {
    pub token_hmac: &'a [u8],
    pub idle_expires_at: i64,
}

/// What presenting a refresh token did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was live: it is now spent and the new one is stored in the same family.
    /// `session` is the family's state read in the same transaction (active).
    Rotated { session: Session },
    /// The token was spent within the grace and its successor (the `next` asked for) is
    /// still the family's live token: hand that successor out again. `session` as above.
    Regranted { session: Session },
    /// No such token.
    Unknown,
    /// The token was already spent: the whole family is now revoked and a
    /// `refresh_reuse_detected` event recorded.
    Reused { family_id: String },
    /// The token's family is revoked, the token or family expired, or its user or key no
    /// longer active.
    Dead { family_id: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SecurityEvent {
    pub at: i64,
    pub kind: String,
    pub user_id: Option<String>,
    pub key_id: Option<String>,
    pub family_id: Option<String>,
}

pub trait Store: Send + Sync + 'static {
    fn create_tenant(&self, name: &str, now: i64) -> StoreResult<()>;
    fn list_tenants(&self) -> StoreResult<Vec<Tenant>>;

    fn create_user(&self, user: &NewUser<'_>) -> StoreResult<()>;
    fn user_by_name(&self, username: &str) -> StoreResult<Option<User>>;
    fn list_users(&self) -> StoreResult<Vec<User>>;
    fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()>;
    /// Disables the user and revokes all of its refresh families. False if already disabled.
    fn disable_user(&self, user_id: &str, now: i64) -> StoreResult<bool>;
    /// Replaces a user's roles (bumps the revocation epoch: rights may have shrunk).
    fn set_user_roles(&self, user_id: &str, roles: &[String], now: i64) -> StoreResult<bool>;

    fn create_api_key(&self, key: &NewApiKey<'_>) -> StoreResult<()>;
    fn api_key(&self, key_id: &str) -> StoreResult<Option<ApiKeyRecord>>;
    fn list_api_keys(&self, user_id: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>>;
    /// Revokes the key and every refresh family opened with it. False if already revoked.
    fn revoke_api_key(&self, key_id: &str, now: i64) -> StoreResult<bool>;
    /// Replaces a key's roles (bumps the revocation epoch: rights may have shrunk).
    fn set_api_key_roles(&self, key_id: &str, roles: &[String], now: i64) -> StoreResult<bool>;

    /// Opens a family with its first refresh token.
    fn create_family(&self, family: &NewFamily<'_>, first: &NewRefreshToken<'_>)
    -> StoreResult<()>;
    /// Spends `token_hmac` and stores `next` in its family, atomically: of two concurrent calls
    /// with the same token exactly one gets `Rotated`. The new token's idle deadline is capped
    /// at the family's absolute deadline.
    ///
    /// A token spent at most `grace_secs` ago whose successor is `next` and still unspent (the
    /// caller derives `next` from the token, so a second presentation names the same one) gets
    /// `Regranted`, and nothing changes; any other spent token is a reuse.
    fn rotate_refresh(
        &self,
        token_hmac: &[u8],
        next: &NewRefreshToken<'_>,
        now: i64,
        grace_secs: i64,
    ) -> StoreResult<RotateOutcome>;
    /// The family with its owner's and key's state; `now` decides whether the key expired.
    fn session(&self, family_id: &str, now: i64) -> StoreResult<Option<Session>>;
    fn family_of_refresh(&self, token_hmac: &[u8]) -> StoreResult<Option<String>>;
    /// Revokes a family. False if it was already revoked or does not exist.
    fn revoke_family(&self, family_id: &str, reason: &str, now: i64) -> StoreResult<bool>;

    /// The revocation epoch (see the migration): moves on every change that ends a credential.
    fn auth_epoch(&self) -> StoreResult<i64>;
    /// Woken whenever the epoch may have moved in another process (PostgreSQL `NOTIFY`, and
    /// once after the listener (re)connects, as notifications may have been missed), so the
    /// caller drops its caches at once instead of at its next poll. `None`: polling only.
    fn epoch_signal(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }
    fn security_events(&self) -> StoreResult<Vec<SecurityEvent>>;

    /// The sealed Ed25519 signing key set and its version; `None` until a replica made one.
    fn signing_keys(&self) -> StoreResult<Option<(i64, Vec<u8>)>>;
    /// Stores `sealed` if the stored version is still `expected` (`None`: no key set yet),
    /// as one conditional statement: of replicas writing at once exactly one gets `true`, the
    /// others reread and adopt its keys.
    fn put_signing_keys(&self, expected: Option<i64>, sealed: &[u8], now: i64)
    -> StoreResult<bool>;
}
