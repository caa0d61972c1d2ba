//! `[store]` and the secrets of the shared backends: the engine, its URL (which must not carry
//! a password), its TLS mode and CAs, and the PostgreSQL and Redis passwords, read from a
//! secret file or an environment variable when the config loads (so the worker gets them
//! through the supervisor's capture even when only root can read the file).

use std::path::Path;

use super::{Invalid, credentials::parse_ca_pem};
use crate::config::{QuotaBackendKind, RawConfig, Secret, StoreKind, capture::Reader};

/// What the shared backends need beside their URLs.
pub(in crate::config) struct BackendSecrets {
    pub store_password: Option<Secret>,
    pub store_ca: Option<Vec<Vec<u8>>>,
    pub redis_password: Option<Secret>,
}

pub(in crate::config) fn store(
    raw: &RawConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<BackendSecrets, Invalid> {
    let redis_password = redis_password(raw, base, reader)?;
    let store = &raw.store;
    match store.kind {
        StoreKind::Sqlite => {
            for (set, key) in [
                (store.url.is_some(), "url"),
                (store.password_file.is_some(), "password_file"),
                (store.password_env.is_some(), "password_env"),
                (store.ca_file.is_some(), "ca_file"),
            ] {
                if set {
                    return Err(Invalid::new(
                        format!("store.{key}"),
                        "only for `kind = \"postgres\"` (SQLite lives in the data directory)",
                    ));
                }
            }
            return Ok(BackendSecrets {
                store_password: None,
                store_ca: None,
                redis_password,
            });
        }
        StoreKind::Postgres => {}
    }
    let Some(url) = &store.url else {
        return Err(Invalid::new(
            "store.url",
            "`kind = \"postgres\"` needs `url = \"postgres://user@host:port/database\"`",
        ));
    };
    let tls = match pg_tls(url) {
        PgTls::Refused(reason) => return Err(Invalid::new("store.url", reason)),
        PgTls::Require => true,
        PgTls::Plain => false,
    };
    let parsed: tokio_postgres::Config = url
        .parse()
        .map_err(|e| Invalid::new("store.url", format!("not a PostgreSQL URL: {e}")))?;
    if parsed.get_password().is_some() {
        return Err(Invalid::new(
            "store.url",
            "the URL carries a password; put it in `password_file` or `password_env` instead",
        ));
    }
    if parsed.get_hosts().is_empty() {
        return Err(Invalid::new("store.url", "the URL names no host"));
    }
    if store.pool_size == Some(0) {
        return Err(Invalid::new("store.pool_size", "must be at least 1"));
    }
    let store_ca = match &store.ca_file {
        None => None,
        Some(_) if !tls => {
            return Err(Invalid::new(
                "store.ca_file",
                "only with `sslmode=require` in the url",
            ));
        }
        Some(file) => {
            let file = base.join(file);
            let roots = reader
                .required_file(&file)
                .and_then(|pem| parse_ca_pem(&file, &pem))
                .map_err(|r| Invalid::new("store.ca_file", r));
            match roots {
                // `config check` without root: the worker's load reads it.
                Err(_) if reader.lenient() => None,
                roots => Some(roots?),
            }
        }
    };
    let store_password = secret(
        store.password_file.as_deref(),
        store.password_env.as_deref(),
        ("store.password_file", "store.password_env"),
        base,
        reader,
    )?;
    Ok(BackendSecrets {
        store_password,
        store_ca,
        redis_password,
    })
}

/// How moat speaks to PostgreSQL, from the URL's `sslmode`.
#[derive(Debug, PartialEq, Eq)]
pub enum PgTls {
    /// No `sslmode`, or `disable`: plain TCP or a Unix socket.
    Plain,
    /// `require`: TLS, with the server's certificate verified (name and chain), which is
    /// stricter than libpq's `require`.
    Require,
    /// `prefer` and `allow` fall back to plain text without a word, and the `verify-*` modes
    /// are spelt `require` here.
    Refused(String),
}

/// Reads `sslmode` from either URL form (`postgres://…?sslmode=` or `key=value …`).
pub fn pg_tls(url: &str) -> PgTls {
    let mode = url
        .split(['?', '&', ' '])
        .find_map(|part| part.trim().strip_prefix("sslmode="));
    match mode {
        None | Some("disable") => PgTls::Plain,
        Some("require") => PgTls::Require,
        Some(m @ ("prefer" | "allow")) => PgTls::Refused(format!(
            "`sslmode={m}` may fall back to plain text unnoticed; say `sslmode=require` (TLS, \
             certificate verified) or leave sslmode out (plain: a Unix socket or a private link)"
        )),
        Some(m @ ("verify-ca" | "verify-full")) => PgTls::Refused(format!(
            "`sslmode={m}`: write `sslmode=require`, which moat always verifies like verify-full \
             (the chain against `ca_file` or the webpki roots, and the host name)"
        )),
        Some(m) => PgTls::Refused(format!("unknown `sslmode={m}`")),
    }
}

/// `[quotas] redis_password_file` / `redis_password_env`, only beside `backend = "redis"`.
fn redis_password(
    raw: &RawConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Secret>, Invalid> {
    let q = &raw.quotas;
    if q.backend != QuotaBackendKind::Redis {
        for (set, key) in [
            (q.redis_password_file.is_some(), "redis_password_file"),
            (q.redis_password_env.is_some(), "redis_password_env"),
        ] {
            if set {
                return Err(Invalid::new(
                    format!("quotas.{key}"),
                    "only for `backend = \"redis\"`",
                ));
            }
        }
        return Ok(None);
    }
    secret(
        q.redis_password_file.as_deref(),
        q.redis_password_env.as_deref(),
        ("quotas.redis_password_file", "quotas.redis_password_env"),
        base,
        reader,
    )
}

/// A password from the first line of a secret file or from an environment variable (one of
/// the two, or neither: the server trusts the connection).
fn secret(
    file: Option<&Path>,
    env: Option<&str>,
    (file_key, env_key): (&str, &str),
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Secret>, Invalid> {
    Ok(match (file, env) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                file_key,
                format!("set either `{file_key}` or `{env_key}`, not both"),
            ));
        }
        (Some(file), None) => {
            Some(first_line(&base.join(file), reader).map_err(|r| Invalid::new(file_key, r))?)
        }
        (None, Some(var)) => match reader.env(var) {
            Some(v) if !v.is_empty() => Some(Secret(v)),
            _ => {
                return Err(Invalid::new(
                    env_key,
                    format!("environment variable `{var}` is not set or empty"),
                ));
            }
        },
        (None, None) => None,
    })
}

fn first_line(path: &Path, reader: &Reader<'_>) -> Result<Secret, String> {
    let bytes = reader.required_secret_file(path)?;
    let text = String::from_utf8(bytes).map_err(|_| format!("{} is not UTF-8", path.display()))?;
    let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
    if first.is_empty() {
        return Err(format!("{} is empty", path.display()));
    }
    Ok(Secret(first.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    fn refused(text: &str) -> (String, String) {
        let e = Config::from_str(Path::new("/nonexistent/moat.toml"), text).unwrap_err();
        (e.key, e.reason)
    }

    #[test]
    fn store_and_quota_backends_are_checked_at_load() {
        let (key, reason) =
            refused("[store]\nkind = \"postgres\"\nurl = \"postgres://moat:hunter2@db/moat\"\n");
        assert_eq!(key, "store.url");
        assert!(reason.contains("password"), "{reason}");
        assert!(!reason.contains("hunter2"), "the refusal repeats no secret");
        assert_eq!(refused("[store]\nkind = \"postgres\"\n").0, "store.url");
        assert_eq!(
            refused("[store]\nurl = \"postgres://moat@db/moat\"\n").0,
            "store.url",
            "a URL without kind = postgres"
        );
        assert_eq!(
            refused(
                "[store]\nkind = \"postgres\"\nurl = \"postgres://moat@db/moat\"\n\
                 password_env = \"MOAT_TEST_UNSET_VARIABLE\"\n"
            )
            .0,
            "store.password_env"
        );
        assert_eq!(
            refused("[quotas]\nbackend = \"redis\"\n").0,
            "quotas.redis_url"
        );
        let (key, reason) =
            refused("[quotas]\nbackend = \"redis\"\nredis_url = \"redis://:pw@cache:6379/\"\n");
        assert_eq!(key, "quotas.redis_url");
        assert!(reason.contains("password"), "{reason}");
        assert_eq!(
            refused("[quotas]\nredis_url = \"redis://cache:6379/\"\n").0,
            "quotas.redis_url"
        );
        let redis = "[quotas]\nbackend = \"redis\"\nredis_url = \"redis://cache:6379/\"\n";
        for bad in [0, 2, 3601] {
            let (key, reason) = refused(&format!("{redis}redis_lease_secs = {bad}\n"));
            assert_eq!(key, "quotas.redis_lease_secs");
            assert!(reason.contains("between 3 and 3600"), "{reason}");
        }
        assert_eq!(
            refused("[quotas]\nredis_lease_secs = 30\n").0,
            "quotas.redis_lease_secs"
        );
        let pg = "[store]\nkind = \"postgres\"\nurl = \"postgres://moat@db/moat";
        for mode in ["prefer", "allow", "verify-full", "bogus"] {
            let (key, reason) = refused(&format!("{pg}?sslmode={mode}\"\n"));
            assert_eq!(key, "store.url", "sslmode={mode}");
            assert!(reason.contains(&format!("sslmode={mode}")), "{reason}");
        }
        assert_eq!(
            refused(&format!("{pg}\"\nca_file = \"ca.pem\"\n")).0,
            "store.ca_file",
            "a CA without sslmode=require"
        );
        assert_eq!(
            refused("[store]\nca_file = \"ca.pem\"\n").0,
            "store.ca_file",
            "a CA for SQLite"
        );
        assert_eq!(
            refused(&format!(
                "{pg}?sslmode=require\"\nca_file = \"/nonexistent/ca.pem\"\n"
            ))
            .0,
            "store.ca_file"
        );
        assert_eq!(
            refused("[quotas]\nredis_password_env = \"X\"\n").0,
            "quotas.redis_password_env",
            "a Redis password without backend = redis"
        );
        let (key, reason) = refused(&format!(
            "{redis}redis_password_file = \"pw\"\nredis_password_env = \"X\"\n"
        ));
        assert_eq!(key, "quotas.redis_password_file");
        assert!(reason.contains("not both"), "{reason}");
        assert_eq!(
            refused(&format!(
                "{redis}redis_password_file = \"/nonexistent/pw\"\n"
            ))
            .0,
            "quotas.redis_password_file"
        );
        assert_eq!(
            super::pg_tls("host=db user=moat sslmode=require"),
            super::PgTls::Require,
            "the key=value form"
        );
        assert_eq!(
            super::pg_tls("postgres://moat@db/moat?sslmode=disable"),
            super::PgTls::Plain
        );
        let ok = Config::from_str(
            Path::new("/nonexistent/moat.toml"),
            "[store]\nkind = \"postgres\"\nurl = \"postgres://moat@db/moat\"\n\
             [quotas]\nbackend = \"redis\"\nredis_url = \"redis://cache:6379/\"\n\
             on_backend_error = \"local\"\nredis_lease_secs = 5\n",
        )
        .unwrap();
        assert!(ok.store_password.is_none());
        assert_eq!(ok.quotas().redis_lease(), std::time::Duration::from_secs(5));
    }
}
