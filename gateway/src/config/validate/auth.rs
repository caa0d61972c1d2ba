//! `[auth]`: token lifetimes, rotation, caches and throttling bounded; the HS256 secret file
//! read (so the worker gets it even when only root can read it, and a short secret is refused
//! at load rather than by the worker later).

use std::path::Path;

use super::Invalid;
use crate::{
    config::{AuthConfig, capture::Reader},
    config::{MAX_LEEWAY_SECS, MAX_LIFETIME_SECS, SigningAlgorithm},
};

pub(in crate::config) fn auth(
    auth: &AuthConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<(), Invalid> {
    bounds(auth)?;
    // A missing file is created with 32 random bytes by the identity store on first start.
    if let Some(p) = &auth.hs256_secret_file {
        let path = base.join(p);
        let secret = reader
            .secret_file(&path)
            .map_err(|r| Invalid::new("auth.hs256_secret_file", r))?;
        if let Some(secret) = secret.filter(|s| s.len() < 32) {
            return Err(Invalid::new(
                "auth.hs256_secret_file",
                format!(
                    "{} holds {} bytes; an HS256 secret needs at least 32 bytes",
                    path.display(),
                    secret.len()
                ),
            ));
        }
    }
    Ok(())
}

/// The problem with `auth.<key>`.
fn bad(key: &str, reason: impl Into<String>) -> Invalid {
    Invalid::new(format!("auth.{key}"), reason)
}

fn bounds(auth: &AuthConfig) -> Result<(), Invalid> {
    if auth.issuer.is_empty() {
        return Err(bad("issuer", "must not be empty"));
    }
    if auth.audience.is_empty() {
        return Err(bad("audience", "must not be empty"));
    }
    if !(30..=MAX_LIFETIME_SECS).contains(&auth.access_token_ttl_secs) {
        return Err(bad(
            "access_token_ttl_secs",
            format!("must be between 30 and {MAX_LIFETIME_SECS} (15 minutes)"),
        ));
    }
    if auth.leeway_secs > MAX_LEEWAY_SECS {
        return Err(bad(
            "leeway_secs",
            format!("must be at most {MAX_LEEWAY_SECS}"),
        ));
    }
    if auth.refresh_idle_ttl_secs < 60 {
        return Err(bad("refresh_idle_ttl_secs", "must be at least 60"));
    }
    if auth.refresh_reuse_grace_secs > 60 {
        return Err(bad("refresh_reuse_grace_secs", "must be at most 60"));
    }
    for (i, p) in auth.trusted_proxies.iter().enumerate() {
        crate::config::parse_proxy(p).map_err(|r| bad(&format!("trusted_proxies[{i}]"), r))?;
    }
    if auth.refresh_absolute_ttl_secs < auth.refresh_idle_ttl_secs {
        return Err(bad(
            "refresh_absolute_ttl_secs",
            "must not be shorter than refresh_idle_ttl_secs",
        ));
    }
    let min_overlap = auth.access_token_ttl_secs + auth.leeway_secs;
    if auth.signing_key_overlap_secs < min_overlap {
        return Err(bad(
            "signing_key_overlap_secs",
            format!(
                "must be at least access_token_ttl_secs + leeway_secs ({min_overlap}) so a \
                 rotation never cuts a live token short"
            ),
        ));
    }
    if auth.signing_key_rotation_secs < auth.signing_key_overlap_secs {
        return Err(bad(
            "signing_key_rotation_secs",
            "must not be shorter than signing_key_overlap_secs",
        ));
    }
    if !(1..=300).contains(&auth.cache_ttl_secs) {
        return Err(bad("cache_ttl_secs", "must be between 1 and 300"));
    }
    if auth.cache_capacity == 0 {
        return Err(bad("cache_capacity", "must be at least 1"));
    }
    if !(50..=10_000).contains(&auth.revocation_poll_ms) {
        return Err(bad("revocation_poll_ms", "must be between 50 and 10000"));
    }
    if auth.password_max_failures_per_user == 0 {
        return Err(bad("password_max_failures_per_user", "must be at least 1"));
    }
    if auth.password_max_failures_per_source == 0 {
        return Err(bad(
            "password_max_failures_per_source",
            "must be at least 1",
        ));
    }
    if auth.hs256_secret_file.is_some() && auth.algorithm != SigningAlgorithm::HS256 {
        return Err(bad(
            "hs256_secret_file",
            "only used with algorithm = \"HS256\"",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::load};

    #[test]
    fn auth_defaults_and_bounds() {
        let c = load("").unwrap();
        assert_eq!(c.auth().access_token_ttl_secs, 300);
        assert_eq!(c.auth().leeway_secs, 5);
        let e = load("[auth]\naccess_token_ttl_secs = 901\n").unwrap_err();
        assert_eq!(e.key, "auth.access_token_ttl_secs");
        let e = load("[auth]\nleeway_secs = 31\n").unwrap_err();
        assert_eq!(e.key, "auth.leeway_secs");
        let e = load("[auth]\nrefresh_idle_ttl_secs = 7200\nrefresh_absolute_ttl_secs = 3600\n")
            .unwrap_err();
        assert_eq!(e.key, "auth.refresh_absolute_ttl_secs");
        let e = load("[auth]\nsigning_key_overlap_secs = 60\n").unwrap_err();
        assert_eq!(e.key, "auth.signing_key_overlap_secs");
        let e = load("[auth]\nalgorithm = \"RS256\"\n").unwrap_err();
        assert_eq!(e.key, "auth.algorithm");
        let e = load("[auth]\nhs256_secret_file = \"k\"\n").unwrap_err();
        assert_eq!(e.key, "auth.hs256_secret_file");
        let e = load("[auth]\nbogus = 1\n").unwrap_err();
        assert!(e.key.starts_with("auth"), "{e}");
        assert!(e.reason.contains("bogus"), "{e}");
        assert!(load("[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"k\"\n").is_ok());
    }

    #[test]
    fn refresh_grace_and_trusted_proxies() {
        let c = load("").unwrap();
        assert_eq!(c.auth().refresh_reuse_grace_secs, 5);
        assert!(c.auth().trusted_proxies.is_empty());
        assert!(load("[auth]\nrefresh_reuse_grace_secs = 0\n").is_ok());
        let e = load("[auth]\nrefresh_reuse_grace_secs = 61\n").unwrap_err();
        assert_eq!(e.key, "auth.refresh_reuse_grace_secs");
        assert!(load("[auth]\ntrusted_proxies = [\"10.0.0.0/8\", \"::1\"]\n").is_ok());
        let e = load("[auth]\ntrusted_proxies = [\"10.0.0.0/8\", \"lb.local\"]\n").unwrap_err();
        assert_eq!(e.key, "auth.trusted_proxies[1]");
        assert!(
            e.reason.contains("`lb.local` is not an IP address or CIDR"),
            "{e}"
        );
    }

    #[test]
    fn a_short_hs256_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), "short").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(dir.path().join("k"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        let e = Config::from_str(
            &dir.path().join("moat.toml"),
            "[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"k\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "auth.hs256_secret_file");
        assert!(
            e.reason
                .ends_with("an HS256 secret needs at least 32 bytes"),
            "{e}"
        );
    }
}
