//! The embedded store: one SQLite file in WAL mode, schema from `gateway/migrations/`
//! (applied in order, tracked by `PRAGMA user_version`).
//!
//! One connection behind a mutex: SQLite serialises writers anyway, and every statement here is
//! short. Writes that must be atomic take the write lock up front (`BEGIN IMMEDIATE`), so the
//! CLI and the daemon, two processes on one file, never interleave inside them.

use std::{os::unix::fs::PermissionsExt, path::Path, sync::Mutex, time::Duration};

use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use super::{
    ApiKeyRecord, MIGRATIONS, NewApiKey, NewFamily, NewRefreshToken, NewUser, RotateOutcome,
    SecurityEvent, Session, Store, StoreError, StoreResult, Tenant, User,
};

/// The database file's name in the data directory.
pub const DB_FILE: &str = "moat.db";

pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e
            && f.code == rusqlite::ErrorCode::ConstraintViolation
        {
            return StoreError::Conflict("a record with that name".into());
        }
        StoreError::Backend(e.to_string())
    }
}

impl SqliteStore {
    /// Opens (creating if needed) `data_dir/moat.db` and brings its schema up to date.
    pub fn open_in(data_dir: &Path) -> StoreResult<Self> {
        crate::secret_files::ensure_private_dir(data_dir)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", data_dir.display())))?;
        Self::open(&data_dir.join(DB_FILE))
    }

    pub fn open(path: &Path) -> StoreResult<Self> {
        let conn = Connection::open(path)?;
        // Hashes only, but still nobody else's business. SQLite gives the -wal and -shm files
        // the same mode as the database.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: an acknowledged rotation or revocation survives a power cut, not only a crash.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Self {
            conn: Mutex::new(conn),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&self) -> StoreResult<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let known = MIGRATIONS.len() as i64;
        if version > known {
            return Err(StoreError::Backend(format!(
                "database schema version {version} is newer than this moat ({known})"
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i as i64 + 1)?;
        }
        tx.commit()?;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a transaction half-applied (rusqlite
        // rolls back on drop), so a poisoned lock is safe to keep using.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn roles_to_json(roles: &[String]) -> String {
    serde_json::to_string(roles).expect("a list of strings serialises")
}

fn roles_from_json(s: &str) -> rusqlite::Result<Vec<String>> {
    serde_json::from_str(s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

fn bump_epoch(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE meta SET value = value + 1 WHERE key = 'auth_epoch'",
        [],
    )?;
    Ok(())
}

fn user_from_row(r: &Row<'_>) -> rusqlite::Result<User> {
    Ok(User {
        id: r.get(0)?,
        tenant: r.get(1)?,
        username: r.get(2)?,
        password_hash: r.get(3)?,
        roles: roles_from_json(&r.get::<_, String>(4)?)?,
        created_at: r.get(5)?,
        disabled_at: r.get(6)?,
    })
}

const USER_COLS: &str = "id, tenant, username, password_hash, roles, created_at, disabled_at";

const KEY_SELECT: &str = "SELECT k.key_id, k.user_id, u.username, u.tenant, k.name, k.secret_hmac, \
     k.roles, u.roles, k.created_at, k.expires_at, k.revoked_at, u.disabled_at IS NOT NULL \
     FROM api_keys k JOIN users u ON u.id = k.user_id";

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<ApiKeyRecord> {
    Ok(ApiKeyRecord {
        key_id: r.get(0)?,
        user_id: r.get(1)?,
        username: r.get(2)?,
        tenant: r.get(3)?,
        name: r.get(4)?,
        secret_hmac: r.get(5)?,
        roles: roles_from_json(&r.get::<_, String>(6)?)?,
        user_roles: roles_from_json(&r.get::<_, String>(7)?)?,
        created_at: r.get(8)?,
        expires_at: r.get(9)?,
        revoked_at: r.get(10)?,
        user_disabled: r.get(11)?,
    })
}

fn session_in(conn: &Connection, family_id: &str, now: i64) -> StoreResult<Option<Session>> {
    Ok(conn
        .query_row(
            "SELECT f.id, f.user_id, u.username, u.tenant, u.roles, u.disabled_at IS NOT NULL, \
             f.key_id, k.roles, \
             (k.key_id IS NOT NULL AND (k.revoked_at IS NOT NULL OR (k.expires_at IS NOT NULL AND k.expires_at <= ?2))), \
             f.absolute_expires_at, f.revoked_at IS NOT NULL \
             FROM refresh_families f JOIN users u ON u.id = f.user_id \
             LEFT JOIN api_keys k ON k.key_id = f.key_id WHERE f.id = ?1",
            params![family_id, now],
            |r| {
                let key_roles: Option<String> = r.get(7)?;
                Ok(Session {
                    family_id: r.get(0)?,
                    user_id: r.get(1)?,
                    username: r.get(2)?,
                    tenant: r.get(3)?,
                    user_roles: roles_from_json(&r.get::<_, String>(4)?)?,
                    user_disabled: r.get(5)?,
                    key_id: r.get(6)?,
                    key_roles: key_roles.as_deref().map(roles_from_json).transpose()?,
                    key_inactive: r.get(8)?,
                    absolute_expires_at: r.get(9)?,
                    revoked: r.get(10)?,
                })
            },
        )
        .optional()?)
}

fn record_event(
    conn: &Connection,
    now: i64,
    kind: &str,
    user_id: Option<&str>,
    key_id: Option<&str>,
    family_id: Option<&str>,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO security_events (at, kind, user_id, key_id, family_id) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![now, kind, user_id, key_id, family_id],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn create_tenant(&self, name: &str, now: i64) -> StoreResult<()> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO tenants (name, created_at) VALUES (?1, ?2)",
            params![name, now],
        )
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("tenant `{name}`")),
            other => other,
        })?;
        Ok(())
    }

    fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        let conn = self.lock();
        let mut st = conn.prepare("SELECT name, created_at FROM tenants ORDER BY name")?;
        let rows = st.query_map([], |r| {
            Ok(Tenant {
                name: r.get(0)?,
                created_at: r.get(1)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn create_user(&self, u: &NewUser<'_>) -> StoreResult<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let tenant_exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM tenants WHERE name = ?1)",
            [u.tenant],
            |r| r.get(0),
        )?;
        if !tenant_exists {
            return Err(StoreError::NotFound(format!("tenant `{}`", u.tenant)));
        }
        tx.execute(
            "INSERT INTO users (id, tenant, username, password_hash, roles, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                u.id,
                u.tenant,
                u.username,
                u.password_hash,
                roles_to_json(u.roles),
                u.now
            ],
        )
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("user `{}`", u.username)),
            other => other,
        })?;
        tx.commit()?;
        Ok(())
    }

    fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("SELECT {USER_COLS} FROM users WHERE username = ?1"),
                [username],
                user_from_row,
            )
            .optional()?)
    }

    fn list_users(&self) -> StoreResult<Vec<User>> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "SELECT {USER_COLS} FROM users ORDER BY tenant, username"
        ))?;
        let rows = st.query_map([], user_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()> {
        let conn = self.lock();
        let n = conn.execute(
            "UPDATE users SET password_hash = ?2 WHERE id = ?1",
            params![user_id, password_hash],
        )?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("user id `{user_id}`")));
        }
        Ok(())
    }

    fn disable_user(&self, user_id: &str, now: i64) -> StoreResult<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE users SET disabled_at = ?2 WHERE id = ?1 AND disabled_at IS NULL",
            params![user_id, now],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE refresh_families SET revoked_at = ?2, revoked_reason = 'user_disabled' \
             WHERE user_id = ?1 AND revoked_at IS NULL",
            params![user_id, now],
        )?;
        record_event(&tx, now, "user_disabled", Some(user_id), None, None)?;
        bump_epoch(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    fn set_user_roles(&self, user_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE users SET roles = ?2 WHERE id = ?1",
            params![user_id, roles_to_json(roles)],
        )?;
        if n == 0 {
            return Ok(false);
        }
        record_event(&tx, now, "user_roles_changed", Some(user_id), None, None)?;
        bump_epoch(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    fn set_api_key_roles(&self, key_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE api_keys SET roles = ?2 WHERE key_id = ?1",
            params![key_id, roles_to_json(roles)],
        )?;
        if n == 0 {
            return Ok(false);
        }
        record_event(&tx, now, "key_roles_changed", None, Some(key_id), None)?;
        bump_epoch(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    fn create_api_key(&self, k: &NewApiKey<'_>) -> StoreResult<()> {
        let conn = self.lock();
        conn.execute(
            "INSERT INTO api_keys (key_id, user_id, name, secret_hmac, roles, created_at, expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                k.key_id,
                k.user_id,
                k.name,
                k.secret_hmac,
                roles_to_json(k.roles),
                k.now,
                k.expires_at
            ],
        )
        .map_err(|e| match StoreError::from(e) {
            StoreError::Conflict(_) => StoreError::Conflict(format!("key id `{}`", k.key_id)),
            other => other,
        })?;
        Ok(())
    }

    fn api_key(&self, key_id: &str) -> StoreResult<Option<ApiKeyRecord>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                &format!("{KEY_SELECT} WHERE k.key_id = ?1"),
                [key_id],
                key_from_row,
            )
            .optional()?)
    }

    fn list_api_keys(&self, user_id: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>> {
        let conn = self.lock();
        let mut st = conn.prepare(&format!(
            "{KEY_SELECT} WHERE ?1 IS NULL OR k.user_id = ?1 ORDER BY u.username, k.created_at"
        ))?;
        let rows = st.query_map([user_id], key_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn revoke_api_key(&self, key_id: &str, now: i64) -> StoreResult<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE key_id = ?1 AND revoked_at IS NULL",
            params![key_id, now],
        )?;
        if n == 0 {
            return Ok(false);
        }
        tx.execute(
            "UPDATE refresh_families SET revoked_at = ?2, revoked_reason = 'key_revoked' \
             WHERE key_id = ?1 AND revoked_at IS NULL",
            params![key_id, now],
        )?;
        record_event(&tx, now, "key_revoked", None, Some(key_id), None)?;
        bump_epoch(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    fn create_family(&self, f: &NewFamily<'_>, first: &NewRefreshToken<'_>) -> StoreResult<()> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO refresh_families (id, user_id, key_id, created_at, absolute_expires_at) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![f.id, f.user_id, f.key_id, f.now, f.absolute_expires_at],
        )?;
        tx.execute(
            "INSERT INTO refresh_tokens (token_hmac, family_id, issued_at, idle_expires_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![
                first.token_hmac,
                f.id,
                f.now,
                first.idle_expires_at.min(f.absolute_expires_at)
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    fn rotate_refresh(
        &self,
        token_hmac: &[u8],
        next: &NewRefreshToken<'_>,
        now: i64,
        grace_secs: i64,
    ) -> StoreResult<RotateOutcome> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let found = tx
            .query_row(
                "SELECT t.family_id, t.spent_at, t.idle_expires_at, f.revoked_at IS NOT NULL, \
                 f.absolute_expires_at, f.user_id, f.key_id \
                 FROM refresh_tokens t JOIN refresh_families f ON f.id = t.family_id \
                 WHERE t.token_hmac = ?1",
                [token_hmac],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, Option<i64>>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, bool>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, Option<String>>(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((family_id, spent_at, idle_exp, revoked, abs_exp, user_id, key_id)) = found else {
            return Ok(RotateOutcome::Unknown);
        };
        if let Some(spent) = spent_at
            && grace_secs > 0
            && now <= spent + grace_secs
            && !revoked
            && now < abs_exp
        {
            // Within the grace: the same client racing itself, if the successor it would get
            // is the one this token was rotated to and nobody moved past it yet.
            let successor_live = tx
                .query_row(
                    "SELECT spent_at IS NULL FROM refresh_tokens \
                     WHERE token_hmac = ?1 AND family_id = ?2",
                    params![next.token_hmac, family_id],
                    |r| r.get::<_, bool>(0),
                )
                .optional()?
                .unwrap_or(false);
            if successor_live
                && let Some(session) =
                    session_in(&tx, &family_id, now)?.filter(|s| s.is_active(now))
            {
                return Ok(RotateOutcome::Regranted { session });
            }
        }
        if spent_at.is_some() {
            // A spent token came back: either its holder or a thief has a copy. End the whole
            // family so neither can go on, and leave a trace.
            tx.execute(
                "UPDATE refresh_families SET revoked_at = ?2, revoked_reason = 'refresh_reuse_detected' \
                 WHERE id = ?1 AND revoked_at IS NULL",
                params![family_id, now],
            )?;
            record_event(
                &tx,
                now,
                "refresh_reuse_detected",
                Some(&user_id),
                key_id.as_deref(),
                Some(&family_id),
            )?;
            bump_epoch(&tx)?;
            tx.commit()?;
            return Ok(RotateOutcome::Reused { family_id });
        }
        if revoked || now >= idle_exp || now >= abs_exp {
            return Ok(RotateOutcome::Dead { family_id });
        }
        // The owner's state, read under the same lock: the winner of a race gets its answer
        // from this snapshot, whatever a concurrent loser does to the family afterwards.
        let Some(session) = session_in(&tx, &family_id, now)?.filter(|s| s.is_active(now)) else {
            return Ok(RotateOutcome::Dead { family_id });
        };
        let n = tx.execute(
            "UPDATE refresh_tokens SET spent_at = ?2 WHERE token_hmac = ?1 AND spent_at IS NULL",
            params![token_hmac, now],
        )?;
        if n != 1 {
            // Cannot happen under the write lock; refuse rather than mint a second successor.
            return Ok(RotateOutcome::Dead { family_id });
        }
        tx.execute(
            "INSERT INTO refresh_tokens (token_hmac, family_id, issued_at, idle_expires_at) \
             VALUES (?1, ?2, ?3, ?4)",
            params![
                next.token_hmac,
                family_id,
                now,
                next.idle_expires_at.min(abs_exp)
            ],
        )?;
        tx.commit()?;
        Ok(RotateOutcome::Rotated { session })
    }

    fn session(&self, family_id: &str, now: i64) -> StoreResult<Option<Session>> {
        let conn = self.lock();
        session_in(&conn, family_id, now)
    }

    fn family_of_refresh(&self, token_hmac: &[u8]) -> StoreResult<Option<String>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT family_id FROM refresh_tokens WHERE token_hmac = ?1",
                [token_hmac],
                |r| r.get(0),
            )
            .optional()?)
    }

    fn revoke_family(&self, family_id: &str, reason: &str, now: i64) -> StoreResult<bool> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE refresh_families SET revoked_at = ?2, revoked_reason = ?3 \
             WHERE id = ?1 AND revoked_at IS NULL",
            params![family_id, now, reason],
        )?;
        if n == 0 {
            return Ok(false);
        }
        record_event(&tx, now, reason, None, None, Some(family_id))?;
        bump_epoch(&tx)?;
        tx.commit()?;
        Ok(true)
    }

    fn auth_epoch(&self) -> StoreResult<i64> {
        let conn = self.lock();
        Ok(
            conn.query_row("SELECT value FROM meta WHERE key = 'auth_epoch'", [], |r| {
                r.get(0)
            })?,
        )
    }

    fn security_events(&self) -> StoreResult<Vec<SecurityEvent>> {
        let conn = self.lock();
        let mut st = conn.prepare(
            "SELECT at, kind, user_id, key_id, family_id FROM security_events ORDER BY id",
        )?;
        let rows = st.query_map([], |r| {
            Ok(SecurityEvent {
                at: r.get(0)?,
                kind: r.get(1)?,
                user_id: r.get(2)?,
                key_id: r.get(3)?,
                family_id: r.get(4)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn signing_keys(&self) -> StoreResult<Option<(i64, Vec<u8>)>> {
        let conn = self.lock();
        Ok(conn
            .query_row(
                "SELECT version, sealed FROM signing_keys WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    fn put_signing_keys(
        &self,
        expected: Option<i64>,
        sealed: &[u8],
        now: i64,
    ) -> StoreResult<bool> {
        let conn = self.lock();
        let n = match expected {
            None => conn.execute(
                "INSERT INTO signing_keys (id, version, sealed, updated_at) VALUES (1, 1, ?1, ?2) \
                 ON CONFLICT (id) DO NOTHING",
                params![sealed, now],
            )?,
            Some(v) => conn.execute(
                "UPDATE signing_keys SET version = version + 1, sealed = ?1, updated_at = ?2 \
                 WHERE id = 1 AND version = ?3",
                params![sealed, now, v],
            )?,
        };
        Ok(n == 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open_in(dir.path()).unwrap();
        (dir, s)
    }

    fn seed(s: &SqliteStore) {
        s.create_tenant("acme", 1).unwrap();
        s.create_user(&NewUser {
            id: "u1",
            tenant: "acme",
            username: "alice",
            password_hash: None,
            roles: &["user".into()],
            now: 1,
        })
        .unwrap();
        s.create_family(
            &NewFamily {
                id: "f1",
                user_id: "u1",
                key_id: None,
                now: 10,
                absolute_expires_at: 1000,
            },
            &NewRefreshToken {
                token_hmac: b"t1",
                idle_expires_at: 100,
            },
        )
        .unwrap();
    }

    #[test]
    fn schema_is_created_in_wal_mode_and_reopens() {
        let (dir, s) = store();
        let mode: String = s
            .lock()
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(s);
        let s = SqliteStore::open_in(dir.path()).unwrap();
        let v: i64 = s
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let mode = std::fs::metadata(dir.path().join(DB_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn user_needs_an_existing_tenant_and_a_unique_name() {
        let (_d, s) = store();
        let u = NewUser {
            id: "u1",
            tenant: "nope",
            username: "alice",
            password_hash: None,
            roles: &[],
            now: 1,
        };
        assert!(matches!(s.create_user(&u), Err(StoreError::NotFound(_))));
        s.create_tenant("nope", 1).unwrap();
        assert!(matches!(
            s.create_tenant("nope", 1),
            Err(StoreError::Conflict(_))
        ));
        s.create_user(&u).unwrap();
        let u2 = NewUser { id: "u2", ..u };
        assert!(matches!(s.create_user(&u2), Err(StoreError::Conflict(_))));
    }

    #[test]
    fn rotation_is_single_use_and_reuse_revokes_the_family() {
        let (_d, s) = store();
        seed(&s);
        let next = |h: &'static [u8]| NewRefreshToken {
            token_hmac: h,
            idle_expires_at: 200,
        };
        match s.rotate_refresh(b"t1", &next(b"t2"), 20, 0).unwrap() {
            RotateOutcome::Rotated { session } => {
                assert_eq!(session.family_id, "f1");
                assert_eq!(session.tenant, "acme");
            }
            other => panic!("{other:?}"),
        }
        let epoch = s.auth_epoch().unwrap();
        // The spent token again: reuse, the family dies, the newest token with it.
        assert_eq!(
            s.rotate_refresh(b"t1", &next(b"t3"), 21, 0).unwrap(),
            RotateOutcome::Reused {
                family_id: "f1".into()
            }
        );
        assert!(s.auth_epoch().unwrap() > epoch);
        assert_eq!(
            s.rotate_refresh(b"t2", &next(b"t4"), 22, 0).unwrap(),
            RotateOutcome::Dead {
                family_id: "f1".into()
            }
        );
        assert!(s.session("f1", 25).unwrap().unwrap().revoked);
        let ev = s.security_events().unwrap();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].kind, "refresh_reuse_detected");
        assert_eq!(ev[0].family_id.as_deref(), Some("f1"));
        assert_eq!(
            s.rotate_refresh(b"zz", &next(b"t5"), 22, 0).unwrap(),
            RotateOutcome::Unknown
        );
    }

    #[test]
    fn idle_and_absolute_deadlines_end_a_token() {
        let (_d, s) = store();
        seed(&s);
        let next = NewRefreshToken {
            token_hmac: b"t2",
            idle_expires_at: 5000,
        };
        // Idle deadline of t1 is 100.
        assert!(matches!(
            s.rotate_refresh(b"t1", &next, 100, 0).unwrap(),
            RotateOutcome::Dead { .. }
        ));
    }

    #[test]
    fn successor_idle_deadline_is_capped_by_the_absolute_one() {
        let (_d, s) = store();
        seed(&s);
        let next = NewRefreshToken {
            token_hmac: b"t2",
            idle_expires_at: 5000,
        };
        s.rotate_refresh(b"t1", &next, 20, 0).unwrap();
        let t3 = NewRefreshToken {
            token_hmac: b"t3",
            idle_expires_at: 6000,
        };
        // Absolute deadline is 1000: t2 is dead there even though its idle time was 5000.
        assert!(matches!(
            s.rotate_refresh(b"t2", &t3, 1000, 0).unwrap(),
            RotateOutcome::Dead { .. }
        ));
    }

    #[test]
    fn disabling_a_user_revokes_its_families() {
        let (_d, s) = store();
        seed(&s);
        assert!(s.disable_user("u1", 30).unwrap());
        assert!(!s.disable_user("u1", 31).unwrap());
        let sess = s.session("f1", 25).unwrap().unwrap();
        assert!(sess.revoked && sess.user_disabled);
        assert!(!sess.is_active(31));
    }

    #[test]
    fn revoking_a_key_revokes_its_families() {
        let (_d, s) = store();
        seed(&s);
        s.create_api_key(&NewApiKey {
            key_id: "k1",
            user_id: "u1",
            name: "ci",
            secret_hmac: b"h",
            roles: &["user".into()],
            now: 1,
            expires_at: None,
        })
        .unwrap();
        s.create_family(
            &NewFamily {
                id: "f2",
                user_id: "u1",
                key_id: Some("k1"),
                now: 10,
                absolute_expires_at: 1000,
            },
            &NewRefreshToken {
                token_hmac: b"k-t1",
                idle_expires_at: 100,
            },
        )
        .unwrap();
        assert!(s.api_key("k1").unwrap().unwrap().is_active(20));
        assert!(s.revoke_api_key("k1", 20).unwrap());
        assert!(!s.api_key("k1").unwrap().unwrap().is_active(21));
        let f2 = s.session("f2", 25).unwrap().unwrap();
        assert!(f2.revoked && f2.key_inactive);
        // The password session f1 is untouched.
        assert!(s.session("f1", 25).unwrap().unwrap().is_active(21));
    }
}
