//! A pool's client certificate (`tls_client_cert_file`, `tls_client_key_file`): what the
//! gateway presents to model servers that require one (mutual TLS), so an inference host can
//! tell the gateway from a host that merely borrowed its address.
//!
//! Both files are read when the config loads (the key as a secret file) and captured for the
//! worker, which cannot read root-only files; a reload reads them again, which is how a
//! certificate is rotated. Refused at load: one file without the other, either without
//! `tls = true`, a file that does not parse, and a key that is not the certificate's. An
//! expired (or not yet valid) certificate is not refused: the gateway's clock is not the
//! judge, the model server is; it is logged when the pool's client is built and `moat doctor`
//! warns 30 days ahead.

use std::{path::Path, sync::Arc};

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::Invalid;
use crate::config::{ClientCert, PoolConfig, capture::Reader};

pub(super) fn client_cert(
    name: &str,
    pool: &PoolConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<ClientCert>, Invalid> {
    match read(name, pool, base, reader) {
        Err(_) if reader.lenient() => Ok(None),
        r => r,
    }
}

fn read(
    name: &str,
    pool: &PoolConfig,
    base: &Path,
    reader: &Reader<'_>,
) -> Result<Option<ClientCert>, Invalid> {
    let key = |k: &str| format!("pools.{name}.{k}");
    let (cert_file, key_file) = match (&pool.tls_client_cert_file, &pool.tls_client_key_file) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(Invalid::new(
                key("tls_client_key_file"),
                "needed with `tls_client_cert_file`",
            ));
        }
        (None, Some(_)) => {
            return Err(Invalid::new(
                key("tls_client_cert_file"),
                "needed with `tls_client_key_file`",
            ));
        }
        (Some(c), Some(k)) => (base.join(c), base.join(k)),
    };
    if !pool.tls {
        return Err(Invalid::new(
            key("tls_client_cert_file"),
            "only with `tls = true`",
        ));
    }
    let bad_cert = |r: String| Invalid::new(key("tls_client_cert_file"), r);
    let bad_key = |r: String| Invalid::new(key("tls_client_key_file"), r);
    let pem = reader.required_file(&cert_file).map_err(bad_cert)?;
    let chain = parse_chain(&cert_file, &pem).map_err(bad_cert)?;
    let (not_before, not_after) = validity(&cert_file, &chain[0]).map_err(bad_cert)?;
    let pem = zeroize::Zeroizing::new(reader.required_secret_file(&key_file).map_err(bad_key)?);
    let private = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        bad_key(format!(
            "{}: no usable private key (PEM PKCS#8, PKCS#1 or SEC1): {e}",
            key_file.display()
        ))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        rustls::sign::CertifiedKey::from_der(chain, private, &provider).map_err(|e| {
            let why = match e {
                rustls::Error::InconsistentKeys(_) => format!(
                    "{} is not the key of {}",
                    key_file.display(),
                    cert_file.display()
                ),
                e => format!("{}: unusable key: {e}", key_file.display()),
            };
            bad_key(why)
        })?;
    Ok(Some(ClientCert {
        cert_file,
        key: Arc::new(certified),
        not_before,
        not_after,
    }))
}

/// The PEM certificates of `path`, leaf first; a file with none is refused.
fn parse_chain(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: bad PEM: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(chain)
}

/// The leaf's notBefore and notAfter (Unix seconds).
fn validity(path: &Path, leaf: &CertificateDer<'_>) -> Result<(i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    let v = cert.validity();
    Ok((v.not_before.timestamp(), v.not_after.timestamp()))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, path::Path};

    use crate::config::{Config, ConfigError};

    /// A self-signed client certificate and its key, as PEM.
    fn pair() -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["gateway".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn load_with(dir: &Path, cert: &str, key: &str, extra: &str) -> Result<Config, ConfigError> {
        std::fs::write(dir.join("client.pem"), cert).unwrap();
        std::fs::write(dir.join("client.key"), key).unwrap();
        std::fs::set_permissions(
            dir.join("client.key"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        Config::from_str(
            &dir.join("moat.toml"),
            &format!(
                "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\n\
                 tls_client_cert_file = \"client.pem\"\ntls_client_key_file = \"client.key\"\n{extra}"
            ),
        )
    }

    #[test]
    fn a_matching_pair_is_read_and_its_key_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let c = load_with(dir.path(), &cert, &key, "").unwrap();
        let tc = c.pools["gpu"].tls_client.as_ref().unwrap();
        assert_eq!(tc.cert_file, dir.path().join("client.pem"));
        assert!(tc.not_after > tc.not_before);
        assert!(c.captured.file(&dir.path().join("client.key")).is_some());
        let body = key.lines().nth(1).unwrap();
        assert!(!format!("{c:?}").contains(body));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused_naming_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = pair();
        let (_, other_key) = pair();
        let e = load_with(dir.path(), &cert, &other_key, "").unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_key_file");
        assert!(
            e.reason.contains("client.key is not the key of") && e.reason.contains("client.pem"),
            "{e}"
        );
    }

    #[test]
    fn unparsable_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        let e = load_with(dir.path(), "junk\n", &key, "").unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_cert_file");
        assert!(e.reason.ends_with("holds no certificate"), "{e}");
        let e = load_with(dir.path(), &cert, "junk\n", "").unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_key_file");
        assert!(e.reason.contains("no usable private key"), "{e}");
    }

    #[test]
    fn a_world_readable_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair();
        std::fs::write(dir.path().join("client.pem"), &cert).unwrap();
        std::fs::write(dir.path().join("client.key"), &key).unwrap();
        std::fs::set_permissions(
            dir.path().join("client.key"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let e = Config::from_str(
            &dir.path().join("moat.toml"),
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\n\
             tls_client_cert_file = \"client.pem\"\ntls_client_key_file = \"client.key\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_key_file");
        assert!(e.reason.contains("chmod 600"), "{e}");
    }

    #[test]
    fn half_a_pair_or_no_tls_is_refused() {
        let load = crate::config::tests::load;
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\ntls_client_cert_file = \"c\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_key_file");
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\ntls = true\ntls_client_key_file = \"k\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_cert_file");
        let e = load(
            "[pools.gpu]\nhosts = [\"127.0.0.1:8000\"]\n\
             tls_client_cert_file = \"c\"\ntls_client_key_file = \"k\"\n",
        )
        .unwrap_err();
        assert_eq!(e.key, "pools.gpu.tls_client_cert_file");
        assert_eq!(e.reason, "only with `tls = true`");
    }
}
