//! The `cache_salt` of a generation request: vLLM keeps one KV prefix cache per salt, so two
//! requests only share cached prefixes when they carry the same salt. A shared prefix cache
//! leaks across whoever shares it (a cache hit answers measurably faster, which reveals that
//! someone else sent the same prefix), so the gateway owns the field: a client's own
//! `cache_salt` is refused (see `openai::validate`), and the pool's `prefix_cache_isolation`
//! decides the scope of the salt set here — per tenant (default), per user, or none.
//!
//! The salt is an HMAC under the server pepper (`auth::secrets::Pepper`), so it is stable
//! across restarts and workers (a tenant keeps its own cache hits) but cannot be guessed or
//! forged from a tenant or user name. 22 base64url characters (132 bits): short, and an
//! alphabet no inference server chokes on.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};

use crate::{auth::Principal, auth::secrets::Pepper, config::PrefixCacheIsolation};

/// Domain separation: this MAC can never equal a key or token hash made with the same pepper.
const DOMAIN: &str = "moat/cache_salt/v1";
/// Characters of the salt: 132 bits of the MAC.
const SALT_CHARS: usize = 22;

/// The salt for `p`'s requests to a pool with `isolation`, or `None` when the pool sets none.
pub fn salt(pepper: &Pepper, isolation: PrefixCacheIsolation, p: &Principal) -> Option<String> {
    let mac = match isolation {
        PrefixCacheIsolation::Off => return None,
        PrefixCacheIsolation::Tenant => pepper.mac(DOMAIN, &[b"tenant", p.tenant.as_bytes()]),
        PrefixCacheIsolation::User => pepper.mac(
            DOMAIN,
            &[b"user", p.tenant.as_bytes(), p.user_id.as_bytes()],
        ),
    };
    let mut s = URL_SAFE_NO_PAD.encode(mac);
    s.truncate(SALT_CHARS);
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::AuthMethod;

    fn p(tenant: &str, user: &str) -> Principal {
        Principal {
            user_id: user.into(),
            username: user.into(),
            tenant: tenant.into(),
            key_id: None,
            session_id: None,
            roles: vec![],
            method: AuthMethod::ApiKey,
        }
    }

    #[test]
    fn salts_separate_tenants_and_users_as_configured() {
        let pepper = Pepper::from_bytes([7; 32]);
        let s = |i, t, u| salt(&pepper, i, &p(t, u));
        use PrefixCacheIsolation::*;
        let a = s(Tenant, "acme", "u1").unwrap();
        assert_eq!(a.len(), SALT_CHARS);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
            "{a}"
        );
        assert_eq!(a, s(Tenant, "acme", "u2").unwrap(), "one tenant, one salt");
        assert_ne!(a, s(Tenant, "beta", "u1").unwrap(), "tenants differ");
        let u = s(User, "acme", "u1").unwrap();
        assert_ne!(u, s(User, "acme", "u2").unwrap(), "users differ");
        assert_ne!(u, a, "the user salt is not the tenant salt");
        assert_eq!(s(Off, "acme", "u1"), None);
        // Another server (pepper) gives other salts.
        let other = Pepper::from_bytes([8; 32]);
        assert_ne!(salt(&other, Tenant, &p("acme", "u1")).unwrap(), a);
    }
}
