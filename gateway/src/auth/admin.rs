//! The operator's identity operations: tenants, users, passwords, API keys. Used by the CLI
//! (`moat users|keys|tenants`) against the store directly, and by the admin plane (`admin.rs`,
//! through `Identity::admin_as`). Names and roles are checked here, once, for every caller (the
//! grammar is `crate::policy_grammar`).
//!
//! The root CLI has no [`Grantor`] and may do anything. An admin-plane caller is a grantor,
//! and what it hands out is bounded here, whatever route asked:
//! - it works in its own tenant only (another tenant's user "does not exist");
//! - it may grant a role (create a user with it, set a user's roles) or mint a key only when
//!   its own effective permissions cover every permission that role or key carries, and may
//!   change the roles of a user only when it covers that user's current roles too;
//! - a global permission ([`crate::policy_grammar::GLOBAL_PERMISSIONS`]) is never handed out, not even by a caller
//!   that holds it, and a role the config does not define is never granted (a later config
//!   could give it anything).
//!
//! A refusal is a [`Forbidden`] (the admin plane answers 403).

use anyhow::{Context, bail};
use zeroize::Zeroizing;

use super::{Principal, api_key, now, password, secrets::Pepper};
use crate::config::Config;
use crate::permissions::Permissions;
use crate::policy_grammar::{check_name, check_role};
use crate::store::{ApiKeyRecord, NewApiKey, NewUser, Store, StoreError, Tenant, User};

pub struct Admin<'a> {
    pub store: &'a dyn Store,
    pub pepper: &'a Pepper,
    /// Who asks over the admin plane; `None`: the root CLI.
    pub caller: Option<Grantor<'a>>,
}

/// An admin-plane caller: its tenant and effective roles, resolved against the config in force.
#[derive(Clone, Copy)]
pub struct Grantor<'a> {
    pub config: &'a Config,
    pub principal: &'a Principal,
}

/// The caller may not do this: it would hand out more than it holds. The message says what.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Forbidden(pub String);

/// The username is taken. Said the same way whether the holder is in the caller's tenant or
/// another one, and without naming it, so the admin plane is no directory of other tenants.
#[derive(Debug, thiserror::Error)]
#[error("this username is not available")]
pub struct NameUnavailable;

impl Grantor<'_> {
    /// Refuses unless the caller covers everything `roles` would carry. `what` starts the
    /// message (`"a key for `bob`"`); `undefined_ok` lets roles the config does not define
    /// through (they grant nothing; a key may keep its user's stale role names).
    fn check(&self, what: &str, roles: &[String], undefined_ok: bool) -> anyhow::Result<()> {
        if !undefined_ok
            && let Some(r) = roles.iter().find(|r| !self.config.roles().contains_key(*r))
        {
            return Err(Forbidden(format!(
                "{what}: role `{r}` is not defined in the config; only the root CLI grants it"
            ))
            .into());
        }
        let wanted = Permissions::of(self.config, roles);
        let global = wanted.global();
        if !global.is_empty() {
            return Err(Forbidden(format!(
                "{what} would carry {}, which reach beyond your tenant: only the root CLI \
                 grants them",
                global.join(", ")
            ))
            .into());
        }
        let missing = Permissions::of(self.config, &self.principal.roles).missing(&wanted);
        if !missing.is_empty() {
            return Err(Forbidden(format!(
                "{what} would carry {}, which you do not hold",
                missing.join(", ")
            ))
            .into());
        }
        Ok(())
    }

    fn own(&self, u: User) -> anyhow::Result<User> {
        if u.tenant == self.principal.tenant {
            Ok(u)
        } else {
            bail!("no user `{}` in your tenant", u.username)
        }
    }
}

/// A key just created: the plaintext is shown once and never stored.
pub struct CreatedKey {
    pub key_id: String,
    pub plaintext: Zeroizing<String>,
}

impl Admin<'_> {
    /// Records a change in the audit log, naming who made it: `admin:<username>` for an
    /// admin-plane caller, `cli:<unix user>` for the CLI.
    fn record(&self, action: &str, target: &str, tenant: Option<&str>, roles: &[String]) {
        let actor = match &self.caller {
            Some(c) => format!("admin:{}", c.principal.username),
            None => crate::audit::cli_actor(),
        };
        crate::audit::emit(crate::audit::Event::IdentityChange {
            actor,
            action: action.to_owned(),
            target: target.to_owned(),
            tenant: tenant.map(str::to_owned),
            roles: roles.to_vec(),
        });
    }

    pub fn add_tenant(&self, name: &str) -> anyhow::Result<()> {
        check_name("tenant", name)?;
        self.store.create_tenant(name, now())?;
        self.record("tenant_added", name, Some(name), &[]);
        Ok(())
    }

    pub fn tenants(&self) -> anyhow::Result<Vec<Tenant>> {
        Ok(self.store.list_tenants()?)
    }

    /// The user by name; for a grantor, only one of its own tenant.
    fn user(&self, username: &str) -> anyhow::Result<User> {
        let u = self.store.user_by_name(username)?;
        match &self.caller {
            None => u.with_context(|| format!("no user `{username}`")),
            Some(c) => u
                .with_context(|| format!("no user `{username}` in your tenant"))
                .and_then(|u| c.own(u)),
        }
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
        if let Some(c) = &self.caller {
            if tenant != c.principal.tenant {
                return Err(Forbidden("users are created in your own tenant only".into()).into());
            }
            // Before the insert: a refused grant must not tell whether the name is taken.
            c.check(&format!("user `{username}`"), roles, false)?;
        }
        let hash = match password {
            Some(p) => {
                password::check_policy(p).map_err(anyhow::Error::msg)?;
                Some(password::hash(p))
            }
            None => None,
        };
        let id = format!("u_{}", super::secrets::random_base62(16));
        match self.store.create_user(&NewUser {
            id: &id,
            tenant,
            username,
            password_hash: hash.as_deref(),
            roles,
            now: now(),
        }) {
            Ok(()) => {
                self.record("user_added", &id, Some(tenant), roles);
                Ok(id)
            }
            Err(StoreError::Conflict(_)) if self.caller.is_some() => Err(NameUnavailable.into()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn set_password(&self, username: &str, password: &str) -> anyhow::Result<()> {
        password::check_policy(password).map_err(anyhow::Error::msg)?;
        let u = self.user(username)?;
        self.store.set_password(&u.id, &password::hash(password))?;
        self.record("password_set", &u.id, Some(&u.tenant), &[]);
        Ok(())
    }

    /// Disables the user and ends its sessions. Returns its id and whether anything changed.
    pub fn disable_user(&self, username: &str) -> anyhow::Result<(String, bool)> {
        let u = self.user(username)?;
        let changed = self.store.disable_user(&u.id, now())?;
        if changed {
            self.record("user_disabled", &u.id, Some(&u.tenant), &[]);
        }
        Ok((u.id, changed))
    }

    /// Replaces a user's roles. Its keys keep their own lists, but a key's effective roles are
    /// always intersected with its user's, so a role taken from the user is gone from its keys.
    pub fn set_user_roles(&self, username: &str, roles: &[String]) -> anyhow::Result<String> {
        for r in roles {
            check_role(r)?;
        }
        let u = self.user(username)?;
        if let Some(c) = &self.caller {
            // Both sides: no granting what one lacks, no editing a user who holds more.
            c.check(&format!("the roles of `{username}`"), &u.roles, true)?;
            c.check(&format!("roles for `{username}`"), roles, false)?;
        }
        self.store.set_user_roles(&u.id, roles, now())?;
        self.record("user_roles_changed", &u.id, Some(&u.tenant), roles);
        Ok(u.id)
    }

    /// Narrows a key to `roles`, which must be among its current roles (never widens).
    pub fn narrow_key(&self, key_id: &str, roles: &[String]) -> anyhow::Result<()> {
        let Some(k) = self.own_key(key_id)? else {
            bail!("no key `{key_id}`");
        };
        for r in roles {
            if !k.roles.contains(r) {
                bail!("key `{key_id}` does not have role `{r}`: a key can only be narrowed");
            }
        }
        self.store.set_api_key_roles(key_id, roles, now())?;
        self.record("key_narrowed", key_id, Some(&k.tenant), roles);
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
        if let Some(c) = &self.caller {
            c.check(&format!("a key for `{username}`"), &roles, true)
                .context("name `roles` to narrow the key to what you may hand out")?;
        }
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
                    self.record("key_created", &key.key_id, Some(&u.tenant), &roles);
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

    /// The key, if it exists and (for a grantor) belongs to its tenant.
    fn own_key(&self, key_id: &str) -> anyhow::Result<Option<ApiKeyRecord>> {
        let k = self.store.api_key(key_id)?;
        Ok(match &self.caller {
            None => k,
            Some(c) => k.filter(|k| k.tenant == c.principal.tenant),
        })
    }

    pub fn keys(&self, username: Option<&str>) -> anyhow::Result<Vec<ApiKeyRecord>> {
        let uid = username.map(|n| self.user(n)).transpose()?.map(|u| u.id);
        Ok(self.store.list_api_keys(uid.as_deref())?)
    }

    /// Revokes a key and ends the sessions opened with it. False if it was already revoked.
    pub fn revoke_key(&self, key_id: &str) -> anyhow::Result<bool> {
        let Some(k) = self.own_key(key_id)? else {
            bail!("no key `{key_id}`");
        };
        let changed = self.store.revoke_api_key(key_id, now())?;
        if changed {
            self.record("key_revoked", key_id, Some(&k.tenant), &[]);
        }
        Ok(changed)
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
            caller: None,
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

/// The grant rule of an admin-plane caller, over every admin permission set that exists ×
/// every kind of role it could hand out.
#[cfg(test)]
mod grant_tests {
    use std::path::Path;

    use super::*;
    use crate::{auth::AuthMethod, store::sqlite::SqliteStore};

    const ROLES: &str = r#"
[pools.p]
hosts = ["127.0.0.1:1"]
[models.chat]
pool = "p"
[roles.user]
permissions = ["model:chat", "inference:local"]
[roles.keyadmin]
permissions = ["admin:keys"]
[roles.useradmin]
permissions = ["admin:users"]
[roles.ops]
permissions = ["admin:*"]
"#;

    struct World {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        pepper: Pepper,
        config: Config,
    }

    fn world() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).unwrap();
        let w = World {
            _dir: dir,
            store,
            pepper: Pepper::from_bytes([5; 32]),
            config: Config::from_str(Path::new("/t.toml"), ROLES).unwrap(),
        };
        let root = w.root();
        root.add_tenant("acme").unwrap();
        root.add_tenant("beta").unwrap();
        w
    }

    impl World {
        fn root(&self) -> Admin<'_> {
            Admin {
                store: &self.store,
                pepper: &self.pepper,
                caller: None,
            }
        }

        fn as_caller<'a>(&'a self, p: &'a Principal) -> Admin<'a> {
            Admin {
                caller: Some(Grantor {
                    config: &self.config,
                    principal: p,
                }),
                ..self.root()
            }
        }
    }

    fn roles(r: &[&str]) -> Vec<String> {
        r.iter().map(|s| s.to_string()).collect()
    }

    fn caller(tenant: &str, r: &[&str]) -> Principal {
        Principal {
            user_id: "u_caller".into(),
            username: "caller".into(),
            tenant: tenant.into(),
            key_id: Some("k".into()),
            session_id: None,
            roles: roles(r),
            method: AuthMethod::ApiKey,
        }
    }

    fn forbidden<T>(r: anyhow::Result<T>) -> String {
        match r {
            Ok(_) => panic!("allowed"),
            Err(e) => match e.downcast_ref::<Forbidden>() {
                Some(f) => f.0.clone(),
                None => panic!("refused, but not as forbidden: {e:#}"),
            },
        }
    }

    #[test]
    fn a_caller_hands_out_only_what_it_holds_and_never_a_global_permission() {
        // (caller's roles, may it hand out: `user`, `keyadmin`, `ops`).
        let matrix: &[(&[&str], [bool; 3])] = &[
            (&["keyadmin"], [false, true, false]),
            (&["useradmin"], [false, false, false]),
            (&["keyadmin", "useradmin"], [false, true, false]),
            (&["ops"], [false, true, false]),
            (&["useradmin", "user"], [true, false, false]),
            (&["keyadmin", "user"], [true, true, false]),
            (&["ops", "user"], [true, true, false]),
        ];
        let targets = ["user", "keyadmin", "ops"];
        for (n, (held, allowed)) in matrix.iter().enumerate() {
            let w = world();
            let p = caller("acme", held);
            let a = w.as_caller(&p);
            for (target, allowed) in targets.iter().zip(allowed) {
                let cell = format!("caller {held:?} handing out `{target}`");
                let granted = roles(&[target]);
                // A user created with the role.
                let name = format!("new-{n}-{target}");
                let r = a.add_user(&name, "acme", &granted, None);
                assert_eq!(r.is_ok(), *allowed, "{cell}: add_user");
                if !allowed {
                    let why = forbidden(r);
                    assert!(why.contains(&format!("user `{name}`")), "{cell}: {why}");
                    assert!(w.store.user_by_name(&name).unwrap().is_none(), "{cell}");
                }
                // The role set on an existing user.
                let plain = format!("plain-{n}-{target}");
                w.root().add_user(&plain, "acme", &[], None).unwrap();
                let r = a.set_user_roles(&plain, &granted);
                assert_eq!(r.is_ok(), *allowed, "{cell}: set_user_roles");
                let now_has = w.store.user_by_name(&plain).unwrap().unwrap().roles;
                assert_eq!(now_has == granted, *allowed, "{cell}: roles in the store");
                // A key minted for a user who has the role (made by root).
                let holder = format!("holder-{n}-{target}");
                w.root().add_user(&holder, "acme", &granted, None).unwrap();
                let r = a.create_key(&holder, "k", None, None);
                assert_eq!(r.is_ok(), *allowed, "{cell}: create_key");
                let keys = w.root().keys(Some(&holder)).unwrap();
                assert_eq!(
                    keys.len(),
                    usize::from(*allowed),
                    "{cell}: keys in the store"
                );
            }
        }
    }

    #[test]
    fn refusals_say_why() {
        let w = world();
        let p = caller("acme", &["keyadmin", "useradmin"]);
        let a = w.as_caller(&p);
        let why = forbidden(a.add_user("x", "acme", &roles(&["ops"]), None));
        assert!(why.contains("admin:tenants, audit:read"), "{why}");
        assert!(why.contains("only the root CLI"), "{why}");
        let why = forbidden(a.add_user("x", "acme", &roles(&["user"]), None));
        assert!(
            why.ends_with("would carry model:chat, inference:local, which you do not hold"),
            "{why}"
        );
        let why = forbidden(a.add_user("x", "acme", &roles(&["later-maybe-admin"]), None));
        assert!(why.contains("not defined in the config"), "{why}");
    }

    #[test]
    fn a_key_admin_cannot_mint_the_boss_a_key_with_the_boss_rights() {
        let w = world();
        let root = w.root();
        root.add_user("boss", "acme", &roles(&["ops", "keyadmin"]), None)
            .unwrap();
        let p = caller("acme", &["keyadmin"]);
        let a = w.as_caller(&p);
        let e = a.create_key("boss", "k", None, None).err().unwrap();
        assert!(e.downcast_ref::<Forbidden>().is_some(), "{e:#}");
        assert!(format!("{e:#}").contains("name `roles`"), "{e:#}");
        assert!(root.keys(Some("boss")).unwrap().is_empty());
        // Narrowed to what the caller holds, it may.
        a.create_key("boss", "k", Some(&roles(&["keyadmin"])), None)
            .unwrap();
        // Nor may a user admin strip or rewrite the boss (it holds more than the caller).
        let p = caller("acme", &["useradmin"]);
        let e = w.as_caller(&p).set_user_roles("boss", &[]).unwrap_err();
        assert!(e.downcast_ref::<Forbidden>().is_some(), "{e:#}");
        assert_eq!(root.users().unwrap()[0].roles, roles(&["ops", "keyadmin"]));
        // The root CLI stays all-powerful.
        root.create_key("boss", "root", None, None).unwrap();
        root.add_user("second-boss", "acme", &roles(&["ops"]), None)
            .unwrap();
    }

    #[test]
    fn a_caller_works_in_its_own_tenant_and_taken_names_do_not_say_where() {
        let w = world();
        let root = w.root();
        root.add_user("ours", "acme", &[], None).unwrap();
        root.add_user("theirs", "beta", &roles(&["keyadmin"]), None)
            .unwrap();
        let p = caller("acme", &["keyadmin", "useradmin"]);
        let a = w.as_caller(&p);
        for e in [
            a.create_key("theirs", "k", None, None).err().unwrap(),
            a.set_user_roles("theirs", &[]).unwrap_err(),
            a.disable_user("theirs").unwrap_err(),
        ] {
            assert_eq!(format!("{e:#}"), "no user `theirs` in your tenant");
        }
        let e = a.add_user("x", "beta", &[], None).unwrap_err();
        assert!(e.downcast_ref::<Forbidden>().is_some(), "{e:#}");
        // A name taken in the caller's tenant and one taken in another: the same answer.
        let mine = format!("{:#}", a.add_user("ours", "acme", &[], None).unwrap_err());
        let elsewhere = format!("{:#}", a.add_user("theirs", "acme", &[], None).unwrap_err());
        assert_eq!(mine, elsewhere);
        assert_eq!(mine, "this username is not available");
        // The root CLI still says what happened.
        let e = root.add_user("theirs", "acme", &[], None).unwrap_err();
        assert!(format!("{e:#}").contains("already exists"), "{e:#}");
    }
}
