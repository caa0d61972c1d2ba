//! `[store]`: the engine, its URL (which must not carry a password) and the password, read
//! from a secret file or an environment variable when the config loads (so the worker gets it
//! through the supervisor's capture even when only root can read the file).

use std::path::Path;

use super::Invalid;
use crate::config::{Secret, StoreConfig, StoreKind, capture::Reader};

pub(in crate::config) fn store(
    store: &StoreConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Secret>, Invalid> {
    match store.kind {
        StoreKind::Sqlite => {
            for (set, key) in [
                (store.url.is_some(), "url"),
                (store.password_file.is_some(), "password_file"),
                (store.password_env.is_some(), "password_env"),
            ] {
                if set {
                    return Err(Invalid::new(
                        format!("store.{key}"),
                        "only for `kind = \"postgres\"` (SQLite lives in the data directory)",
                    ));
                }
            }
            return Ok(None);
        }
        StoreKind::Postgres => {}
    }
    let Some(url) = &store.url else {
        return Err(Invalid::new(
            "store.url",
            "`kind = \"postgres\"` needs `url = \"postgres://user@host:port/database\"`",
        ));
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
    let password = match (&store.password_file, &store.password_env) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                "store.password_file",
                "set either `password_file` or `password_env`, not both",
            ));
        }
        (Some(file), None) => {
            let path = base.join(file);
            let bytes = reader
                .secret_file(&path)
                .map_err(|r| Invalid::new("store.password_file", r))?
                .ok_or_else(|| {
                    Invalid::new(
                        "store.password_file",
                        format!("cannot read {}: no such file", path.display()),
                    )
                })?;
            let text = String::from_utf8(bytes).map_err(|_| {
                Invalid::new(
                    "store.password_file",
                    format!("{} is not UTF-8", path.display()),
                )
            })?;
            let first = text.lines().next().unwrap_or("").trim_end_matches('\r');
            if first.is_empty() {
                return Err(Invalid::new(
                    "store.password_file",
                    format!("{} is empty", path.display()),
                ));
            }
            Some(Secret(first.to_owned()))
        }
        (None, Some(var)) => match reader.env(var) {
            Some(v) if !v.is_empty() => Some(Secret(v)),
            _ => {
                return Err(Invalid::new(
                    "store.password_env",
                    format!("environment variable `{var}` is not set or empty"),
                ));
            }
        },
        // Trust or peer authentication on the server's side.
        (None, None) => None,
    };
    Ok(password)
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
