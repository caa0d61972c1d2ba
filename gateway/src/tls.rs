//! rustls client settings shared by every outbound TLS connection (model servers, PostgreSQL):
//! the ring provider, safe protocol versions, and the roots — the CAs of an operator's
//! `*ca_file` when it names one, otherwise the webpki roots.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::{ClientConfig, ConfigBuilder, RootCertStore, WantsVerifier, client::WantsClientCert};

/// `ders`: the CA certificates (DER) read from `ca_key` at config load; `None`: webpki's.
pub fn client_with_roots(
    ders: Option<&[Vec<u8>]>,
    ca_key: &str,
) -> anyhow::Result<ConfigBuilder<ClientConfig, WantsClientCert>> {
    let mut roots = RootCertStore::empty();
    match ders {
        Some(ders) => {
            for der in ders {
                roots
                    .add(der.clone().into())
                    .with_context(|| format!("{ca_key}: bad certificate"))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    Ok(builder()?.with_root_certificates(roots))
}

fn builder() -> anyhow::Result<ConfigBuilder<ClientConfig, WantsVerifier>> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("rustls protocol versions")
}
