//! `moat certs init`: the material for mutual TLS between the gateway and its model servers,
//! made with `rcgen` — a small private CA, the gateway's client certificate and one server
//! certificate per inference host (its name or address as the SAN).
//!
//! The CA key is only needed to issue more certificates: it stays in the output folder (mode
//! 0700), never on a model server nor in the gateway's config. Keys are written 0600,
//! certificates 0644; nothing is overwritten. Printed: the config lines for the gateway and the
//! flags for vLLM/SGLang.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::{DirBuilderExt, OpenOptionsExt},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use time::{Duration, OffsetDateTime};

#[derive(clap::Subcommand, Debug)]
pub enum CertsCommand {
    /// Make a private CA, the gateway's client certificate and server certificates for the
    /// inference hosts, and print the config lines and model-server flags to use.
    Init {
        /// Folder to write into (created with mode 0700; existing files are never replaced).
        #[arg(long)]
        out: PathBuf,
        /// An inference host's name or IP address, as the gateway's `hosts` name it (repeat
        /// for each host).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// The pool name used in the printed config lines.
        #[arg(long, default_value = "gpu")]
        pool: String,
        /// Lifetime of the client and server certificates.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Lifetime of the CA.
        #[arg(long, default_value_t = 3650)]
        ca_days: u32,
    },
}

pub fn run(command: CertsCommand) -> Result<()> {
    let CertsCommand::Init {
        out,
        hosts,
        pool,
        days,
        ca_days,
    } = command;
    let material = generate(&hosts, days, ca_days)?;
    let out = std::path::absolute(&out).unwrap_or(out);
    let written = write(&out, &material)?;
    print!("{}", instructions(&out, &pool, &material, &written));
    Ok(())
}

/// A certificate and its private key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// What `certs init` makes.
pub struct Material {
    pub ca: Pair,
    pub client: Pair,
    /// By host, in the order given.
    pub servers: Vec<(String, Pair)>,
}

/// Issues the CA, the client certificate (`clientAuth`) and the server certificates
/// (`serverAuth`, the host as SAN). ECDSA P-256 keys.
pub fn generate(hosts: &[String], days: u32, ca_days: u32) -> Result<Material> {
    if hosts.is_empty() {
        bail!("name at least one inference host (--host)");
    }
    let now = OffsetDateTime::now_utc();
    // A little slack for hosts whose clocks run behind.
    let not_before = now - Duration::minutes(5);
    let until = |d: u32| now + Duration::days(d.into());

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    // A name of its own: verifiers find a certificate's issuer by name, so two CAs made by
    // two runs must not share one (a certificate of the other would read as a bad signature,
    // not as an unknown CA).
    ca.distinguished_name.push(
        DnType::CommonName,
        format!("moat private CA {}", crate::auth::secrets::random_base62(8)),
    );
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (ca.not_before, ca.not_after) = (not_before, until(ca_days));
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, &ca_key);

    let leaf = |cn: &str, sans: Vec<String>, eku: ExtendedKeyUsagePurpose| -> Result<Pair> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(sans)
            .with_context(|| format!("`{cn}` is not a usable host name or address"))?;
        p.distinguished_name.push(DnType::CommonName, cn);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![eku];
        p.use_authority_key_identifier_extension = true;
        (p.not_before, p.not_after) = (not_before, until(days));
        let cert = p.signed_by(&key, &issuer)?;
        Ok(Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        })
    };
    let client = leaf(
        "moat gateway",
        Vec::new(),
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let servers = hosts
        .iter()
        .map(|h| {
            let pair = leaf(h, vec![h.clone()], ExtendedKeyUsagePurpose::ServerAuth)?;
            Ok((h.clone(), pair))
        })
        .collect::<Result<_>>()?;
    Ok(Material {
        ca: Pair {
            cert: ca_cert.pem(),
            key: ca_key.serialize_pem(),
        },
        client,
        servers,
    })
}

/// The files of one host's server certificate: `server-<host>.pem` / `.key`.
fn server_stem(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("server-{safe}")
}

/// The files written, by role.
pub struct Written {
    pub ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// Host → (certificate, key).
    pub servers: Vec<(String, PathBuf, PathBuf)>,
}

/// Writes everything into `dir`, refusing to replace any file.
pub fn write(dir: &Path, m: &Material) -> Result<Written> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let put = |name: &str, text: &str, mode: u32| -> Result<PathBuf> {
        let path = dir.join(name);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        Ok(path)
    };
    let (public, secret) = (0o644, 0o600);
    let ca = put("ca.pem", &m.ca.cert, public)?;
    put("ca.key", &m.ca.key, secret)?;
    let client_cert = put("gateway-client.pem", &m.client.cert, public)?;
    let client_key = put("gateway-client.key", &m.client.key, secret)?;
    let mut servers = Vec::new();
    for (host, pair) in &m.servers {
        let stem = server_stem(host);
        let cert = put(&format!("{stem}.pem"), &pair.cert, public)?;
        let key = put(&format!("{stem}.key"), &pair.key, secret)?;
        servers.push((host.clone(), cert, key));
    }
    Ok(Written {
        ca,
        client_cert,
        client_key,
        servers,
    })
}

/// What to paste where.
fn instructions(dir: &Path, pool: &str, m: &Material, w: &Written) -> String {
    let hosts: Vec<String> = m
        .servers
        .iter()
        .map(|(h, _)| {
            if h.contains(':') {
                format!("\"[{h}]:8000\"")
            } else {
                format!("\"{h}:8000\"")
            }
        })
        .collect();
    let mut out = format!(
        "Wrote the CA, the gateway's client certificate and {n} server certificate(s) to {dir}.\n\
         Keep ca.key offline or in this folder: it issues certificates, nothing needs it to run.\n\n\
         # moat.toml on the gateway (the port is your model servers'):\n\
         [pools.{pool}]\n\
         hosts = [{hosts}]\n\
         tls = true\n\
         tls_ca_file = \"{ca}\"\n\
         tls_client_cert_file = \"{cc}\"\n\
         tls_client_key_file = \"{ck}\"\n\n\
         # On each inference host: copy ca.pem and that host's server-*.pem/.key, then start\n\
         # the model server so that it requires a client certificate from this CA\n\
         # (SGLang takes the same --ssl-* flags):\n",
        n = m.servers.len(),
        dir = dir.display(),
        hosts = hosts.join(", "),
        ca = w.ca.display(),
        cc = w.client_cert.display(),
        ck = w.client_key.display(),
    );
    for (host, cert, key) in &w.servers {
        out.push_str(&format!(
            "#   {host}:\nvllm serve MODEL --ssl-certfile {} --ssl-keyfile {} --ssl-ca-certs ca.pem --ssl-cert-reqs 2\n",
            cert.file_name().unwrap_or_default().to_string_lossy(),
            key.file_name().unwrap_or_default().to_string_lossy(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use x509_parser::{
        extensions::GeneralName,
        pem::parse_x509_pem,
        prelude::{FromDer, X509Certificate},
    };

    use super::*;

    fn with_cert<T>(pem: &str, f: impl FnOnce(&X509Certificate<'_>) -> T) -> T {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
        f(&cert)
    }

    #[test]
    fn init_makes_a_ca_a_client_certificate_and_server_certificates_with_their_sans() {
        let hosts = ["gpu1.internal".to_owned(), "10.0.0.7".to_owned()];
        let m = generate(&hosts, 30, 365).unwrap();
        let ca_subject = with_cert(&m.ca.cert, |c| {
            assert!(c.is_ca(), "the CA is a CA");
            assert!(c.key_usage().unwrap().unwrap().value.key_cert_sign());
            c.subject().to_string()
        });
        with_cert(&m.client.cert, |c| {
            assert!(!c.is_ca());
            let eku = c.extended_key_usage().unwrap().unwrap().value;
            assert!(eku.client_auth && !eku.server_auth);
            assert_eq!(c.issuer().to_string(), ca_subject);
            let days =
                (c.validity().not_after.timestamp() - c.validity().not_before.timestamp()) / 86_400;
            assert_eq!(
                days, 30,
                "the lifetime asked for (plus five minutes of slack)"
            );
        });
        for (host, pair) in &m.servers {
            with_cert(&pair.cert, |c| {
                let eku = c.extended_key_usage().unwrap().unwrap().value;
                assert!(eku.server_auth && !eku.client_auth);
                let sans = &c
                    .subject_alternative_name()
                    .unwrap()
                    .unwrap()
                    .value
                    .general_names;
                let want = match host.parse::<std::net::IpAddr>() {
                    Ok(std::net::IpAddr::V4(ip)) => GeneralName::IPAddress(&ip.octets()[..]),
                    _ => GeneralName::DNSName(host),
                };
                assert_eq!(sans, &vec![want], "{host}");
                assert_eq!(c.issuer().to_string(), ca_subject);
            });
        }
    }

    #[test]
    fn the_client_certificate_chains_to_the_ca_and_its_key_matches() {
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
        let m = generate(&["h".to_owned()], 1, 1).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(m.client.cert.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(m.client.key.as_bytes()).unwrap();
        let provider = rustls::crypto::ring::default_provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).unwrap();
        // What a model server does with it: webpki, the CA as the only root, clientAuth.
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(m.ca.cert.as_bytes()).unwrap())
            .unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            std::sync::Arc::new(roots),
            std::sync::Arc::new(provider),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&chain[0], &[], rustls_pki_types::UnixTime::now())
            .unwrap();
        // A server certificate is no client certificate.
        let server = CertificateDer::from_pem_slice(m.servers[0].1.cert.as_bytes()).unwrap();
        assert!(
            verifier
                .verify_client_cert(&server, &[], rustls_pki_types::UnixTime::now())
                .is_err()
        );
    }

    #[test]
    fn files_get_safe_modes_and_are_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        let m = generate(&["gpu1".to_owned(), "fd00::1".to_owned()], 1, 1).unwrap();
        let w = write(&out, &m).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join("ca.key")), 0o600);
        assert_eq!(mode(&w.client_key), 0o600);
        assert_eq!(mode(&w.ca), 0o644);
        assert_eq!(w.servers[1].1, out.join("server-fd00__1.pem"));
        assert_eq!(mode(&w.servers[1].2), 0o600);
        let text = instructions(&out, "gpu", &m, &w);
        assert!(
            text.contains("hosts = [\"gpu1:8000\", \"[fd00::1]:8000\"]"),
            "{text}"
        );
        assert!(text.contains(&format!(
            "tls_client_key_file = \"{}\"",
            w.client_key.display()
        )));
        assert!(text.contains("--ssl-ca-certs ca.pem --ssl-cert-reqs 2"));
        let e = write(&out, &m).err().unwrap();
        assert!(format!("{e:#}").contains("File exists"), "{e:#}");
    }
}
