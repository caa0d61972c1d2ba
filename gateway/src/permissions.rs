//! A principal's effective permissions: the union of its roles' permissions as the config
//! defines them, and the comparisons the request path (`dataplane::authz`) and the grant rule
//! of the admin operations (`auth::admin`) make with them. Unknown roles grant nothing.

use std::collections::BTreeSet;

use crate::{
    config::Config,
    policy_grammar::{ADMIN_PERMISSIONS, GLOBAL_PERMISSIONS, Permission},
};

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
            let Some(r) = config.roles().get(role) else {
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

    /// What `wanted` holds that `self` does not, as permission strings (empty: `self` covers
    /// it). A wildcard is covered only by the same wildcard.
    pub fn missing(&self, wanted: &Permissions) -> Vec<String> {
        let mut out = Vec::new();
        if wanted.all_models && !self.all_models {
            out.push("model:*".to_owned());
        }
        out.extend(
            wanted
                .models
                .iter()
                .filter(|m| !self.model(m))
                .map(|m| format!("model:{m}")),
        );
        if wanted.all_providers && !self.all_providers {
            out.push("inference:*".to_owned());
        }
        out.extend(
            wanted
                .providers
                .iter()
                .filter(|p| !self.provider(p))
                .map(|p| format!("inference:{p}")),
        );
        if wanted.logprobs && !self.logprobs {
            out.push("logprobs".to_owned());
        }
        out.extend(wanted.admin.difference(&self.admin).cloned());
        out
    }

    /// The global permissions (see [`GLOBAL_PERMISSIONS`]) among these.
    pub fn global(&self) -> Vec<String> {
        GLOBAL_PERMISSIONS
            .iter()
            .filter(|g| self.admin.contains(**g))
            .map(|g| g.to_string())
            .collect()
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
