//! The operator's identity operations: tenants, users, passwords, API keys. Used by the CLI
//! (`moat users|keys|tenants`) against the store directly, and by the admin plane (`admin.rs`,
//! through `Identity::admin`). Names and roles are checked here, once, for every caller (the
//! grammar is `crate::policy_grammar`).

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::{api_key, now, password, secrets::Pepper};
use crate::policy_grammar::{check_name, check_role};
use crate::store::{ApiKeyRecord, NewApiKey, NewUser, Store, StoreError, Tenant, User};

pub struct Admin<'a> {
    pub store: &'a dyn Store,
    pub pepper: &'a Pepper,
}

/// A key just created: the plaintext is shown once and never stored.
pub struct CreatedKey {
    pub key_id: String,
    pub plaintext: Zeroizing<String>,
}

impl Admin<'_> {
    pub fn add_tenant(&self, name: &str) -> anyhow::Result<()> {
        check_name("tenant", name)?;
        self.store.create_tenant(name, now())?;
        Ok(())
    }

    pub fn tenants(&self) -> anyhow::Result<Vec<Tenant>> {
        Ok(self.store.list_tenants()?)
    }

    fn user(&self, username: &str) -> anyhow::Result<User> {
        self.store
            .user_by_name(username)?
            .with_context(|| format!("no user `{username}`"))
    }

    /// Adds a user; with a password it can use `grant_type=password`.
    pub fn add_user(
        &self,
        username: &str,
        tenant: &str,
        roles: &[String],
        password: Option<&str>,
    ) -> anyhow::Result<String> {
        check_name("user", username)?;
        for r in roles {
            check_role(r)?;
        }
        let hash = match password {
            Some(p) => {
                password::check_policy(p).map_err(anyhow::Error::msg)?;
                Some(password::hash(p))
            }
            None => None,
        };
        let id = format!("u_{}", super::secrets::random_base62(16));
        self.store.create_user(&NewUser {
            id: &id,
            tenant,
            username,
            password_hash: hash.as_deref(),
            roles,
            now: now(),
        })?;
        Ok(id)
    }

    pub fn set_password(&self, username: &str, password: &str) -> anyhow::Result<()> {
        password::check_policy(password).map_err(anyhow::Error::msg)?;
        let u = self.user(username)?;
        self.store.set_password(&u.id, &password::hash(password))?;
        Ok(())
    }

    /// Disables the user and ends its sessions. Returns its id and whether anything changed.
    pub fn disable_user(&self, username: &str) -> anyhow::Result<(String, bool)> {
        let u = self.user(username)?;
        let changed = self.store.disable_user(&u.id, now())?;
        Ok((u.id, changed))
    }

    /// Replaces a user's roles. Its keys keep their own lists, but a key's effective roles are
    /// always intersected with its user's, so a role taken from the user is gone from its keys.
    pub fn set_user_roles(&self, username: &str, roles: &[String]) -> anyhow::Result<String> {
        for r in roles {
            check_role(r)?;
        }
        let u = self.user(username)?;
        self.store.set_user_roles(&u.id, roles, now())?;
        Ok(u.id)
    }

    /// Narrows a key to `roles`, which must be among its current roles (never widens).
    pub fn narrow_key(&self, key_id: &str, roles: &[String]) -> anyhow::Result<()> {
        let Some(k) = self.store.api_key(key_id)? else {
            bail!("no key `{key_id}`");
        };
        for r in roles {
            if !k.roles.contains(r) {
                bail!("key `{key_id}` does not have role `{r}`: a key can only be narrowed");
            }
        }
        self.store.set_api_key_roles(key_id, roles, now())?;
        Ok(())
    }

    pub fn users(&self) -> anyhow::Result<Vec<User>> {
        Ok(self.store.list_users()?)
    }

    /// Creates a key for `username`. `roles` narrow the user's (default: all of them); a role
    /// the user lacks is refused, since a key can never widen its user's rights.
    pub fn create_key(
        &self,
        username: &str,
        name: &str,
        roles: Option<&[String]>,
        expires_in_days: Option<u64>,
    ) -> anyhow::Result<CreatedKey> {
        let u = self.user(username)?;
        if u.disabled_at.is_some() {
            bail!("user `{username}` is disabled");
        }
        if name.len() > 128 || name.chars().any(char::is_control) {
            bail!("key name: at most 128 characters, no control characters");
        }
        let roles = match roles {
            Some(r) => {
                for role in r {
                    check_role(role)?;
                    if !u.roles.contains(role) {
                        bail!(
                            "user `{username}` does not have role `{role}`: a key can only narrow its user's roles"
                        );
                    }
                }
                r.to_vec()
            }
            None => u.roles.clone(),
        };
        let t = now();
        let expires_at = expires_in_days
            .map(|d| {
                if d == 0 || d > 3650 {
                    bail!("--expires-in-days must be between 1 and 3650");
                }
                Ok(t + d as i64 * 86_400)
            })
            .transpose()?;
        // A 71-bit random id practically never collides; retry a few times if it does.
        for _ in 0..4 {
            let key = api_key::mint(self.pepper, &api_key::new_key_id());
            match self.store.create_api_key(&NewApiKey {
                key_id: &key.key_id,
                user_id: &u.id,
                name,
                secret_hmac: &key.secret_hmac,
                roles: &roles,
                now: t,
                expires_at,
            }) {
                Ok(()) => {
                    return Ok(CreatedKey {
                        key_id: key.key_id,
                        plaintext: key.plaintext,
                    });
                }
                Err(StoreError::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        bail!("could not allocate a key id")
    }

    pub fn keys(&self, username: Option<&str>) -> anyhow::Result<Vec<ApiKeyRecord>> {
        let uid = username.map(|n| self.user(n)).transpose()?.map(|u| u.id);
        Ok(self.store.list_api_keys(uid.as_deref())?)
    }

    /// Revokes a key and ends the sessions opened with it. False if it was already revoked.
    pub fn revoke_key(&self, key_id: &str) -> anyhow::Result<bool> {
        if self.store.api_key(key_id)?.is_none() {
            bail!("no key `{key_id}`");
        }
        Ok(self.store.revoke_api_key(key_id, now())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[test]
    fn keys_narrow_users_roles_and_names_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).unwrap();
        let pepper = Pepper::from_bytes([3; 32]);
        let a = Admin {
            store: &store,
            pepper: &pepper,
        };
        assert!(a.add_tenant("bad name").is_err());
        a.add_tenant("acme").unwrap();
        let roles = vec!["user".to_string()];
        assert!(a.add_user("alice", "acme", &roles, Some("short")).is_err());
        a.add_user("alice", "acme", &roles, None).unwrap();
        assert!(a.add_user("bob", "nope", &roles, None).is_err());
        let wider = vec!["admin".to_string()];
        assert!(a.create_key("alice", "k", Some(&wider), None).is_err());
        let k = a.create_key("alice", "k", None, Some(30)).unwrap();
        assert!(api_key::parse(&k.plaintext).is_some());
        let listed = a.keys(Some("alice")).unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].roles, roles);
        assert!(listed[0].expires_at.is_some());
        assert!(a.revoke_key(&k.key_id).unwrap());
        assert!(!a.revoke_key(&k.key_id).unwrap());
        assert!(a.revoke_key("nope").is_err());
        let (_, changed) = a.disable_user("alice").unwrap();
        assert!(changed);
        assert!(a.create_key("alice", "k2", None, None).is_err());
    }
}
