//! `moat serve`: the daemon. Puts kernel enforcement in place (or adopts what is pinned), moves
//! itself into the gateway cgroup, then serves the data plane until SIGTERM/SIGINT. SIGHUP
//! re-reads the config and swaps the kernel policy; a bad file changes nothing.

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    app::{self, AppState},
    cgroup::Cgroup,
    config::{Config, SegmentationMode},
    proxy,
    segment::{Enforcer, GatewayIdentity, Pins, Policy},
};

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let segmentation = match config.segmentation().mode {
        SegmentationMode::Enforce => Some(start_segmentation(&config)?),
        SegmentationMode::Off => {
            warn!("segmentation is off: the kernel does not protect the inference hosts");
            None
        }
    };
    tokio::spawn(reload_on_sighup(config.path.clone(), segmentation));

    let listen = config.raw.server.listen;
    let identity =
        crate::auth::Identity::open(&config).context("cannot open the identity store")?;
    let _upkeep = identity.spawn_upkeep();
    let state =
        Arc::new(AppState::new(config, identity).context("cannot set up the upstream pools")?);
    // Kept alive for as long as the server runs; dropping it stops the checks.
    let _health = proxy::health::spawn(&state.pools, &state.upstreams);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(listen = %listener.local_addr()?, "data plane listening");
    // Connection info: the token endpoint throttles password attempts per source address.
    let service = app::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    // TCP_NODELAY: stream chunks are small writes; Nagle would hold each one back until the
    // previous was acknowledged (up to 40 ms with delayed ACKs).
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown())
        .await?;
    info!("stopped");
    Ok(())
}

/// Kernel enforcement and the gateway cgroup, as the running daemon holds them.
struct Segmentation {
    enforcer: Enforcer,
    gateway: GatewayIdentity,
}

/// Creates the gateway cgroup, installs or adopts the pinned programs with this config's
/// policy, moves this process into the gateway cgroup and starts logging deny events.
fn start_segmentation(config: &Config) -> anyhow::Result<Segmentation> {
    let seg = config.segmentation();
    let cgroup = Cgroup::ensure(&seg.gateway_cgroup)?;
    let gateway = GatewayIdentity {
        cgroup_id: cgroup.id,
        level: cgroup.level,
    };
    let policy = Policy {
        gateway: Some(gateway),
        ..Policy::from_config(config)
    };
    let enforcer = Enforcer::install_or_adopt(&Pins::new(&seg.pin_root), &policy)
        .context("kernel enforcement is required (segmentation.mode = \"enforce\") but failed")?;
    cgroup
        .add_pid(std::process::id())
        .with_context(|| format!("cannot move the daemon into {}", cgroup.path.display()))?;
    enforcer.spawn_event_logger()?;
    info!(
        gateway_cgroup = %cgroup.path.display(),
        cgroup_id = cgroup.id,
        destinations = policy.destinations.len(),
        adopted = enforcer.adopted(),
        "kernel enforcement active"
    );
    Ok(Segmentation { enforcer, gateway })
}

async fn reload_on_sighup(path: std::path::PathBuf, mut segmentation: Option<Segmentation>) {
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        return;
    };
    while hup.recv().await.is_some() {
        let config = match Config::load(&path) {
            Ok(c) => c,
            Err(e) => {
                error!(error = %e, "config reload refused; the running config stays");
                continue;
            }
        };
        if let Some(seg) = segmentation.as_mut() {
            let policy = Policy {
                gateway: Some(seg.gateway),
                ..Policy::from_config(&config)
            };
            match seg.enforcer.apply(&policy) {
                Ok(()) => info!(
                    destinations = policy.destinations.len(),
                    "kernel policy reloaded"
                ),
                Err(e) => {
                    error!(error = %format!("{e:#}"), "kernel policy reload failed; the old policy stays")
                }
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
