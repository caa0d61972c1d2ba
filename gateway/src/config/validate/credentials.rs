//! What a pool needs to talk to its hosts: the upstream credential (`api_key_env` or
//! `api_key_file`) and the CAs for TLS (`tls_ca_file`). Both are read when the config loads,
//! through the load's sources. A lenient load (a CLI command that only works on the store)
//! leaves out what it cannot read instead of refusing it.

use std::path::Path;

use super::Invalid;
use crate::config::{PoolConfig, Secret, capture::Reader};

/// The pool's upstream credential, if it names one.
pub(super) fn credential(
    name: &str,
    pool: &PoolConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Secret>, Invalid> {
    let credential = match read_credential(name, pool, base, reader) {
        Ok(c) => c,
        Err(_) if reader.lenient() => None,
        Err(e) => return Err(e),
    };
    // It goes into a header.
    if credential
        .as_ref()
        .is_some_and(|c| c.0.bytes().any(|b| b.is_ascii_control()))
    {
        return Err(Invalid::new(
            format!("pools.{name}.api_key_env"),
            "the credential contains control characters",
        ));
    }
    Ok(credential)
}

fn read_credential(
    name: &str,
    pool: &PoolConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Secret>, Invalid> {
    let key = |k: &str| format!("pools.{name}.{k}");
    Ok(match (&pool.api_key_env, &pool.api_key_file) {
        (Some(_), Some(_)) => {
            return Err(Invalid::new(
                key("api_key_file"),
                "set either `api_key_env` or `api_key_file`, not both",
            ));
        }
        (Some(var), None) => match reader.env(var) {
            Some(v) if !v.trim().is_empty() => Some(Secret(v.trim().to_owned())),
            _ => {
                return Err(Invalid::new(
                    key("api_key_env"),
                    format!("environment variable `{var}` is not set or empty"),
                ));
            }
        },
        (None, Some(file)) => {
            let file = base.join(file);
            let bytes = reader
                .secret_file(&file)
                .and_then(|b| {
                    b.ok_or_else(|| format!("cannot read {}: no such file", file.display()))
                })
                .map_err(|r| Invalid::new(key("api_key_file"), r))?;
            let text = String::from_utf8_lossy(&bytes);
            match text.lines().next().map(str::trim) {
                Some(v) if !v.is_empty() => Some(Secret(v.to_owned())),
                _ => {
                    return Err(Invalid::new(
                        key("api_key_file"),
                        format!("{} is empty", file.display()),
                    ));
                }
            }
        }
        (None, None) => None,
    })
}

/// The CAs (DER) from `tls_ca_file`; `None`: the webpki roots.
pub(super) fn tls_roots(
    name: &str,
    pool: &PoolConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<Vec<Vec<u8>>>, Invalid> {
    let key = format!("pools.{name}.tls_ca_file");
    let roots = match &pool.tls_ca_file {
        None => Ok(None),
        Some(_) if !pool.tls => Err(Invalid::new(&key, "only with `tls = true`")),
        Some(file) => {
            let file = base.join(file);
            reader
                .required_file(&file)
                .and_then(|pem| parse_ca_pem(&file, &pem))
                .map(Some)
                .map_err(|r| Invalid::new(&key, r))
        }
    };
    match roots {
        Err(_) if reader.lenient() => Ok(None),
        roots => roots,
    }
}

/// Parses a PEM bundle of CA certificates (DER out), refusing a file with none.
pub(super) fn parse_ca_pem(path: &Path, pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    let mut out = Vec::new();
    for cert in CertificateDer::pem_slice_iter(pem) {
        let cert = cert.map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
        out.push(cert.to_vec());
    }
    if out.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, tests::load};

    use std::{os::unix::fs::PermissionsExt, path::Path};

    /// A private file, as a secret should be.
    fn secret(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn credential_is_read_from_a_file_and_not_printed() {
        let dir = tempfile::tempdir().unwrap();
        secret(&dir.path().join("key"), "sk-upstream\n");
        let c = Config::from_str(
            &dir.path().join("moat.toml"),
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\napi_key_file = \"key\"\n",
        )
        .unwrap();
        let cred = c.pools["gpu"].credential.as_ref().unwrap();
        assert_eq!(cred.expose(), "sk-upstream");
        assert!(!format!("{c:?}").contains("sk-upstream"));
    }

    /// Every secret file the config names is refused when others can reach it, when it is a
    /// symlink, or when its owner is neither root nor the service user; the error names key,
    /// file and reason.
    #[test]
    fn secret_files_are_checked_for_mode_owner_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let hs = "[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"s\"\n";
        let pool = "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\napi_key_file = \"s\"\n";
        let path = dir.path().join("s");
        let cfg = dir.path().join("moat.toml");
        for (text, key) in [
            (hs, "auth.hs256_secret_file"),
            (pool, "pools.gpu.api_key_file"),
        ] {
            let load = || Config::from_str(&cfg, text);
            secret(&path, &"k".repeat(40));
            assert!(
                load().is_ok(),
                "{key}: a private file owned by root is fine"
            );

            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let e = load().unwrap_err();
            assert_eq!(e.key, key);
            assert_eq!(
                e.reason,
                format!(
                    "{}: has mode 640: a secret file must not be readable or writable by group \
                     or others (chmod 600)",
                    path.display()
                )
            );

            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            // Owned by some other account (the tests run as root, who may give files away).
            std::os::unix::fs::chown(&path, Some(54_321), None).unwrap();
            let e = load().unwrap_err();
            assert_eq!(e.key, key);
            assert_eq!(
                e.reason,
                format!(
                    "{}: is owned by uid 54321: a secret file must be owned by root or the \
                     service user",
                    path.display()
                )
            );
            std::os::unix::fs::chown(&path, Some(0), None).unwrap();

            // A link to a perfectly private file is still refused.
            let target = dir.path().join("target");
            secret(&target, &"k".repeat(40));
            std::fs::remove_file(&path).unwrap();
            std::os::unix::fs::symlink(&target, &path).unwrap();
            let e = load().unwrap_err();
            assert_eq!(e.key, key);
            assert_eq!(
                e.reason,
                format!(
                    "{}: is a symbolic link; a secret file is named by its own path, not a link",
                    path.display()
                )
            );
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn missing_credentials_and_cas_name_the_key() {
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\napi_key_env = \"MOAT_TEST_SURELY_UNSET\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.api_key_env");
        let e = load("[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls_ca_file = \"ca.pem\"\n")
            .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_ca_file");
        assert_eq!(e.reason, "only with `tls = true`");
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\n\
             tls_ca_file = \"/nonexistent/ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_ca_file");
        assert!(e.reason.contains("no such file"), "{e}");
    }

    #[test]
    fn a_ca_file_without_certificates_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let e = Config::from_str(
            &dir.path().join("moat.toml"),
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\ntls_ca_file = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_ca_file");
        assert!(e.reason.ends_with("holds no certificate"), "{e}");
    }
}
