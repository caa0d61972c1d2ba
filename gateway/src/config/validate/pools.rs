//! `[pools.*]`: hosts resolved, timeouts and health settings bounded, the credential and CAs
//! read (see [`super::credentials`]), the client certificate checked (see
//! [`super::client_cert`]); out comes the checked [`Pool`].

use std::{collections::BTreeMap, path::Path, time::Duration};

use super::{Invalid, client_cert, credentials};
use crate::config::{
    Ejection, HealthCheck, Pool, PoolConfig, PrefixCacheIsolation, Timeouts, capture::Reader,
};

pub(in crate::config) fn pools(
    pools: &BTreeMap<String, PoolConfig>,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<BTreeMap<String, Pool>, Invalid> {
    pools
        .iter()
        .map(|(name, p)| Ok((name.clone(), pool(name, p, base, reader)?)))
        .collect()
}

fn pool(name: &str, p: &PoolConfig, base: &Path, reader: &Reader<'_>) -> Result<Pool, Invalid> {
    let key = |k: &str| format!("pools.{name}.{k}");
    if p.hosts.is_empty() {
        return Err(Invalid::new(key("hosts"), "a pool needs at least one host"));
    }
    if p.provider.is_empty() {
        return Err(Invalid::new(key("provider"), "must not be empty"));
    }
    let mut addrs = Vec::new();
    let mut host_addrs = Vec::new();
    for (i, host) in p.hosts.iter().enumerate() {
        let host_key = || key(&format!("hosts[{i}]"));
        if p.hosts[..i].contains(host) {
            return Err(Invalid::new(
                host_key(),
                format!("`{host}` is listed twice"),
            ));
        }
        let mut resolved = reader.host(host).map_err(|r| Invalid::new(host_key(), r))?;
        // `[::ffff:a.b.c.d]:port` is the IPv4 host a.b.c.d: the kernel judges it so, and
        // the router connects there either way.
        for a in &mut resolved {
            a.set_ip(a.ip().to_canonical());
        }
        addrs.extend(resolved.iter().copied());
        host_addrs.push(resolved);
    }
    for (k, v) in [
        ("connect_timeout_ms", p.connect_timeout_ms),
        ("first_byte_timeout_ms", p.first_byte_timeout_ms),
        ("idle_timeout_ms", p.idle_timeout_ms),
        ("health_interval_ms", p.health_interval_ms),
        ("health_timeout_ms", p.health_timeout_ms),
        ("eject_after_failures", p.eject_after_failures.into()),
        ("eject_base_ms", p.eject_base_ms),
        ("eject_max_ms", p.eject_max_ms),
        ("max_attempts", p.max_attempts.into()),
    ] {
        if v == 0 {
            return Err(Invalid::new(key(k), "must be at least 1"));
        }
    }
    if p.eject_max_ms < p.eject_base_ms {
        return Err(Invalid::new(
            key("eject_max_ms"),
            "must not be below `eject_base_ms`",
        ));
    }
    if !p.health_path.starts_with('/') {
        return Err(Invalid::new(key("health_path"), "must start with `/`"));
    }
    let prefix_cache_isolation = match p.prefix_cache_isolation.as_str() {
        "tenant" => PrefixCacheIsolation::Tenant,
        "user" => PrefixCacheIsolation::User,
        "off" => PrefixCacheIsolation::Off,
        _ => {
            return Err(Invalid::new(
                key("prefix_cache_isolation"),
                "must be `tenant`, `user` or `off`",
            ));
        }
    };
    let credential = credentials::credential(name, p, base, reader)?;
    let tls_roots = credentials::tls_roots(name, p, base, reader)?;
    let tls_client = client_cert::client_cert(name, p, base, reader)?;
    let ms = Duration::from_millis;
    Ok(Pool {
        name: name.to_owned(),
        provider: p.provider.clone(),
        hosts: p.hosts.clone(),
        addrs,
        host_addrs,
        protect: p.protect,
        external: p.external,
        dedicated_to: p.dedicated_to.clone(),
        credential,
        tls: p.tls,
        tls_roots,
        tls_client,
        timeouts: Timeouts {
            connect: ms(p.connect_timeout_ms),
            first_byte: ms(p.first_byte_timeout_ms),
            idle: ms(p.idle_timeout_ms),
        },
        health: HealthCheck {
            path: p.health_path.clone(),
            interval: ms(p.health_interval_ms),
            timeout: ms(p.health_timeout_ms),
        },
        ejection: Ejection {
            after_failures: p.eject_after_failures,
            base: ms(p.eject_base_ms),
            max: ms(p.eject_max_ms),
        },
        max_attempts: p.max_attempts,
        prefix_cache_isolation,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::tests::load;

    #[test]
    fn pools_resolve() {
        let c = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\", \"[::1]:8001\"]\n\
             [models.m]\npool = \"gpu\"\n",
        )
        .unwrap();
        let p = &c.pools["gpu"];
        assert_eq!(p.addrs.len(), 2);
        assert_eq!(p.host_addrs.len(), 2);
        assert!(p.protect);
        assert_eq!(c.data_dir, Path::new("/var/lib/moat"));
    }

    #[test]
    fn host_without_port_is_refused() {
        let e = load("[pools.gpu]\nhosts = [\"127.0.0.1\"]\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.hosts[0]");
    }

    #[test]
    fn data_plane_defaults_and_limits() {
        let c = load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\n[models.m]\npool = \"gpu\"\n")
            .unwrap();
        let p = &c.pools["gpu"];
        assert_eq!(p.max_attempts, 3);
        assert_eq!(p.health.path, "/v1/models");
        assert_eq!(p.timeouts.first_byte.as_millis(), 120_000);
        assert_eq!(p.ejection.after_failures, 3);
        assert!(!p.tls && !p.external && p.dedicated_to.is_none());
        assert_eq!(c.models()["m"].max_n, 1);
        assert_eq!(c.server().max_body_bytes, 1024 * 1024);
        assert!(p.credential.is_none());
        assert_eq!(
            p.prefix_cache_isolation,
            crate::config::PrefixCacheIsolation::Tenant
        );
        let c =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nprefix_cache_isolation = \"user\"\n")
                .unwrap();
        assert_eq!(
            c.pools["gpu"].prefix_cache_isolation,
            crate::config::PrefixCacheIsolation::User
        );
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nprefix_cache_isolation = \"all\"\n")
                .unwrap_err();
        assert_eq!(e.key, "pools.gpu.prefix_cache_isolation");
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nidle_timeout_ms = 0\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.idle_timeout_ms");
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\", \"127.0.0.1:8000\"]\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.hosts[1]");
    }

    #[test]
    fn settings_are_carried_into_the_checked_pool() {
        let c = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nconnect_timeout_ms = 7\n\
             idle_timeout_ms = 8\nhealth_path = \"/h\"\nhealth_interval_ms = 9\n\
             eject_base_ms = 10\neject_max_ms = 11\nmax_attempts = 2\ntls = true\n\
             protect = false\nprovider = \"x\"\n",
        )
        .unwrap();
        let p = &c.pools["gpu"];
        assert_eq!(p.timeouts.connect.as_millis(), 7);
        assert_eq!(p.timeouts.idle.as_millis(), 8);
        assert_eq!(p.health.path, "/h");
        assert_eq!(p.health.interval.as_millis(), 9);
        assert_eq!(p.ejection.base.as_millis(), 10);
        assert_eq!(p.ejection.max.as_millis(), 11);
        assert_eq!(p.max_attempts, 2);
        assert!(p.tls && !p.protect);
        assert_eq!(p.provider, "x");
        let e = load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\neject_max_ms = 1\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.eject_max_ms");
        let e =
            load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\nhealth_path = \"h\"\n").unwrap_err();
        assert_eq!(e.key, "pools.gpu.health_path");
    }
}
