//! The upstream HTTP client of one pool: HTTP/1.1 connections kept alive and reused, rustls
//! for `tls = true` pools (with the pool's client certificate for mutual TLS), and a resolver
//! that only knows the addresses the config resolved at load time — the gateway needs no DNS at
//! run time, and a host name that is not a pool host cannot be reached through it.
//!
//! The pool of connections is the gateway's own, over hyper's connection-level API: one slot
//! per serving thread ([`Clients`]; the worker serves on one single-threaded runtime per core,
//! `daemon::worker`), and in each slot, per host, the connections that thread opened. A
//! connection's task is spawned on the runtime that opened it, so a request that only uses its
//! own thread's slot never hands a body frame to another thread. Slot 0 serves every thread
//! that does not serve (health checks, the admin plane, a process on one runtime).
//!
//! A connection stays in its slot's list for its whole life, busy or not; a request takes the
//! first one hyper says is ready (its last answer fully read), so nothing is checked out, put
//! back or spawned per request. Closed connections, and ready ones unused for
//! [`IDLE_TIMEOUT`], are dropped when a request looks; a list holds at most
//! [`CONNS_PER_HOST`] (a request beyond that gets a connection of its own, closed after it).
//!
//! What was sent decides what may be retried ([`Error`]): a request that never reached the
//! upstream (connect refused or timed out, TLS refused, a connection closed before the request
//! was written) may go to another host; one that may have been written never is. A kept
//! connection the upstream closed while it sat idle hands the request back unsent: it goes out
//! again on a fresh connection to the same host.

use std::{
    cell::Cell,
    collections::HashMap,
    future::{Ready, ready},
    io,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use axum::http::{
    HeaderValue, Request, Response, Uri, header,
    uri::{Authority, Scheme},
};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{
        TrySendError,
        http1::{self, SendRequest},
    },
};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::{HttpConnector, dns::Name};
use tower_service::Service;
use tracing::debug;

use crate::{
    clock::Coarse,
    config::{ClientCert, Pool},
};

type Connector = HttpsConnector<HttpConnector<StaticResolver>>;
type Sender = SendRequest<Full<Bytes>>;
type Outgoing = Request<Full<Bytes>>;
/// What a connection gives for a request: the answer, or the error and, when the request was
/// not written, the request back.
type Answer = Result<Response<Incoming>, TrySendError<Outgoing>>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A ready connection unused this long is closed rather than reused (the upstream may be about
/// to close it itself).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections kept per host in one slot: above any concurrency one thread serves to one host
/// in practice, and a bound on the sockets an idle gateway holds.
pub const CONNS_PER_HOST: usize = 256;

/// A pool's connections: slot 0 for threads that do not serve, then one per serving thread.
pub struct Clients {
    connector: Connector,
    /// By host index.
    targets: Vec<Target>,
    slots: Vec<Mutex<Vec<Vec<Conn>>>>,
}

/// Where a host's connections go and what its requests say they are for.
struct Target {
    /// `scheme://host:port/`: what the connector dials (TLS or not, the TLS server name).
    connect: Uri,
    host: HeaderValue,
}

struct Conn {
    tx: Sender,
    /// Last seen in use: a request sent, or busy when a request looked.
    used: Coarse,
}

/// Why a request got no answer.
#[derive(Debug)]
pub enum Error {
    /// Nothing reached the upstream (connect refused or timed out, TLS refused, the
    /// connection closed before the request was written): another host may be tried.
    NotSent(BoxError),
    /// The request may have been written: never sent again.
    Sent(hyper::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Error::NotSent(_) => "could not send the request",
            Error::Sent(_) => "request sent, no answer",
        })
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::NotSent(e) => Some(&**e),
            Error::Sent(e) => Some(e),
        }
    }
}

impl Clients {
    /// Sends `req` (origin-form URI; the `Host` header is set here) to host `host` of the pool,
    /// on a kept connection of the calling thread's slot if one is ready, else on a new one.
    pub async fn send(&self, host: usize, mut req: Outgoing) -> Result<Response<Incoming>, Error> {
        let target = &self.targets[host];
        req.headers_mut().insert(header::HOST, target.host.clone());
        let slot = &self.slots[SLOT.with(Cell::get) % self.slots.len()];
        let req = match send_on_kept(slot, host, req) {
            Ok(answer) => match answer.await {
                Ok(resp) => return Ok(resp),
                Err(mut e) => match e.take_message() {
                    // Closed by the upstream before the request was written: a fresh one.
                    Some(req) => {
                        debug!(error = %e.error(), "kept upstream connection was closed; reconnecting");
                        req
                    }
                    None => return Err(Error::Sent(e.into_error())),
                },
            },
            Err(req) => req,
        };
        let mut tx = self.connect(target).await.map_err(Error::NotSent)?;
        let answer = tx.try_send_request(req);
        keep(slot, host, tx);
        answer.await.map_err(|mut e| match e.take_message() {
            Some(_) => Error::NotSent(e.into_error().into()),
            None => Error::Sent(e.into_error()),
        })
    }

    /// A new connection to `target`, its task spawned on the calling thread's runtime.
    async fn connect(&self, target: &Target) -> Result<Sender, BoxError> {
        let mut connector = self.connector.clone();
        std::future::poll_fn(|cx| connector.poll_ready(cx)).await?;
        let io = connector.call(target.connect.clone()).await?;
        let (tx, conn) = http1::Builder::new().handshake(io).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "upstream connection ended");
            }
        });
        Ok(tx)
    }
}

/// Sends on the first ready connection of the slot's list for `host`, dropping the closed and
/// the expired on the way; gives `req` back when none is ready.
#[allow(clippy::result_large_err)]
fn send_on_kept(
    slot: &Mutex<Vec<Vec<Conn>>>,
    host: usize,
    req: Outgoing,
) -> Result<impl Future<Output = Answer> + use<>, Outgoing> {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    let conns = &mut slot[host];
    let now = Coarse::now();
    let mut i = 0;
    while i < conns.len() {
        let c = &mut conns[i];
        if c.tx.is_closed() {
            conns.swap_remove(i);
        } else if !c.tx.is_ready() {
            // Busy (an answer still being read): in use, not idle.
            c.used = now;
            i += 1;
        } else if now.since(c.used) > IDLE_TIMEOUT {
            conns.swap_remove(i);
        } else {
            c.used = now;
            return Ok(c.tx.try_send_request(req));
        }
    }
    Err(req)
}

/// Keeps a new connection in the slot, unless the list is full (then it closes once its
/// request is answered).
fn keep(slot: &Mutex<Vec<Vec<Conn>>>, host: usize, tx: Sender) {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    let conns = &mut slot[host];
    if conns.len() < CONNS_PER_HOST {
        conns.push(Conn {
            tx,
            used: Coarse::now(),
        });
    }
}

/// Slots per pool: 1 + the serving threads.
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

    let scheme = if pool.tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    };
    let targets = pool
        .hosts
        .iter()
        .map(|h| {
            let authority: Authority = h
                .parse()
                .map_err(|e| anyhow::anyhow!("pools.{}.hosts: `{h}`: {e}", pool.name))?;
            target(&scheme, authority)
                .map_err(|e| anyhow::anyhow!("pools.{}.hosts: `{h}`: {e}", pool.name))
        })
        .collect::<anyhow::Result<_>>()?;
    let slots = (0..SLOTS.load(Ordering::Relaxed))
        .map(|_| Mutex::new((0..pool.hosts.len()).map(|_| Vec::new()).collect()))
        .collect();
    Ok(Clients {
        connector: https,
        targets,
        slots,
    })
}

/// The connect URI and `Host` header of a host: the port is left out of `Host` when it is the
/// scheme's default, as browsers and curl do.
fn target(scheme: &Scheme, authority: Authority) -> anyhow::Result<Target> {
    let default_port = if *scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(p) if p != default_port => HeaderValue::from_str(authority.as_str())?,
        _ => HeaderValue::from_str(authority.host())?,
    };
    let connect = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority)
        .path_and_query("/")
        .build()?;
    Ok(Target { connect, host })
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
    use std::{
        io::{Read, Write},
        net::{TcpListener, TcpStream},
        path::Path,
        sync::{Arc, atomic::AtomicUsize, mpsc},
        thread,
    };

    use http_body_util::BodyExt;

    use super::*;
    use crate::config::Config;

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";

    fn clients(port: u16) -> Clients {
        let text = format!("[pools.p]\nhosts = [\"127.0.0.1:{port}\"]\n");
        let config = Config::from_str(Path::new("/t.toml"), &text).unwrap();
        build(&config.pools["p"]).unwrap()
    }

    fn request() -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(Bytes::from_static(b"{}")));
        *req.method_mut() = axum::http::Method::POST;
        *req.uri_mut() = Uri::from_static("/v1/chat/completions");
        req
    }

    /// Sends one request and reads its whole answer.
    async fn ask(c: &Clients) -> Result<Bytes, Error> {
        let resp = c.send(0, request()).await?;
        assert_eq!(resp.status(), 200);
        Ok(resp.into_body().collect().await.unwrap().to_bytes())
    }

    /// Reads one request (head and `content-length` body) off `s`; false at end of stream.
    fn read_request(s: &mut TcpStream) -> bool {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                assert!(head.contains("\r\nhost: 127.0.0.1:"), "{head}");
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    return true;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// A server that hands each connection it accepts to `serve`; counts them.
    fn counting_server(serve: impl Fn(TcpStream) + Send + 'static) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        thread::spawn(move || {
            for s in listener.incoming() {
                count.fetch_add(1, Ordering::SeqCst);
                serve(s.unwrap());
            }
        });
        (port, accepted)
    }

    /// A keep-alive server answering every request; counts the connections it accepted.
    fn keep_alive_server() -> (u16, Arc<AtomicUsize>) {
        counting_server(|mut s| {
            thread::spawn(move || {
                while read_request(&mut s) {
                    s.write_all(OK).unwrap();
                }
            });
        })
    }

    #[tokio::test]
    async fn sequential_requests_reuse_one_connection() {
        let (port, accepted) = keep_alive_server();
        let c = clients(port);
        for _ in 0..5 {
            assert_eq!(ask(&c).await.unwrap(), "ok");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_kept_connection_closed_by_the_upstream_is_retried_on_a_fresh_one() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (close, closing) = mpsc::channel::<()>();
        let server = thread::spawn(move || {
            // The first connection answers once, keep-alive, then is closed when told.
            let (mut first, _) = listener.accept().unwrap();
            assert!(read_request(&mut first));
            first.write_all(OK).unwrap();
            closing.recv().unwrap();
            drop(first);
            let (mut second, _) = listener.accept().unwrap();
            assert!(read_request(&mut second));
            second.write_all(OK).unwrap();
        });
        let c = clients(port);
        assert_eq!(ask(&c).await.unwrap(), "ok");
        // Let the connection's task see the answer end: the connection is ready for reuse.
        tokio::time::sleep(Duration::from_millis(50)).await;
        close.send(()).unwrap();
        // Blocks this (single-threaded) runtime while the close reaches the socket; then one
        // yield lets the runtime take in the close (waking the connection's task) and polls
        // this test again before that task runs: the request is handed to a connection that
        // still looks ready, and only then does its task find the upstream gone.
        thread::sleep(Duration::from_millis(200));
        tokio::task::yield_now().await;
        assert_eq!(ask(&c).await.unwrap(), "ok");
        server.join().unwrap();
    }

    #[tokio::test]
    async fn a_refused_connect_sent_nothing() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let c = clients(port);
        let e = ask(&c).await.unwrap_err();
        assert!(matches!(e, Error::NotSent(_)), "{e:?}");
        let chain = crate::dataplane::proxy::error_chain(&e);
        assert!(chain.contains("refused"), "{chain}");
    }

    #[tokio::test]
    async fn a_request_read_but_not_answered_is_not_sent_again() {
        // Each connection: its request read, then closed without an answer.
        let (port, accepted) = counting_server(|mut s| {
            read_request(&mut s);
        });
        let c = clients(port);
        let e = ask(&c).await.unwrap_err();
        assert!(matches!(e, Error::Sent(_)), "{e:?}");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn dropping_the_answer_closes_the_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, saw) = mpsc::channel();
        thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            assert!(read_request(&mut s));
            // No answer; the next read ends when the gateway closes the connection.
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = seen.send(s.read(&mut [0u8; 16]).ok());
        });
        let c = clients(port);
        let waited = tokio::time::timeout(Duration::from_millis(200), ask(&c)).await;
        assert!(waited.is_err(), "the server never answers");
        // The connection's task runs on this runtime: give it a moment.
        let closed = tokio::task::spawn_blocking(move || saw.recv().unwrap())
            .await
            .unwrap();
        assert_eq!(closed, Some(0), "the upstream saw the connection closed");
    }

    #[test]
    fn host_part_strips_port_and_brackets() {
        assert_eq!(host_part("gpu1.internal:8000"), "gpu1.internal");
        assert_eq!(host_part("[::1]:8000"), "::1");
        assert_eq!(host_part("10.0.0.1:80"), "10.0.0.1");
    }

    #[test]
    fn host_header_leaves_out_the_default_port() {
        let host = |scheme: &Scheme, a: &str| target(scheme, a.parse().unwrap()).unwrap().host;
        assert_eq!(host(&Scheme::HTTP, "gpu1:8000"), "gpu1:8000");
        assert_eq!(host(&Scheme::HTTP, "gpu1:80"), "gpu1");
        assert_eq!(host(&Scheme::HTTPS, "gpu1:443"), "gpu1");
        assert_eq!(host(&Scheme::HTTPS, "[::1]:8443"), "[::1]:8443");
        assert_eq!(host(&Scheme::HTTPS, "[::1]:443"), "[::1]");
    }
}
