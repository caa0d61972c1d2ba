//! The upstream HTTP client of one pool: hyper's pooled client (connection reuse, keep-alive),
//! rustls for `tls = true` pools (with the pool's client certificate for mutual TLS), and a resolver that only knows the addresses the config
//! resolved at load time — the gateway needs no DNS at run time, and a host name that is not a
//! pool host cannot be reached through it.
//!
//! One client (one connection pool) per serving thread ([`Clients`]): the worker serves on one
//! single-threaded runtime per core (`daemon::worker`), and a connection is driven by the
//! runtime that opened it, so a request that only uses its own thread's pool never hands a
//! body frame to another thread.

use std::{
    cell::Cell,
    collections::HashMap,
    future::{Ready, ready},
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::{TokioExecutor, TokioTimer},
};

use crate::config::{ClientCert, Pool};

pub type HttpClient = Client<HttpsConnector<HttpConnector<StaticResolver>>, Full<Bytes>>;

/// A pool's clients: slot 0 for threads that do not serve (health checks, the admin plane, a
/// process on one runtime), then one per serving thread.
pub struct Clients(Vec<HttpClient>);

impl Clients {
    /// The calling thread's client.
    pub fn get(&self) -> &HttpClient {
        &self.0[SLOT.with(Cell::get) % self.0.len()]
    }
}

/// Client slots per pool: 1 + the serving threads.
static SLOTS: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    static SLOT: Cell<usize> = const { Cell::new(0) };
}

/// A process serving on `n` threads says so once, before any pool is built.
pub fn set_serving_threads(n: usize) {
    SLOTS.store(n + 1, Ordering::Relaxed);
}

/// Serving thread `i` (from 0) says so before it serves.
pub fn enter_serving_thread(i: usize) {
    SLOT.with(|s| s.set(i + 1));
}

/// Resolves only the pool's own host names, to the addresses found when the config loaded.
#[derive(Clone)]
pub struct StaticResolver(Arc<HashMap<String, Vec<SocketAddr>>>);

impl tower_service::Service<Name> for StaticResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = io::Error;
    type Future = Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        ready(
            self.0
                .get(name.as_str())
                .map(|a| a.clone().into_iter())
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "not a pool host")),
        )
    }
}

/// The host part of `host:port` / `[v6]:port`.
pub fn host_part(entry: &str) -> &str {
    let host = entry.rsplit_once(':').map_or(entry, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

pub fn build(pool: &Pool) -> anyhow::Result<Clients> {
    let names = pool
        .hosts
        .iter()
        .zip(&pool.host_addrs)
        .map(|(h, addrs)| (host_part(h).to_owned(), addrs.clone()))
        .collect();
    let mut http = HttpConnector::new_with_resolver(StaticResolver(Arc::new(names)));
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(pool.timeouts.connect));
    http.set_keepalive(Some(Duration::from_secs(30)));

    let tls = crate::tls::client_with_roots(
        pool.tls_roots.as_deref(),
        &format!("pools.{}.tls_ca_file", pool.name),
    )?;
    // mTLS: the certificate read at this config's load; a reload builds a new client, so a
    // rotated certificate is used from the next new connection on.
    let tls = match &pool.tls_client {
        Some(cert) => {
            warn_if_not_valid_now(&pool.name, cert);
            tls.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
                cert.key.as_ref().clone(),
            )))
        }
        None => tls.with_no_client_auth(),
    };
    // The scheme of each request URI (from the pool's `tls`) decides plain or TLS.
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);

    let clients = (0..SLOTS.load(Ordering::Relaxed))
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(60))
                .build(https.clone())
        })
        .collect();
    Ok(Clients(clients))
}

/// An expired client certificate is not refused at load (the model server judges it, by its
/// own clock), but it is said loudly: every handshake is about to fail.
fn warn_if_not_valid_now(pool: &str, cert: &ClientCert) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let file = cert.cert_file.display();
    if now > cert.not_after {
        tracing::warn!(pool, file = %file, not_after = cert.not_after,
            "the pool's client certificate has expired; model servers that check it will refuse the gateway");
    } else if now < cert.not_before {
        tracing::warn!(pool, file = %file, not_before = cert.not_before,
            "the pool's client certificate is not valid yet; model servers that check it will refuse the gateway");
    }
}

#[cfg(test)]
mod tests {
    use super::host_part;

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("gpu1.internal:8000"), "gpu1.internal");
        assert_eq!(host_part("[::1]:8000"), "::1");
        assert_eq!(host_part("10.0.0.1:80"), "10.0.0.1");
    }
}
