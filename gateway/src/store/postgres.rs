//! The shared store: one PostgreSQL database for several gateway replicas (tokio-postgres
//! behind a deadpool connection pool), schema from the same [`MIGRATIONS`] as SQLite.
//!
//! - **Atomicity across replicas**: every change that must hold under concurrency is one
//!   transaction that locks what it decides on. Rotating a refresh token takes the token's and
//!   its family's rows `FOR UPDATE`, so two replicas presenting the same token serialise there
//!   and the second sees the first's `spent_at` (one winner, the other a reuse or a regrant).
//! - **Revocation reaches every replica at once**: each change that moves the revocation epoch
//!   also `NOTIFY`s [`CHANNEL`] in the same transaction (delivered on commit); a listener
//!   connection wakes [`Store::epoch_signal`], and the caller's epoch poll stays as the
//!   fallback while that connection is down.
//! - **Sync trait, async driver**: the store owns a small runtime for its connections; a call
//!   enters it and blocks on the query (callers already run store calls on the blocking pool).
//!   Pool waits and connects are bounded, so an unreachable server is an error in seconds,
//!   never a hang.

use std::{future::Future, sync::Arc, time::Duration};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::Notify;
use tokio_postgres::{AsyncMessage, GenericClient, Row, config::SslMode, error::SqlState};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::PgTls;
use tracing::{info, warn};

use super::{
    ApiKeyRecord, MIGRATIONS, NewApiKey, NewFamily, NewRefreshToken, NewUser, RotateOutcome,
    SecurityEvent, Session, Store, StoreError, StoreResult, Tenant, User, postgres_dialect,
};
use crate::config::Config;

/// The `LISTEN`/`NOTIFY` channel that carries "the revocation epoch moved".
pub const CHANNEL: &str = "moat_auth_epoch";
/// The advisory lock migrations run under, so replicas starting together apply each once.
const MIGRATION_LOCK: i64 = 0x6d6f_6174_0001;
const DEFAULT_POOL_SIZE: usize = 16;
/// How long a call waits for a free connection, or for a new one.
const WAIT: Duration = Duration::from_secs(3);

pub struct PostgresStore {
    pool: Pool,
    /// `Some` until drop; shut down in the background (a drop may happen on an async thread).
    rt: Option<tokio::runtime::Runtime>,
    signal: Arc<Notify>,
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.code() {
            Some(c)
                if *c == SqlState::UNIQUE_VIOLATION || *c == SqlState::FOREIGN_KEY_VIOLATION =>
            {
                StoreError::Conflict("a record with that name".into())
            }
            _ => StoreError::Backend(e.to_string()),
        }
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        // The causes say what an operator must fix (a certificate nobody trusts, a refused
        // password, no `hostssl` entry); the pool's own message only says that it failed.
        let mut text = format!("cannot reach PostgreSQL: {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            text.push_str(&format!(": {c}"));
            cause = c.source();
        }
        StoreError::Backend(text)
    }
}

fn backend(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl PostgresStore {
    /// Connects to `[store] url` with the configured password and brings the schema up to date.
    pub fn open(config: &Config) -> StoreResult<Self> {
        let sc = config.store();
        let url = sc
            .url
            .as_deref()
            .ok_or_else(|| backend("[store] kind = \"postgres\" needs a url"))?;
        let mut pg: tokio_postgres::Config = url.parse().map_err(backend)?;
        if let Some(p) = &config.store_password {
            pg.password(p.expose());
        }
        // The config load refused every other sslmode (see `validate::store`).
        pg.ssl_mode(match crate::config::pg_tls(url) {
            PgTls::Require => SslMode::Require,
            _ => SslMode::Disable,
        });
        let tls = crate::tls::client_with_roots(config.store_ca.as_deref(), "store.ca_file")
            .map_err(|e| backend(format!("{e:#}")))?
            .with_no_client_auth();
        Self::connect(
            pg,
            MakeRustlsConnect::new(tls),
            sc.pool_size.unwrap_or(DEFAULT_POOL_SIZE),
        )
    }

    /// Connects with `pg` (password and TLS mode included), `size` connections at most; `tls`
    /// is used when `pg` asks for it.
    pub fn connect(
        mut pg: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        size: usize,
    ) -> StoreResult<Self> {
        pg.application_name("moat")
            .connect_timeout(WAIT)
            // A server that vanished without a FIN is noticed, not waited on forever.
            .keepalives_idle(Duration::from_secs(10))
            .options("-c statement_timeout=5000");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("moat-store")
            .enable_all()
            .build()
            .map_err(backend)?;
        let mgr = Manager::from_config(
            pg.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(mgr)
            .max_size(size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(WAIT))
            .create_timeout(Some(WAIT))
            .recycle_timeout(Some(WAIT))
            .build()
            .map_err(backend)?;
        let signal = Arc::new(Notify::new());
        let store = Self {
            pool,
            rt: Some(rt),
            signal: signal.clone(),
        };
        store.migrate()?;
        store.rt().spawn(listen(pg, tls, signal));
        Ok(store)
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// Runs `f` to completion on this thread, inside the store's runtime (its connections,
    /// timers and pool live there).
    fn run<T>(&self, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        let _entered = self.rt().enter();
        futures_executor::block_on(f)
    }

    /// The schema version this database is at.
    pub fn schema_version(&self) -> StoreResult<i64> {
        self.run(async {
            let c = self.pool.get().await?;
            Ok(c.query_one("SELECT version FROM moat_schema", &[])
                .await?
                .get(0))
        })
    }

    fn migrate(&self) -> StoreResult<()> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS moat_schema (version BIGINT NOT NULL)")
                .await?;
            let version: i64 = match tx.query_opt("SELECT version FROM moat_schema", &[]).await? {
                Some(r) => r.get(0),
                None => {
                    tx.execute("INSERT INTO moat_schema (version) VALUES (0)", &[])
                        .await?;
                    0
                }
            };
            let known = MIGRATIONS.len() as i64;
            if version > known {
                return Err(backend(format!(
                    "database schema version {version} is newer than this moat ({known})"
                )));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                tx.batch_execute(&postgres_dialect(sql)).await?;
                tx.execute("UPDATE moat_schema SET version = $1", &[&(i as i64 + 1)])
                    .await?;
                info!(version = i + 1, "store migration applied");
            }
            tx.commit().await?;
            Ok(())
        })
    }
}

impl Drop for PostgresStore {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Keeps one connection `LISTEN`ing on [`CHANNEL`] and wakes `signal` on each notification,
/// and once after every (re)connect (notifications sent meanwhile were missed). Reconnects
/// with backoff; the callers' epoch poll covers the gaps.
async fn listen(pg: tokio_postgres::Config, tls: MakeRustlsConnect, signal: Arc<Notify>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match pg.connect(tls.clone()).await {
            Ok((client, mut conn)) => {
                backoff = Duration::from_millis(100);
                // The connection's driver wakes the signal itself: no hop between the socket
                // and the caches.
                let wake = signal.clone();
                let mut driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| conn.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(_))) => wake.notify_one(),
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        }
                    }
                });
                match client.batch_execute(&format!("LISTEN {CHANNEL}")).await {
                    Ok(()) => {
                        info!(channel = CHANNEL, "listening for revocations");
                        signal.notify_one();
                        // `client` lives until the connection ends.
                        let _ = (&mut driver).await;
                        warn!(
                            "the revocation listener lost its connection; polling until it is back"
                        );
                    }
                    Err(e) => warn!(error = %e, "cannot LISTEN for revocations"),
                }
                driver.abort();
                drop(client);
            }
            Err(e) => {
                warn!(error = %e, "the revocation listener cannot connect; polling meanwhile")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn roles_to_json(roles: &[String]) -> String {
    serde_json::to_string(roles).expect("a list of strings serialises")
}

fn roles_from_json(s: &str) -> StoreResult<Vec<String>> {
    serde_json::from_str(s).map_err(|e| backend(format!("stored roles: {e}")))
}

/// Moves the revocation epoch and tells every replica, both on commit.
async fn bump_epoch(c: &impl GenericClient) -> StoreResult<()> {
    c.batch_execute(&format!(
        "UPDATE meta SET value = value + 1 WHERE key = 'auth_epoch'; NOTIFY {CHANNEL}"
    ))
    .await?;
    Ok(())
}

async fn record_event(
    c: &impl GenericClient,
    now: i64,
    kind: &str,
    user_id: Option<&str>,
    key_id: Option<&str>,
    family_id: Option<&str>,
) -> StoreResult<()> {
    c.execute(
        "INSERT INTO security_events (at, kind, user_id, key_id, family_id) VALUES ($1, $2, $3, $4, $5)",
        &[&now, &kind, &user_id, &key_id, &family_id],
    )
    .await?;
    Ok(())
}

const USER_COLS: &str = "id, tenant, username, password_hash, roles, created_at, disabled_at";

fn user_from_row(r: &Row) -> StoreResult<User> {
    Ok(User {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        username: r.try_get(2)?,
        password_hash: r.try_get(3)?,
        roles: roles_from_json(r.try_get(4)?)?,
        created_at: r.try_get(5)?,
        disabled_at: r.try_get(6)?,
    })
}

const KEY_SELECT: &str = "SELECT k.key_id, k.user_id, u.username, u.tenant, k.name, k.secret_hmac, \
     k.roles, u.roles, k.created_at, k.expires_at, k.revoked_at, u.disabled_at IS NOT NULL \
     FROM api_keys k JOIN users u ON u.id = k.user_id";

fn key_from_row(r: &Row) -> StoreResult<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        key_id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        username: r.try_get(2)?,
        tenant: r.try_get(3)?,
        name: r.try_get(4)?,
        secret_hmac: r.try_get(5)?,
        roles: roles_from_json(r.try_get(6)?)?,
        user_roles: roles_from_json(r.try_get(7)?)?,
        created_at: r.try_get(8)?,
        expires_at: r.try_get(9)?,
        revoked_at: r.try_get(10)?,
        user_disabled: r.try_get(11)?,
    })
}

const SESSION_SELECT: &str = "SELECT f.id, f.user_id, u.username, u.tenant, u.roles, \
     u.disabled_at IS NOT NULL, f.key_id, k.roles, \
     (k.key_id IS NOT NULL AND (k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= $2))), \
     f.absolute_expires_at, f.revoked_at IS NOT NULL \
     FROM refresh_families f JOIN users u ON u.id = f.user_id \
     LEFT JOIN api_keys k ON k.key_id = f.key_id WHERE f.id = $1";

async fn session_in(
    c: &impl GenericClient,
    family_id: &str,
    now: i64,
) -> StoreResult<Option<Session>> {
    let Some(r) = c.query_opt(SESSION_SELECT, &[&family_id, &now]).await? else {
        return Ok(None);
    };
    let key_roles: Option<String> = r.try_get(7)?;
    Ok(Some(Session {
        family_id: r.try_get(0)?,
        user_id: r.try_get(1)?,
        username: r.try_get(2)?,
        tenant: r.try_get(3)?,
        user_roles: roles_from_json(r.try_get(4)?)?,
        user_disabled: r.try_get(5)?,
        key_id: r.try_get(6)?,
        key_roles: key_roles.as_deref().map(roles_from_json).transpose()?,
        key_inactive: r.try_get(8)?,
        absolute_expires_at: r.try_get(9)?,
        revoked: r.try_get(10)?,
    }))
}

/// Maps a unique or foreign-key violation to a conflict naming `what`.
fn conflict_as(what: String) -> impl FnOnce(tokio_postgres::Error) -> StoreError {
    move |e| match StoreError::from(e) {
        StoreError::Conflict(_) => StoreError::Conflict(what),
        other => other,
    }
}

impl Store for PostgresStore {
    fn create_tenant(&self, name: &str, now: i64) -> StoreResult<()> {
        self.run(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO tenants (name, created_at) VALUES ($1, $2)",
                &[&name, &now],
            )
            .await
            .map_err(conflict_as(format!("tenant `{name}`")))?;
            Ok(())
        })
    }

    fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query("SELECT name, created_at FROM tenants ORDER BY name", &[])
                .await?
                .iter()
                .map(|r| {
                    Ok(Tenant {
                        name: r.try_get(0)?,
                        created_at: r.try_get(1)?,
                    })
                })
                .collect()
        })
    }

    fn create_user(&self, u: &NewUser<'_>) -> StoreResult<()> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            // The tenant row is locked so it cannot go away between the check and the insert.
            if tx
                .query_opt(
                    "SELECT 1 FROM tenants WHERE name = $1 FOR SHARE",
                    &[&u.tenant],
                )
                .await?
                .is_none()
            {
                return Err(StoreError::NotFound(format!("tenant `{}`", u.tenant)));
            }
            tx.execute(
                "INSERT INTO users (id, tenant, username, password_hash, roles, created_at) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &u.id,
                    &u.tenant,
                    &u.username,
                    &u.password_hash,
                    &roles_to_json(u.roles),
                    &u.now,
                ],
            )
            .await
            .map_err(conflict_as(format!("user `{}`", u.username)))?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query_opt(
                &format!("SELECT {USER_COLS} FROM users WHERE username = $1"),
                &[&username],
            )
            .await?
            .as_ref()
            .map(user_from_row)
            .transpose()
        })
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query(
                &format!("SELECT {USER_COLS} FROM users ORDER BY tenant, username"),
                &[],
            )
            .await?
            .iter()
            .map(user_from_row)
            .collect()
        })
    }

    fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()> {
        self.run(async {
            let c = self.pool.get().await?;
            let n = c
                .execute(
                    "UPDATE users SET password_hash = $2 WHERE id = $1",
                    &[&user_id, &password_hash],
                )
                .await?;
            if n == 0 {
                return Err(StoreError::NotFound(format!("user id `{user_id}`")));
            }
            Ok(())
        })
    }

    fn disable_user(&self, user_id: &str, now: i64) -> StoreResult<bool> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE users SET disabled_at = $2 WHERE id = $1 AND disabled_at IS NULL",
                    &[&user_id, &now],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE refresh_families SET revoked_at = $2, revoked_reason = 'user_disabled' \
                 WHERE user_id = $1 AND revoked_at IS NULL",
                &[&user_id, &now],
            )
            .await?;
            record_event(&*tx, now, "user_disabled", Some(user_id), None, None).await?;
            bump_epoch(&*tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn set_user_roles(&self, user_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE users SET roles = $2 WHERE id = $1",
                    &[&user_id, &roles_to_json(roles)],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            record_event(&*tx, now, "user_roles_changed", Some(user_id), None, None).await?;
            bump_epoch(&*tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn create_api_key(&self, k: &NewApiKey<'_>) -> StoreResult<()> {
        self.run(async {
            let c = self.pool.get().await?;
            c.execute(
                "INSERT INTO api_keys (key_id, user_id, name, secret_hmac, roles, created_at, expires_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &k.key_id,
                    &k.user_id,
                    &k.name,
                    &k.secret_hmac,
                    &roles_to_json(k.roles),
                    &k.now,
                    &k.expires_at,
                ],
            )
            .await
            .map_err(conflict_as(format!("key id `{}`", k.key_id)))?;
            Ok(())
        })
    }

    fn api_key(&self, key_id: &str) -> StoreResult<Option<ApiKeyRecord>> {
        self.run(async {
            let c = self.pool.get().await?;
            let st = c
                .prepare_cached(&format!("{KEY_SELECT} WHERE k.key_id = $1"))
                .await?;
            c.query_opt(&st, &[&key_id])
                .await?
                .as_ref()
                .map(key_from_row)
                .transpose()
        })
    }

    fn list_api_keys(&self, user_id: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query(
                &format!(
                    "{KEY_SELECT} WHERE $1::text IS NULL OR k.user_id = $1::text \
                     ORDER BY u.username, k.created_at"
                ),
                &[&user_id],
            )
            .await?
            .iter()
            .map(key_from_row)
            .collect()
        })
    }

    fn revoke_api_key(&self, key_id: &str, now: i64) -> StoreResult<bool> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE api_keys SET revoked_at = $2 WHERE key_id = $1 AND revoked_at IS NULL",
                    &[&key_id, &now],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute(
                "UPDATE refresh_families SET revoked_at = $2, revoked_reason = 'key_revoked' \
                 WHERE key_id = $1 AND revoked_at IS NULL",
                &[&key_id, &now],
            )
            .await?;
            record_event(&*tx, now, "key_revoked", None, Some(key_id), None).await?;
            bump_epoch(&*tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn set_api_key_roles(&self, key_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE api_keys SET roles = $2 WHERE key_id = $1",
                    &[&key_id, &roles_to_json(roles)],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            record_event(&*tx, now, "key_roles_changed", None, Some(key_id), None).await?;
            bump_epoch(&*tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn create_family(&self, f: &NewFamily<'_>, first: &NewRefreshToken<'_>) -> StoreResult<()> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO refresh_families (id, user_id, key_id, created_at, absolute_expires_at) \
                 VALUES ($1, $2, $3, $4, $5)",
                &[&f.id, &f.user_id, &f.key_id, &f.now, &f.absolute_expires_at],
            )
            .await?;
            tx.execute(
                "INSERT INTO refresh_tokens (token_hmac, family_id, issued_at, idle_expires_at) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &first.token_hmac,
                    &f.id,
                    &f.now,
                    &first.idle_expires_at.min(f.absolute_expires_at),
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn rotate_refresh(
        &self,
        token_hmac: &[u8],
        next: &NewRefreshToken<'_>,
        now: i64,
        grace_secs: i64,
    ) -> StoreResult<RotateOutcome> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            // The token's and the family's rows are locked: a concurrent presentation of the
            // same token (on any replica) waits here, then reads what this one committed.
            let found = tx
                .query_opt(
                    "SELECT t.family_id, t.spent_at, t.idle_expires_at, f.revoked_at IS NOT NULL, \
                     f.absolute_expires_at, f.user_id, f.key_id \
                     FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id \
                     WHERE t.token_hmac = $1 FOR UPDATE OF t, f",
                    &[&token_hmac],
                )
                .await?;
            let Some(r) = found else {
                return Ok(RotateOutcome::Unknown);
            };
            let family_id: String = r.try_get(0)?;
            let spent_at: Option<i64> = r.try_get(1)?;
            let idle_exp: i64 = r.try_get(2)?;
            let revoked: bool = r.try_get(3)?;
            let abs_exp: i64 = r.try_get(4)?;
            let user_id: String = r.try_get(5)?;
            let key_id: Option<String> = r.try_get(6)?;
            if let Some(spent) = spent_at
                && grace_secs > 0
                && now <= spent + grace_secs
                && !revoked
                && now < abs_exp
            {
                // Within the grace: the same client racing itself (see the SQLite store).
                let successor_live = tx
                    .query_opt(
                        "SELECT spent_at IS NULL FROM refresh_tokens \
                         WHERE token_hmac = $1 AND family_id = $2",
                        &[&next.token_hmac, &family_id],
                    )
                    .await?
                    .map(|r| r.try_get::<_, bool>(0))
                    .transpose()?
                    .unwrap_or(false);
                if successor_live
                    && let Some(session) =
                        session_in(&*tx, &family_id, now).await?.filter(|s| s.is_active(now))
                {
                    return Ok(RotateOutcome::Regranted { session });
                }
            }
            if spent_at.is_some() {
                // A spent token came back: end the whole family and leave a trace.
                tx.execute(
                    "UPDATE refresh_families SET revoked_at = $2, revoked_reason = 'refresh_reuse_detected' \
                     WHERE id = $1 AND revoked_at IS NULL",
                    &[&family_id, &now],
                )
                .await?;
                record_event(
                    &*tx,
                    now,
                    "refresh_reuse_detected",
                    Some(&user_id),
                    key_id.as_deref(),
                    Some(&family_id),
                )
                .await?;
                bump_epoch(&*tx).await?;
                tx.commit().await?;
                return Ok(RotateOutcome::Reused { family_id });
            }
            if revoked || now >= idle_exp || now >= abs_exp {
                return Ok(RotateOutcome::Dead { family_id });
            }
            let Some(session) = session_in(&*tx, &family_id, now)
                .await?
                .filter(|s| s.is_active(now))
            else {
                return Ok(RotateOutcome::Dead { family_id });
            };
            // Conditional on still unspent: belt and braces under the row lock.
            let n = tx
                .execute(
                    "UPDATE refresh_tokens SET spent_at = $2 WHERE token_hmac = $1 AND spent_at IS NULL",
                    &[&token_hmac, &now],
                )
                .await?;
            if n != 1 {
                return Ok(RotateOutcome::Dead { family_id });
            }
            tx.execute(
                "INSERT INTO refresh_tokens (token_hmac, family_id, issued_at, idle_expires_at) \
                 VALUES ($1, $2, $3, $4)",
                &[
                    &next.token_hmac,
                    &family_id,
                    &now,
                    &next.idle_expires_at.min(abs_exp),
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(RotateOutcome::Rotated { session })
        })
    }

    fn session(&self, family_id: &str, now: i64) -> StoreResult<Option<Session>> {
        self.run(async {
            let c = self.pool.get().await?;
            let client: &tokio_postgres::Client = &c;
            session_in(client, family_id, now).await
        })
    }

    fn family_of_refresh(&self, token_hmac: &[u8]) -> StoreResult<Option<String>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query_opt(
                "SELECT family_id FROM refresh_tokens WHERE token_hmac = $1",
                &[&token_hmac],
            )
            .await?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(Into::into)
        })
    }

    fn revoke_family(&self, family_id: &str, reason: &str, now: i64) -> StoreResult<bool> {
        self.run(async {
            let mut c = self.pool.get().await?;
            let tx = c.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE refresh_families SET revoked_at = $2, revoked_reason = $3 \
                     WHERE id = $1 AND revoked_at IS NULL",
                    &[&family_id, &now, &reason],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            record_event(&*tx, now, reason, None, None, Some(family_id)).await?;
            bump_epoch(&*tx).await?;
            tx.commit().await?;
            Ok(true)
        })
    }

    fn auth_epoch(&self) -> StoreResult<i64> {
        self.run(async {
            let c = self.pool.get().await?;
            let st = c
                .prepare_cached("SELECT value FROM meta WHERE key = 'auth_epoch'")
                .await?;
            Ok(c.query_one(&st, &[]).await?.try_get(0)?)
        })
    }

    fn epoch_signal(&self) -> Option<Arc<Notify>> {
        Some(self.signal.clone())
    }

    fn security_events(&self) -> StoreResult<Vec<SecurityEvent>> {
        self.run(async {
            let c = self.pool.get().await?;
            c.query(
                "SELECT at, kind, user_id, key_id, family_id FROM security_events ORDER BY id",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(SecurityEvent {
                    at: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    user_id: r.try_get(2)?,
                    key_id: r.try_get(3)?,
                    family_id: r.try_get(4)?,
                })
            })
            .collect()
        })
    }

    fn signing_keys(&self) -> StoreResult<Option<(i64, Vec<u8>)>> {
        self.run(async {
            let c = self.pool.get().await?;
            let row = c
                .query_opt("SELECT version, sealed FROM signing_keys WHERE id = 1", &[])
                .await?;
            Ok(match row {
                Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
                None => None,
            })
        })
    }

    fn put_signing_keys(
        &self,
        expected: Option<i64>,
        sealed: &[u8],
        now: i64,
    ) -> StoreResult<bool> {
        self.run(async {
            let c = self.pool.get().await?;
            let n = match expected {
                None => {
                    c.execute(
                        "INSERT INTO signing_keys (id, version, sealed, updated_at) \
                         VALUES (1, 1, $1, $2) ON CONFLICT (id) DO NOTHING",
                        &[&sealed, &now],
                    )
                    .await?
                }
                Some(v) => {
                    c.execute(
                        "UPDATE signing_keys SET version = version + 1, sealed = $1, \
                         updated_at = $2 WHERE id = 1 AND version = $3",
                        &[&sealed, &now, &v],
                    )
                    .await?
                }
            };
            Ok(n == 1)
        })
    }
}
