//! The words of the access policy: permission strings (`model:*`, `inference:local`, …) and
//! the names of roles and tenants.
//!
//! Pure grammar, with no config or store behind it, so that the config check, the
//! authorization decision (`dataplane::authz`) and the admin operations (`auth::admin`) share
//! one definition without depending on each other.

use anyhow::bail;

/// Admin permissions (for the admin plane).
pub const ADMIN_PERMISSIONS: &[&str] = &[
    "admin:keys",
    "admin:users",
    "admin:tenants",
    "admin:policy",
    "audit:read",
];

/// Admin permissions that reach beyond the caller's own tenant (every tenant's list, the
/// kernel's counters). Only the root CLI hands them out: the admin plane never grants them,
/// not even to a caller that holds them (`auth::admin`).
pub const GLOBAL_PERMISSIONS: &[&str] = &["admin:tenants", "audit:read"];

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

/// Tenant and user names: 1–64 of `A–Z a–z 0–9 . _ @ -`, starting with a letter or digit.
pub fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._@-".contains(&b));
    if !ok {
        bail!("{what} `{name}`: use 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit");
    }
    Ok(())
}

/// Role names: 1–64 of `a–z 0–9 . _ : * -`.
pub fn check_role(role: &str) -> anyhow::Result<()> {
    let ok = (1..=64).contains(&role.len())
        && role
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._:*-".contains(&b));
    if !ok {
        bail!("role `{role}`: use 1-64 of a-z 0-9 . _ : * -");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_parse_with_wildcards() {
        assert_eq!(Permission::parse("model:*"), Ok(Permission::Model(None)));
        assert_eq!(
            Permission::parse("inference:local"),
            Ok(Permission::Inference(Some("local".into())))
        );
        assert_eq!(Permission::parse("logprobs"), Ok(Permission::Logprobs));
        assert_eq!(
            Permission::parse("admin:*"),
            Ok(Permission::Admin("admin:*".into()))
        );
        for bad in ["model:", "root", "admin:root", "inference"] {
            let e = Permission::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    #[test]
    fn names_and_roles_follow_their_grammar() {
        assert!(check_name("tenant", "acme-1.eu@x_y").is_ok());
        assert!(check_name("tenant", "-acme").is_err());
        assert!(check_name("tenant", "").is_err());
        assert!(check_name("tenant", &"a".repeat(65)).is_err());
        assert!(check_role("model:*-reader").is_ok());
        assert!(check_role("Admin").is_err());
    }
}
