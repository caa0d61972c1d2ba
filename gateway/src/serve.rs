//! `moat serve`: the daemon. Puts kernel enforcement in place (or adopts what is pinned), moves
//! itself into the gateway cgroup, then serves the data plane until SIGTERM/SIGINT.

use std::sync::Arc;

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use crate::{
    app::{self, AppState},
    config::Config,
    proxy,
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
    let state = Arc::new(AppState::new(config).context("cannot set up the upstream pools")?);
    // Kept alive for as long as the server runs; dropping it stops the checks.
    let _health = proxy::health::spawn(&state.pools, &state.upstreams);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(listen = %listener.local_addr()?, "data plane listening");
    axum::serve(listener, app::router(state))
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
