//! `/healthz` (the process answers) and `/readyz` (it can do its job: the store answers and
//! every pool has a host that passed an active health check and is not ejected). `/readyz` also
//! reports the segmentation state: `off`, `enforce`, or `degraded` (the kernel reports a hook's
//! link not attached: not ready until the supervisor restores it). Both are unauthenticated and
//! say nothing secret: pool and host names as configured, counts, and the segmentation mode.

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde_json::json;

use crate::{config::SegmentationMode, dataplane::state::SharedState};

pub async fn healthz() -> Response {
    Json(json!({"status": "ok"})).into_response()
}

pub async fn readyz(State(state): State<SharedState>) -> Response {
    // The store: one cheap read, off the async threads (SQLite is blocking).
    let store = state.identity.store().clone();
    let store_ok = tokio::task::spawn_blocking(move || store.auth_epoch().is_ok())
        .await
        .unwrap_or(false);
    let mut ready = store_ok;
    let mut pools = serde_json::Map::new();
    for pool in state.pools.iter() {
        let pool_ready = pool.ready();
        ready &= pool_ready;
        pools.insert(
            pool.name.clone(),
            json!({"ready": pool_ready, "hosts": pool.status()}),
        );
    }
    // With `mode = "off"` readiness says plainly that nothing is enforced. With "enforce" the
    // supervisor starts the worker only once the hooks are in place, then checks every few
    // seconds what the kernel reports; a hook whose link is not attached (until the
    // supervisor restores it) makes the host "degraded" and not ready.
    let kernel = state.kernel.load();
    let not_attached = kernel.gateway_not_attached();
    let segmentation = match state.config.segmentation().mode {
        SegmentationMode::Off => "off",
        SegmentationMode::Enforce if !not_attached.is_empty() => "degraded",
        SegmentationMode::Enforce => "enforce",
    };
    ready &= segmentation != "degraded";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({
        "status": if ready { "ready" } else { "not_ready" },
        "store": if store_ok { "ok" } else { "unreachable" },
        "pools": pools,
        "segmentation": segmentation,
        "hooks_not_attached": not_attached,
    });
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::{
        auth::Identity,
        config::Config,
        dataplane::state::AppState,
        metrics::{KernelCounters, LinkAttached},
    };

    async fn body(state: &SharedState) -> serde_json::Value {
        let resp = readyz(State(state.clone())).await;
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    }

    /// `/readyz` reports what the kernel runs (as the supervisor last saw it), not what the
    /// config says: a hook whose link is not attached makes it `degraded`, named.
    #[tokio::test]
    async fn readyz_reports_the_kernels_link_state() {
        let dir = tempfile::tempdir().unwrap();
        let config = Config::from_str(
            &dir.path().join("moat.toml"),
            &format!(
                "[server]\ndata_dir = \"{}\"\n[pools.p]\nhosts = [\"127.0.0.1:1\"]\n\
                 [segmentation]\nmode = \"enforce\"\n",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let identity = Identity::open(&config).unwrap();
        let state: SharedState = Arc::new(AppState::new(config, identity, Arc::default()).unwrap());
        let links = |severed: &str| KernelCounters {
            gateway_links: ["connect4", "cgroup_egress"]
                .map(|h| LinkAttached {
                    hook: h.into(),
                    attached: h != severed,
                })
                .to_vec(),
            ..Default::default()
        };
        state.kernel.store(Arc::new(links("")));
        assert_eq!(body(&state).await["segmentation"], "enforce");
        state.kernel.store(Arc::new(links("connect4")));
        let b = body(&state).await;
        assert_eq!(b["segmentation"], "degraded");
        assert_eq!(b["status"], "not_ready");
        assert_eq!(b["hooks_not_attached"], serde_json::json!(["connect4"]));
    }
}
