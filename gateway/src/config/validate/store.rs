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
