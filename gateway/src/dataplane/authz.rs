//! Authorization and tenancy: what a principal may use and where its traffic may go.
//!
//! Owns the per-request decision (model permission + provider permission + which pool the
//! tenant's request goes to) and the `/v1/models` filter. The permission grammar lives in
//! `policy_grammar`; the config load checks `[roles]`, `[tenants]`, `dedicated_to`, `external`
//! and `tenant_pools` (`config::validate`), so the decision here can trust them.
//!
//! "Pool choice" here is which pool serves a tenant's model; which host of that pool takes the
//! request is `dataplane::route`'s.
//!
//! Roles are config; a principal's role names come from the store (the user's roles narrowed
//! by its key's) through the identity cache, which is invalidated whenever a key or user
//! changes. So the permissions are resolved per request: a narrowed key or a removed role
//! takes effect on the next request once the change reached this process.
//!
//! Deny by default: a role the config does not define grants nothing; a model needs both
//! `model:<name>` (or `model:*`) and `inference:<provider>` (or `inference:*`) of the
//! pool chosen for the caller's tenant.

use std::collections::BTreeMap;

pub use crate::permissions::Permissions;
use crate::{auth::Principal, config::Config, error::ApiError};

/// The pool a request of a tenant for a model goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolChoice {
    pub pool: String,
    pub provider: String,
}

/// The pool that serves `model` to `tenant`: a dedicated tenant only its own pool (never the
/// shared one), a local-only tenant never an external pool. `None`: not served to it.
pub fn choose_pool(config: &Config, tenant: &str, model: &str) -> Option<PoolChoice> {
    let m = config.models().get(model)?;
    let t = config.tenants().get(tenant);
    let pool = if t.is_some_and(|t| t.dedicated) {
        m.tenant_pools.get(tenant)?
    } else {
        &m.pool
    };
    let p = config.pools.get(pool)?;
    // Belt and braces: the load refuses configs where these could fail.
    if p.dedicated_to.as_deref().is_some_and(|d| d != tenant) {
        return None;
    }
    if p.external && t.is_some_and(|t| t.local_only) {
        return None;
    }
    Some(PoolChoice {
        pool: pool.clone(),
        provider: p.provider.clone(),
    })
}

/// Why a principal may not use a model, or the pool it goes to. A refusal is recorded in the
/// audit log.
pub fn authorize(
    config: &Config,
    principal: &Principal,
    perms: &Permissions,
    model: &str,
    wants_logprobs: bool,
) -> Result<PoolChoice, ApiError> {
    decide(config, principal, perms, model, wants_logprobs).inspect_err(|_| {
        crate::audit::emit(crate::audit::Event::AuthzDenied {
            permission: format!("model:{model}"),
            user_id: Some(principal.user_id.clone()),
            key_id: principal.key_id.clone(),
            tenant: Some(principal.tenant.clone()),
            plane: "data".into(),
        })
    })
}

fn decide(
    config: &Config,
    principal: &Principal,
    perms: &Permissions,
    model: &str,
    wants_logprobs: bool,
) -> Result<PoolChoice, ApiError> {
    let Some(choice) = choose_pool(config, &principal.tenant, model) else {
        return Err(forbidden(format!(
            "the model `{model}` is not available to your tenant"
        )));
    };
    if !perms.model(model) {
        return Err(forbidden(format!(
            "you lack permission `model:{model}` for this model"
        )));
    }
    if !perms.provider(&choice.provider) {
        return Err(forbidden(format!(
            "you lack permission `inference:{}` for this model's provider",
            choice.provider
        )));
    }
    if wants_logprobs && !perms.logprobs {
        return Err(forbidden(
            "`logprobs`, `top_logprobs` and `logit_bias` need the `logprobs` permission",
        )
        .with_param("logprobs"));
    }
    Ok(choice)
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::forbidden(message).with_code("permission_denied")
}

/// The models a principal may use, with their provider (for `/v1/models`).
pub fn visible_models<'c>(
    config: &'c Config,
    tenant: &str,
    perms: &Permissions,
) -> Vec<(&'c str, PoolChoice)> {
    config
        .models()
        .keys()
        .filter(|m| perms.model(m))
        .filter_map(|m| {
            let r = choose_pool(config, tenant, m)?;
            perms.provider(&r.provider).then_some((m.as_str(), r))
        })
        .collect()
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
    fn tenants_get_their_own_pools() {
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
}
