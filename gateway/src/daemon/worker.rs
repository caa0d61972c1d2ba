//! The worker: the unprivileged, internet-facing process. It serves the data plane on the
//! listener the supervisor bound and passed down, and swaps in each config the supervisor
//! sends over the control channel — in-flight requests finish on the router they started on,
//! new ones get the new router, none is dropped.
//!
//! Its first acts, before it serves anything: follow the supervisor's death, become
//! non-dumpable, install the seccomp filter (`privdrop`, `seccomp`).
//!
//! Threads: the data plane is served by one single-threaded tokio runtime per core, each
//! accepting on its own socket of a reuse-port group and keeping its own upstream connections
//! (`proxy::client::Clients`), so that a request, its upstream connection and every frame of
//! its answer stay on one thread (no work stealing, no cross-thread wake-up per frame). The
//! main runtime keeps the rest: the control channel (reloads), the admin plane, health checks,
//! the identity store's upkeep, signals. The config in force is one `ArcSwap` all threads
//! read, so a reload reaches every thread at once.

use std::{
    convert::Infallible,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    path::Path,
    sync::Arc,
    task::Poll,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use arc_swap::ArcSwap;
use axum::{Router, body::Body, extract::ConnectInfo, http::Request, routing::future::RouteFuture};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tower::Service;
use tracing::{debug, error, info};

use crate::{
    auth::Identity,
    config::{Config, Sources},
    daemon::control::{
        self, ENV_ADMIN_FD, ENV_AUDIT_FD, ENV_CONTROL_FD, ENV_LISTEN_FD, ENV_SUPERVISOR_PID,
        FromWorker, ToWorker,
    },
    daemon::{listen, privdrop, seccomp, send_timeout::SendTimeout},
    dataplane::proxy,
    dataplane::quota::Quotas,
    dataplane::state::{AppState, SharedState},
    dataplane::{app, body_limit},
    metrics::KernelCounters,
};

/// What outlives a config reload: the identity store and its caches, the quota counters (a
/// reload must not hand everyone a fresh minute), and the latest kernel counters the
/// supervisor sent.
struct Shared {
    identity: Arc<Identity>,
    quotas: Arc<Quotas>,
    kernel: Arc<ArcSwap<KernelCounters>>,
}

impl Shared {
    fn open(config: &Config, kernel: Arc<ArcSwap<KernelCounters>>) -> Result<Shared> {
        let identity = Identity::open(config).context("cannot open the identity store")?;
        Ok(Shared {
            identity,
            quotas: Arc::new(Quotas::from_config(config).context("cannot set up the quotas")?),
            kernel,
        })
    }

    /// Builds the data plane for one config. The one place a config becomes a router.
    fn build(&self, config: Config) -> Result<Serving> {
        let mut state = AppState::new(config, self.identity.clone(), self.quotas.clone())
            .context("cannot set up the upstream pools")?;
        state.kernel = self.kernel.clone();
        let state = Arc::new(state);
        let health = proxy::health::spawn(&state.pools, &state.upstreams);
        Ok(Serving {
            router: app::router(state.clone()),
            state,
            _health: health,
        })
    }
}

/// One config, served: its router and its pools' active health checks. A reload swaps in a
/// new one; requests in flight keep the old one alive until they finish, then its health
/// checks stop with it.
pub struct Serving {
    router: Router,
    /// For the admin plane, which judges permissions under the config in force.
    state: SharedState,
    _health: proxy::health::HealthCheckers,
}

/// `moat worker`: started by the supervisor, never by hand.
pub fn run() -> Result<()> {
    let fd = |name: &str| -> Result<RawFd> {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{name} is not set: `moat worker` is started by `moat serve`"))
    };
    let supervisor: i32 = fd(ENV_SUPERVISOR_PID)?;
    privdrop::exit_with_parent(supervisor);
    privdrop::name_moat()?;
    // Before anything reads a request: no same-uid process may trace this one, and the
    // system calls it has no use for kill it (see `seccomp`).
    privdrop::make_undumpable()?;
    seccomp::install()?;
    let listen_fds = std::env::var(ENV_LISTEN_FD)
        .ok()
        .map(|v| listen::decode(&v))
        .transpose()?
        .with_context(|| {
            format!("{ENV_LISTEN_FD} is not set: `moat worker` is started by `moat serve`")
        })?;
    // SAFETY: the supervisor passed these descriptors to this process for it alone.
    let listeners: Vec<std::net::TcpListener> = listen_fds
        .into_iter()
        .map(|f| std::net::TcpListener::from(unsafe { OwnedFd::from_raw_fd(f) }))
        .collect();
    // One serving thread per listener (the supervisor bound one per core).
    let threads = listeners.len();
    let control =
        std::os::unix::net::UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd(ENV_CONTROL_FD)?) });
    for l in &listeners {
        l.set_nonblocking(true)?;
    }
    control.set_nonblocking(true)?;
    // SAFETY: as above.
    crate::audit::sink::install_datagram(std::os::unix::net::UnixDatagram::from(unsafe {
        OwnedFd::from_raw_fd(fd(ENV_AUDIT_FD)?)
    }))?;
    let admin = match std::env::var(ENV_ADMIN_FD) {
        // SAFETY: as above.
        Ok(_) => Some(std::net::TcpListener::from(unsafe {
            OwnedFd::from_raw_fd(fd(ENV_ADMIN_FD)?)
        })),
        Err(_) => None,
    };
    if let Some(a) = &admin {
        a.set_nonblocking(true)?;
    }
    // Every pool keeps a slot of upstream connections per serving thread (built with the
    // configs below).
    proxy::client::set_serving_threads(threads);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let control = UnixStream::from_std(control)?;
        let (read, mut write) = control.into_split();
        let mut lines = BufReader::new(read).lines();
        let kernel = Arc::new(ArcSwap::from_pointee(KernelCounters::default()));
        // The first message is the config to serve.
        let config = match next_config(&mut lines, &kernel).await? {
            Some(c) => c,
            None => bail!("the supervisor closed the control channel before sending a config"),
        };
        // Whatever stops the first config from being served goes back to the supervisor, which
        // refuses to start with that reason.
        let started = config.and_then(|c| {
            let shared = Shared::open(&c, kernel.clone()).map_err(|e| format!("{e:#}"))?;
            let serving = shared.build(c).map_err(|e| format!("{e:#}"))?;
            Ok((serving, shared))
        });
        let (serving, shared) = match started {
            Ok(started) => started,
            Err(e) => {
                let refused = control::encode(&FromWorker::Refused { error: e.clone() });
                write.write_all(refused.as_bytes()).await?;
                bail!("config refused: {e}");
            }
        };
        let _upkeep = shared.identity.spawn_upkeep();
        let current = Arc::new(ArcSwap::from_pointee(serving));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let mut servers = Vec::with_capacity(threads);
        let listen = listeners[0].local_addr()?;
        for (i, listener) in listeners.into_iter().enumerate() {
            servers.push(serving_thread(
                i,
                listener,
                current.clone(),
                stopped.clone(),
            )?);
        }
        write
            .write_all(control::encode(&FromWorker::Applied).as_bytes())
            .await?;
        info!(pid = std::process::id(), %listen, threads, "data plane listening");
        if let Some(a) = admin {
            let a = TcpListener::from_std(a)?;
            info!(listen = %a.local_addr()?, "admin plane listening");
            let cur = current.clone();
            // The data plane's body cap and deadline (those of the config at start).
            let body_limit = {
                let serving = current.load();
                let server = serving.state.config.server();
                body_limit::Layer::new(
                    server.max_body_bytes,
                    Duration::from_millis(server.body_timeout_ms),
                )
            };
            let router = crate::admin::router(
                Arc::new(move || cur.load().state.clone()),
                shared.identity.clone(),
                shared.kernel.clone(),
            )
            .layer(body_limit);
            tokio::spawn(serve_admin(a, router, current.clone()));
        }

        let reloads = current.clone();
        let shared_quotas = shared.quotas.clone();
        let supervisor_gone = async move {
            while let Some(msg) = next_config(&mut lines, &kernel).await.transpose() {
                let reply = match msg {
                    Ok(Ok(config)) => match shared.build(config) {
                        Ok(serving) => {
                            reloads.store(Arc::new(serving));
                            info!("worker applied a new config");
                            FromWorker::Applied
                        }
                        Err(e) => FromWorker::Refused {
                            error: format!("{e:#}"),
                        },
                    },
                    Ok(Err(e)) => FromWorker::Refused { error: e },
                    Err(e) => {
                        error!(error = %e, "bad control message");
                        break;
                    }
                };
                if write
                    .write_all(control::encode(&reply).as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        shutdown(supervisor_gone).await;
        let _ = stop.send(true);
        // Each thread finishes its open requests (graceful shutdown), then ends.
        tokio::task::spawn_blocking(move || {
            for s in servers {
                match s.join() {
                    Ok(Err(e)) => error!(error = %format!("{e:#}"), "a serving thread failed"),
                    Err(_) => error!("a serving thread panicked"),
                    Ok(Ok(())) => {}
                }
            }
        })
        .await?;
        // Leased quota shares go back once no request can use them any more.
        shared_quotas.release().await;
        info!("stopped");
        Ok(())
    })
}

/// Serving thread `i`: its own single-threaded runtime accepting on `listener` (its own socket
/// of the reuse-port group, `daemon::listen`) until `stop` turns true.
fn serving_thread(
    i: usize,
    listener: std::net::TcpListener,
    current: Arc<ArcSwap<Serving>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Result<std::thread::JoinHandle<Result<()>>> {
    let thread = std::thread::Builder::new()
        .name(format!("moat-serve-{i}"))
        .spawn(move || {
            proxy::client::enter_serving_thread(i);
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async move {
                let listener = TcpListener::from_std(listener)?;
                let until = async move {
                    let _ = stop.wait_for(|s| *s).await;
                };
                serve(listener, current, until).await
            })
        })?;
    Ok(thread)
}

/// Resolves at SIGTERM or SIGINT, or when `until` does.
async fn shutdown(until: impl Future<Output = ()>) {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = until => info!("supervisor gone; stopping"),
    }
}

/// Reads up to the next config message: `None` at end of stream, `Some(Err)` for a config the
/// worker refuses (the reason goes back to the supervisor). Counter snapshots on the way are
/// kept in `kernel`.
async fn next_config(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    kernel: &ArcSwap<KernelCounters>,
) -> Result<Option<Result<Config, String>>> {
    loop {
        let Some(line) = lines.next_line().await? else {
            return Ok(None);
        };
        match serde_json::from_str(&line).context("undecodable control message")? {
            ToWorker::Counters(counters) => kernel.store(Arc::new(counters)),
            ToWorker::Config {
                path,
                text,
                captured,
            } => {
                let parsed = Config::parse(Path::new(&path), &text, Sources::Replay(&captured));
                return Ok(Some(parsed.map_err(|e| e.to_string())));
            }
        }
    }
}

/// Serves `current` (swappable) on `listener` until `until` completes, then lets the open
/// requests finish.
///
/// HTTP/1.1 over hyper's connection API, with the connection timeouts of [`accept_loop`].
/// Not HTTP/2: no OpenAI SDK or inference server speaks cleartext h2, and its flow control
/// would let a client hold a stream, and the upstream request behind it, without ever
/// blocking a socket write ([`SendTimeout`] would not see it). The body's deadline is step 2's
/// (`dataplane::body_limit`).
pub async fn serve(
    listener: TcpListener,
    current: Arc<ArcSwap<Serving>>,
    until: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let timeouts = current.clone();
    accept_loop(listener, until, move |peer| {
        (
            Timeouts::of(&timeouts),
            Connection {
                current: current.clone(),
                peer,
            },
        )
    })
    .await
}

/// Serves the admin plane's `router` on `listener`, with the data plane's connection timeouts
/// (`current`'s), until the process ends. Loopback only, but a local process that trickles a
/// request or stops reading must not hold it either.
async fn serve_admin(listener: TcpListener, router: Router, current: Arc<ArcSwap<Serving>>) {
    let router = TowerToHyperService::new(router);
    let _ = accept_loop(listener, std::future::pending(), move |_| {
        (Timeouts::of(&current), router.clone())
    })
    .await;
}

/// A connection's deadlines, from the `[server]` config current when it is accepted.
struct Timeouts {
    header: Duration,
    send: Duration,
}

impl Timeouts {
    fn of(current: &ArcSwap<Serving>) -> Self {
        let serving = current.load();
        let server = serving.state.config.server();
        Timeouts {
            header: Duration::from_millis(server.header_timeout_ms),
            send: Duration::from_millis(server.send_timeout_ms),
        }
    }
}

/// Accepts connections on `listener` until `until` completes, each served by the service
/// `connection` makes for its peer, then lets the open requests finish.
///
/// A request's head must arrive within `server.header_timeout_ms`, which also closes a
/// kept-alive connection left without a new request that long, and a client that stops
/// reading its answer is cut off after `server.send_timeout_ms` ([`SendTimeout`]).
async fn accept_loop<S>(
    listener: TcpListener,
    until: impl Future<Output = ()> + Send + 'static,
    mut connection: impl FnMut(std::net::SocketAddr) -> (Timeouts, S),
) -> Result<()>
where
    S: hyper::service::Service<
            Request<Incoming>,
            Response = axum::response::Response,
            Error = Infallible,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let mut until = std::pin::pin!(until);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut until => break,
        };
        // TCP_NODELAY: stream chunks are small writes; Nagle would hold each one back until
        // the previous was acknowledged (up to 40 ms with delayed ACKs).
        let _ = tcp.set_nodelay(true);
        let (timeouts, service) = connection(peer);
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(timeouts.header)
            .serve_connection(TokioIo::new(SendTimeout::new(tcp, timeouts.send)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// An `accept` that failed: a connection reset before it was taken is nothing; running out
/// of descriptors or memory waits a moment (the error would come back at once otherwise).
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    error!(error = %e, "accept failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One connection's requests, each handed to the router of the config current when it
/// arrives: a direct call, with no router or boxed future of its own in front.
struct Connection {
    current: Arc<ArcSwap<Serving>>,
    /// The token endpoint throttles password attempts per source address (`ConnectInfo`).
    peer: std::net::SocketAddr,
}

impl hyper::service::Service<Request<Incoming>> for Connection {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Served;

    fn call(&self, req: Request<Incoming>) -> Served {
        let mut req = req.map(Body::new);
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let serving = self.current.load_full();
        let answer = serving.router.clone().call(req);
        Served {
            answer,
            _serving: serving,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request being answered; it holds its config (and that config's pools) until the
    /// answer is ready.
    struct Served {
        #[pin]
        answer: RouteFuture<Infallible>,
        _serving: Arc<Serving>,
    }
}

impl Future for Served {
    type Output = Result<axum::response::Response, Infallible>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        self.project().answer.poll(cx)
    }
}

/// Unprivileged single-process mode (`moat serve` as a normal user, segmentation off): the
/// worker's data plane without a supervisor. SIGHUP re-reads the file.
pub async fn serve_standalone(config: Config) -> Result<()> {
    let listen = config.server().listen;
    let path = config.path.clone();
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(listen = %listener.local_addr()?, "data plane listening (single process, no kernel enforcement)");
    crate::audit::start_daemon(&config, None, crate::audit::Source::Standalone)?;
    let shared = Shared::open(&config, Default::default())?;
    let _upkeep = shared.identity.spawn_upkeep();
    let current = Arc::new(ArcSwap::from_pointee(shared.build(config)?));
    let quotas = shared.quotas.clone();
    let reloads = current.clone();
    tokio::spawn(async move {
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let old_digest = crate::audit::chain::digest(&reloads.load().state.config.source);
            let new_text = std::fs::read_to_string(&path).unwrap_or_default();
            let outcome = Config::load(&path)
                .map_err(anyhow::Error::from)
                .and_then(|c| shared.build(c));
            let error = outcome.as_ref().err().map(|e| format!("{e:#}"));
            match outcome {
                Ok(serving) => {
                    reloads.store(Arc::new(serving));
                    info!("config reloaded");
                }
                Err(e) => {
                    error!(error = %format!("{e:#}"), "config reload refused; the running config stays")
                }
            }
            crate::audit::emit(crate::audit::Event::ConfigReload {
                old_digest,
                new_digest: crate::audit::chain::digest(&new_text),
                applied: error.is_none(),
                error,
            });
        }
    });
    let served = serve(listener, current, shutdown(std::future::pending())).await;
    quotas.release().await;
    info!("stopped");
    crate::audit::stop_daemon();
    served
}
