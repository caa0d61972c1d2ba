//! Authorization and tenancy: what a principal may use and where its traffic may go.
//!
//! Owns the permission grammar, the check of the `[roles]`, `[tenants]`, `dedicated_to`,
//! `external` and `tenant_pools` rules when a config loads, the per-request decision (model
//! permission + provider permission + tenant routing), and the `/v1/models` filter.
//!
//! Roles are config; a principal's role names come from the store (the user's roles narrowed
//! by its key's) through the identity cache, which is invalidated whenever a key or user
//! changes. So the permissions are resolved per request: a narrowed key or a removed role
//! takes effect on the next request once the change reached this process.
//!
//! Deny by default: a role the config does not define grants nothing; a model needs both
//! `model:<name>` (or `model:*`) and `inference:<provider>` (or `inference:*`) of the pool the
//! caller's tenant would be routed to.

use std::collections::{BTreeMap, BTreeSet};

use crate::{
    auth::Principal,
    config::{Config, Quota, RawConfig},
    error::ApiError,
};

/// Admin permissions (for the admin plane).
pub const ADMIN_PERMISSIONS: &[&str] = &[
    "admin:keys",
    "admin:users",
    "admin:tenants",
    "admin:policy",
    "audit:read",
];

/// One permission, as written in a role.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Permission {
    /// `inference:<provider>` / `inference:*`: may send inference to pools of that provider.
    Inference(Option<String>),
    /// `model:<name>` / `model:*`.
    Model(Option<String>),
    /// `logprobs`: may ask for `logprobs`, `top_logprobs` and `logit_bias`.
    Logprobs,
    /// `admin:keys`, …, `audit:read`, or `admin:*` (all of them).
    Admin(String),
}

impl Permission {
    pub fn parse(s: &str) -> Result<Permission, String> {
        let wild = |v: &str| (v != "*").then(|| v.to_owned());
        match s.split_once(':') {
            Some(("inference", p)) if !p.is_empty() => Ok(Self::Inference(wild(p))),
            Some(("model", m)) if !m.is_empty() => Ok(Self::Model(wild(m))),
            _ if s == "logprobs" => Ok(Self::Logprobs),
            _ if s == "admin:*" || ADMIN_PERMISSIONS.contains(&s) => Ok(Self::Admin(s.to_owned())),
            _ => Err(format!(
                "unknown permission `{s}` (known: inference:<provider>, inference:*, \
                 model:<name>, model:*, logprobs, admin:*, {})",
                ADMIN_PERMISSIONS.join(", ")
            )),
        }
    }
}

/// The union of a principal's roles' permissions.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Permissions {
    all_models: bool,
    models: BTreeSet<String>,
    all_providers: bool,
    providers: BTreeSet<String>,
    pub logprobs: bool,
    admin: BTreeSet<String>,
}

impl Permissions {
    /// Resolves role names against the config's roles; unknown roles grant nothing.
    pub fn of(config: &Config, roles: &[String]) -> Permissions {
        let mut p = Permissions::default();
        for role in roles {
            let Some(r) = config.raw.roles.get(role) else {
                continue;
            };
            // Checked at load, so parsing cannot fail here; skipping is still deny.
            for perm in r
                .permissions
                .iter()
                .filter_map(|s| Permission::parse(s).ok())
            {
                match perm {
                    Permission::Inference(None) => p.all_providers = true,
                    Permission::Inference(Some(x)) => _ = p.providers.insert(x),
                    Permission::Model(None) => p.all_models = true,
                    Permission::Model(Some(x)) => _ = p.models.insert(x),
                    Permission::Logprobs => p.logprobs = true,
                    Permission::Admin(a) if a == "admin:*" => p
                        .admin
                        .extend(ADMIN_PERMISSIONS.iter().map(|s| s.to_string())),
                    Permission::Admin(a) => _ = p.admin.insert(a),
                }
            }
        }
        p
    }

    pub fn model(&self, name: &str) -> bool {
        self.all_models || self.models.contains(name)
    }

    pub fn provider(&self, name: &str) -> bool {
        self.all_providers || self.providers.contains(name)
    }

    pub fn admin(&self, perm: &str) -> bool {
        self.admin.contains(perm)
    }

    /// Sorted permission strings, for the effective-policy view.
    pub fn describe(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.all_models {
            out.push("model:*".to_owned());
        }
        out.extend(self.models.iter().map(|m| format!("model:{m}")));
        if self.all_providers {
            out.push("inference:*".to_owned());
        }
        out.extend(self.providers.iter().map(|p| format!("inference:{p}")));
        if self.logprobs {
            out.push("logprobs".to_owned());
        }
        out.extend(self.admin.iter().cloned());
        out
    }
}

/// Where a request of a tenant for a model goes, if anywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub pool: String,
    pub provider: String,
}

/// The pool that serves `model` to `tenant`: a dedicated tenant only its own pool (never the
/// shared one), a local-only tenant never an external pool. `None`: not served to it.
pub fn route(config: &Config, tenant: &str, model: &str) -> Option<Route> {
    let m = config.raw.models.get(model)?;
    let t = config.raw.tenants.get(tenant);
    let pool = if t.is_some_and(|t| t.dedicated) {
        m.tenant_pools.get(tenant)?
    } else {
        &m.pool
    };
    let raw = config.raw.pools.get(pool)?;
    // Belt and braces: the load refuses configs where these could fail.
    if raw.dedicated_to.as_deref().is_some_and(|d| d != tenant) {
        return None;
    }
    if raw.external && t.is_some_and(|t| t.local_only) {
        return None;
    }
    Some(Route {
        pool: pool.clone(),
        provider: raw.provider.clone(),
    })
}

/// Why a principal may not use a model, or where it goes.
pub fn authorize(
    config: &Config,
    principal: &Principal,
    perms: &Permissions,
    model: &str,
    wants_logprobs: bool,
) -> Result<Route, ApiError> {
    let Some(route) = route(config, &principal.tenant, model) else {
        return Err(forbidden(format!(
            "the model `{model}` is not available to your tenant"
        )));
    };
    if !perms.model(model) {
        return Err(forbidden(format!(
            "you lack permission `model:{model}` for this model"
        )));
    }
    if !perms.provider(&route.provider) {
        return Err(forbidden(format!(
            "you lack permission `inference:{}` for this model's provider",
            route.provider
        )));
    }
    if wants_logprobs && !perms.logprobs {
        return Err(forbidden(
            "`logprobs`, `top_logprobs` and `logit_bias` need the `logprobs` permission",
        )
        .with_param("logprobs"));
    }
    Ok(route)
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::forbidden(message).with_code("permission_denied")
}

/// The models a principal may use, with their provider (for `/v1/models`).
pub fn visible_models<'c>(
    config: &'c Config,
    tenant: &str,
    perms: &Permissions,
) -> Vec<(&'c str, Route)> {
    config
        .raw
        .models
        .keys()
        .filter(|m| perms.model(m))
        .filter_map(|m| {
            let r = route(config, tenant, m)?;
            perms.provider(&r.provider).then_some((m.as_str(), r))
        })
        .collect()
}

/// Checks roles, tenants, dedicated pools and quotas at load. Errors carry the dotted key.
pub fn check_config(raw: &RawConfig) -> Result<(), (String, String)> {
    for (name, role) in &raw.roles {
        crate::auth::admin::check_role(name)
            .map_err(|e| (format!("roles.{name}"), e.to_string()))?;
        for (i, p) in role.permissions.iter().enumerate() {
            let key = format!("roles.{name}.permissions[{i}]");
            match Permission::parse(p).map_err(|r| (key.clone(), r))? {
                Permission::Model(Some(m)) if !raw.models.contains_key(&m) => {
                    return Err((key, format!("no model named `{m}`")));
                }
                _ => {}
            }
        }
    }
    for (name, pool) in &raw.pools {
        if let Some(t) = &pool.dedicated_to {
            let key = format!("pools.{name}.dedicated_to");
            match raw.tenants.get(t) {
                Some(tc) if tc.dedicated => {}
                _ => {
                    return Err((
                        key,
                        format!("tenant `{t}` is not marked `dedicated` in [tenants.{t}]"),
                    ));
                }
            }
            if pool.external && raw.tenants[t].local_only {
                return Err((
                    format!("pools.{name}.external"),
                    format!("tenant `{t}` is `local_only`: its dedicated pool cannot be external"),
                ));
            }
        }
    }
    for (name, model) in &raw.models {
        if let Some(owner) = raw
            .pools
            .get(&model.pool)
            .and_then(|p| p.dedicated_to.as_ref())
        {
            return Err((
                format!("models.{name}.pool"),
                format!(
                    "pool `{}` is dedicated to tenant `{owner}`; a model's shared pool must not be \
                     dedicated (use `tenant_pools.{owner}`)",
                    model.pool
                ),
            ));
        }
        for (tenant, pool) in &model.tenant_pools {
            let key = format!("models.{name}.tenant_pools.{tenant}");
            if !raw.tenants.get(tenant).is_some_and(|t| t.dedicated) {
                return Err((
                    key,
                    format!("tenant `{tenant}` is not marked `dedicated` in [tenants.{tenant}]"),
                ));
            }
            let Some(p) = raw.pools.get(pool) else {
                return Err((key, format!("no pool named `{pool}`")));
            };
            if p.dedicated_to.as_deref() != Some(tenant.as_str()) {
                return Err((
                    key,
                    format!(
                        "pool `{pool}` is not dedicated to `{tenant}` (set `dedicated_to = \"{tenant}\"` on it)"
                    ),
                ));
            }
        }
    }
    let check_quota = |key: &str, q: &Quota| -> Result<(), (String, String)> {
        for (k, v) in [
            ("requests_per_minute", q.requests_per_minute),
            ("tokens_per_minute", q.tokens_per_minute),
            ("concurrent_requests", q.concurrent_requests),
            ("concurrent_streams", q.concurrent_streams),
        ] {
            if v == Some(0) {
                return Err((
                    format!("{key}.{k}"),
                    "must be at least 1 (omit it for no limit)".into(),
                ));
            }
        }
        Ok(())
    };
    check_quota("quotas.tenant", &raw.quotas.tenant)?;
    check_quota("quotas.key", &raw.quotas.key)?;
    for (name, t) in &raw.tenants {
        crate::auth::admin::check_name("tenant", name)
            .map_err(|e| (format!("tenants.{name}"), e.to_string()))?;
        if let Some(q) = &t.quota {
            check_quota(&format!("tenants.{name}.quota"), q)?;
        }
        if let Some(q) = &t.key_quota {
            check_quota(&format!("tenants.{name}.key_quota"), q)?;
        }
    }
    Ok(())
}

/// What the store-independent policy says about a set of roles in a tenant (admin plane,
/// `moat policy`): permissions and the models with the pool each would use.
pub fn effective(config: &Config, tenant: &str, roles: &[String]) -> serde_json::Value {
    let perms = Permissions::of(config, roles);
    let models: BTreeMap<&str, serde_json::Value> = visible_models(config, tenant, &perms)
        .into_iter()
        .map(|(m, r)| {
            (
                m,
                serde_json::json!({"pool": r.pool, "provider": r.provider}),
            )
        })
        .collect();
    let t = config.tenant(tenant);
    serde_json::json!({
        "tenant": tenant,
        "dedicated": t.dedicated,
        "local_only": t.local_only,
        "roles": roles,
        "permissions": perms.describe(),
        "models": models,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::auth::AuthMethod;

    const BASE: &str = r#"
[pools.shared]
hosts = ["127.0.0.1:1"]
[pools.ext]
hosts = ["127.0.0.1:2"]
provider = "external"
external = true
[pools.acme-gpu]
hosts = ["127.0.0.1:3"]
dedicated_to = "acme"
[models.chat]
pool = "shared"
tenant_pools = { acme = "acme-gpu" }
[models.big]
pool = "ext"
[tenants.acme]
dedicated = true
local_only = true
[tenants.lab]
local_only = true
[roles.user]
permissions = ["model:chat", "inference:local"]
[roles.all]
permissions = ["model:*", "inference:*", "logprobs"]
"#;

    fn config(extra: &str) -> Result<Config, String> {
        Config::from_str(Path::new("/t.toml"), &format!("{BASE}{extra}")).map_err(|e| e.to_string())
    }

    fn principal(tenant: &str, roles: &[&str]) -> Principal {
        Principal {
            user_id: "u".into(),
            username: "u".into(),
            tenant: tenant.into(),
            key_id: Some("k".into()),
            session_id: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            method: AuthMethod::ApiKey,
        }
    }

    fn decide(
        c: &Config,
        tenant: &str,
        roles: &[&str],
        model: &str,
        lp: bool,
    ) -> Result<String, u16> {
        let p = principal(tenant, roles);
        let perms = Permissions::of(c, &p.roles);
        authorize(c, &p, &perms, model, lp)
            .map(|r| r.pool)
            .map_err(|e| e.status.as_u16())
    }

    #[test]
    fn model_and_provider_are_both_required() {
        let c = config("").unwrap();
        assert_eq!(
            decide(&c, "beta", &["user"], "chat", false),
            Ok("shared".into())
        );
        assert_eq!(decide(&c, "beta", &["user"], "big", false), Err(403));
        assert_eq!(
            decide(&c, "beta", &["user"], "chat", true),
            Err(403),
            "logprobs"
        );
        assert_eq!(decide(&c, "beta", &["all"], "big", true), Ok("ext".into()));
        assert_eq!(
            decide(&c, "beta", &[], "chat", false),
            Err(403),
            "no role, no access"
        );
        assert_eq!(
            decide(&c, "beta", &["nope"], "chat", false),
            Err(403),
            "undefined role"
        );
    }

    #[test]
    fn tenants_are_routed_apart() {
        let c = config("").unwrap();
        assert_eq!(
            decide(&c, "acme", &["all"], "chat", false),
            Ok("acme-gpu".into())
        );
        assert_eq!(
            decide(&c, "acme", &["all"], "big", false),
            Err(403),
            "no dedicated pool"
        );
        assert_eq!(
            decide(&c, "lab", &["all"], "big", false),
            Err(403),
            "local only"
        );
        let perms = Permissions::of(&c, &["all".into()]);
        let names = |t| {
            visible_models(&c, t, &perms)
                .into_iter()
                .map(|(m, _)| m)
                .collect::<Vec<_>>()
        };
        assert_eq!(names("acme"), ["chat"]);
        assert_eq!(names("beta"), ["big", "chat"]);
    }

    #[test]
    fn violating_configs_are_refused() {
        for (extra, key) in [
            (
                "[pools.x]\nhosts=[\"127.0.0.1:9\"]\ndedicated_to = \"lab\"\n",
                "pools.x.dedicated_to",
            ),
            ("[models.m]\npool = \"acme-gpu\"\n", "models.m.pool"),
            (
                "[models.m]\npool = \"shared\"\ntenant_pools = { lab = \"shared\" }\n",
                "models.m.tenant_pools.lab",
            ),
            (
                "[models.m]\npool = \"shared\"\ntenant_pools = { acme = \"shared\" }\n",
                "models.m.tenant_pools.acme",
            ),
            (
                "[pools.x]\nhosts=[\"127.0.0.1:9\"]\ndedicated_to = \"acme\"\nexternal = true\n",
                "pools.x.external",
            ),
            (
                "[roles.r]\npermissions = [\"model:gpt\"]\n",
                "roles.r.permissions[0]",
            ),
            (
                "[roles.r]\npermissions = [\"root\"]\n",
                "roles.r.permissions[0]",
            ),
            (
                "[quotas.key]\nrequests_per_minute = 0\n",
                "quotas.key.requests_per_minute",
            ),
        ] {
            let e = config(extra).expect_err(extra);
            assert!(e.contains(key), "{extra}: {e}");
        }
    }
}
