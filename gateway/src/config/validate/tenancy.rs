//! `[roles]`, `[tenants]`, `[quotas]` and the tenancy rules that span sections: a role's
//! permissions are well-formed and name models that exist; a pool `dedicated_to` a tenant
//! serves that dedicated tenant only (never as a model's shared pool, never external for a
//! local-only tenant); `tenant_pools` point at pools dedicated to that tenant; quotas are
//! positive. The permission and name grammar is [`crate::policy_grammar`]'s.

use super::Invalid;
use crate::{
    config::{Quota, RawConfig},
    policy_grammar::{Permission, check_name, check_role},
};

/// Checks roles, tenants, dedicated pools and quotas.
pub(in crate::config) fn tenancy(raw: &RawConfig) -> Result<(), Invalid> {
    for (name, role) in &raw.roles {
        check_role(name).map_err(|e| Invalid::new(format!("roles.{name}"), e.to_string()))?;
        for (i, p) in role.permissions.iter().enumerate() {
            let key = format!("roles.{name}.permissions[{i}]");
            match Permission::parse(p).map_err(|r| Invalid::new(&key, r))? {
                Permission::Model(Some(m)) if !raw.models.contains_key(&m) => {
                    return Err(Invalid::new(key, format!("no model named `{m}`")));
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
                    return Err(Invalid::new(
                        key,
                        format!("tenant `{t}` is not marked `dedicated` in [tenants.{t}]"),
                    ));
                }
            }
            if pool.external && raw.tenants[t].local_only {
                return Err(Invalid::new(
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
            return Err(Invalid::new(
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
                return Err(Invalid::new(
                    key,
                    format!("tenant `{tenant}` is not marked `dedicated` in [tenants.{tenant}]"),
                ));
            }
            let Some(p) = raw.pools.get(pool) else {
                return Err(Invalid::new(key, format!("no pool named `{pool}`")));
            };
            if p.dedicated_to.as_deref() != Some(tenant.as_str()) {
                return Err(Invalid::new(
                    key,
                    format!(
                        "pool `{pool}` is not dedicated to `{tenant}` (set `dedicated_to = \"{tenant}\"` on it)"
                    ),
                ));
            }
        }
    }
    let check_quota = |key: &str, q: &Quota| -> Result<(), Invalid> {
        for (k, v) in [
            ("requests_per_minute", q.requests_per_minute),
            ("tokens_per_minute", q.tokens_per_minute),
            ("concurrent_requests", q.concurrent_requests),
            ("concurrent_streams", q.concurrent_streams),
        ] {
            if v == Some(0) {
                return Err(Invalid::new(
                    format!("{key}.{k}"),
                    "must be at least 1 (omit it for no limit)",
                ));
            }
        }
        Ok(())
    };
    match (raw.quotas.backend, &raw.quotas.redis_url) {
        (crate::config::QuotaBackendKind::Redis, None) => {
            return Err(Invalid::new(
                "quotas.redis_url",
                "`backend = \"redis\"` needs `redis_url = \"redis://host:port/\"`",
            ));
        }
        (crate::config::QuotaBackendKind::Redis, Some(url)) => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())
                .map_err(|e| Invalid::new("quotas.redis_url", format!("not a Redis URL: {e}")))?;
            if info.redis_settings().password().is_some() {
                return Err(Invalid::new(
                    "quotas.redis_url",
                    "the URL carries a password; put it in `redis_password_file` or \
                     `redis_password_env` instead",
                ));
            }
        }
        (crate::config::QuotaBackendKind::Memory, Some(_)) => {
            return Err(Invalid::new(
                "quotas.redis_url",
                "only for `backend = \"redis\"`",
            ));
        }
        (crate::config::QuotaBackendKind::Memory, None) => {}
    }
    if let Some(secs) = raw.quotas.redis_lease_secs {
        if raw.quotas.backend != crate::config::QuotaBackendKind::Redis {
            return Err(Invalid::new(
                "quotas.redis_lease_secs",
                "only for `backend = \"redis\"`",
            ));
        }
        if !(3..=3600).contains(&secs) {
            return Err(Invalid::new(
                "quotas.redis_lease_secs",
                "must be between 3 and 3600 seconds",
            ));
        }
    }
    check_quota("quotas.tenant", &raw.quotas.tenant)?;
    check_quota("quotas.key", &raw.quotas.key)?;
    for (name, t) in &raw.tenants {
        check_name("tenant", name)
            .map_err(|e| Invalid::new(format!("tenants.{name}"), e.to_string()))?;
        if let Some(q) = &t.quota {
            check_quota(&format!("tenants.{name}.quota"), q)?;
        }
        if let Some(q) = &t.key_quota {
            check_quota(&format!("tenants.{name}.key_quota"), q)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    /// A dedicated, local-only tenant with its own pool beside the shared one, and a
    /// local-only tenant that is not dedicated.
    const BASE: &str = r#"
[pools.shared]
hosts = ["127.0.0.1:1"]
[pools.acme-gpu]
hosts = ["127.0.0.1:3"]
dedicated_to = "acme"
[models.chat]
pool = "shared"
tenant_pools = { acme = "acme-gpu" }
[tenants.acme]
dedicated = true
local_only = true
[tenants.lab]
local_only = true
"#;

    fn config(extra: &str) -> Result<Config, String> {
        Config::from_str(Path::new("/t.toml"), &format!("{BASE}{extra}")).map_err(|e| e.to_string())
    }

    #[test]
    fn the_base_is_valid() {
        config("").unwrap();
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

    #[test]
    fn names_are_checked() {
        let e = config("[roles.Admin]\npermissions = []\n").unwrap_err();
        assert!(e.contains("key `roles.Admin`"), "{e}");
        let e = config("[tenants.\"-x\"]\n").unwrap_err();
        assert!(e.contains("key `tenants.-x`"), "{e}");
    }
}
