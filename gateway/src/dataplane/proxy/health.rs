//! Active health checks: one task per pool host sends `GET <health_path>` (with the pool's
//! credential) every `health_interval_ms`; a 2xx within `health_timeout_ms` is healthy. The
//! verdict goes to the host's routing state; changes are logged.

use std::sync::Arc;

use axum::http::{Method, Request, header};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use super::{Upstream, Upstreams};
use crate::dataplane::route::{Host, Pools};

/// The running checkers; dropping this stops them (say when a reload replaces the pools).
pub struct HealthCheckers(Vec<AbortHandle>);

impl Drop for HealthCheckers {
    fn drop(&mut self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts a checker for every host of every pool. Must run inside the tokio runtime.
pub fn spawn(pools: &Pools, upstreams: &Upstreams) -> HealthCheckers {
    let mut handles = Vec::new();
    for pool in pools.iter() {
        let Some(upstream) = upstreams.get(&pool.name) else {
            continue;
        };
        for host in &pool.hosts {
            let task = tokio::spawn(run(upstream.clone(), pool.name.clone(), host.clone()));
            handles.push(task.abort_handle());
        }
    }
    HealthCheckers(handles)
}

async fn run(upstream: Arc<Upstream>, pool: String, host: Arc<Host>) {
    let mut tick = tokio::time::interval(upstream.health_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<bool> = None;
    loop {
        tick.tick().await;
        let ok = probe(&upstream, host.index).await;
        host.set_checked(ok.is_ok());
        if last != Some(ok.is_ok()) {
            match &ok {
                Ok(()) => info!(pool, host = %host.name, "upstream host healthy"),
                Err(why) => {
                    warn!(pool, host = %host.name, reason = %why, "upstream host unhealthy")
                }
            }
        }
        last = Some(ok.is_ok());
    }
}

async fn probe(upstream: &Upstream, host: usize) -> Result<(), String> {
    let mut req = Request::new(Full::new(Bytes::new()));
    *req.method_mut() = Method::GET;
    *req.uri_mut() = upstream.health_path.clone().into();
    if let Some(c) = &upstream.credential {
        req.headers_mut().insert(header::AUTHORIZATION, c.clone());
    }
    let check = async {
        let resp = upstream
            .client
            .send(host, req)
            .await
            // The whole chain: a TLS refusal (the host does not accept the gateway's client
            // certificate) is only named in the sources.
            .map_err(|e| super::error_chain(&e))?;
        let status = resp.status();
        // Read the (small) body so the connection is ready for reuse.
        let _ = Limited::new(resp.into_body(), 64 * 1024).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("status {}", status.as_u16()))
        }
    };
    match tokio::time::timeout(upstream.health_timeout, check).await {
        Ok(r) => r,
        Err(_) => Err("timed out".to_owned()),
    }
}
