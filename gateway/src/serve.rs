//! `moat serve`: the daemon. Puts kernel enforcement in place (or adopts what is pinned), moves
//! itself into the gateway cgroup, then serves the data plane until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    app::{self, AppState},
    config::Config,
};

pub fn run(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let listen = config.raw.server.listen;
    let identity =
        crate::auth::Identity::open(&config).context("cannot open the identity store")?;
    let _upkeep = identity.spawn_upkeep();
    let state = Arc::new(AppState { config, identity });
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(listen = %listener.local_addr()?, "data plane listening");
    // Connection info: the token endpoint throttles password attempts per source address.
    let service = app::router(state).into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(shutdown())
        .await?;
    info!("stopped");
    Ok(())
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
