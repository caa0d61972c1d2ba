//! What every data-plane handler can reach: the config in force and the live state built from
//! it, one [`AppState`] per config generation (a reload builds a new one; the quota counters
//! and the identity service carry over). A leaf module: the router, the handlers and the admin
//! plane import it, it imports none of them.

use std::sync::Arc;

use crate::{
    auth::Identity,
    config::Config,
    dataplane::{proxy::Upstreams, quota::Quotas, route::Pools},
    metrics::KernelCounters,
};
use arc_swap::ArcSwap;

pub struct AppState {
    pub config: Config,
    pub identity: Arc<Identity>,
    /// Live routing state of every pool (outstanding requests, health, ejection).
    pub pools: Pools,
    /// Every pool's upstream client and request settings.
    pub upstreams: Upstreams,
    /// Quota counters: shared across reloads (owned by the worker's `Shared`).
    pub quotas: Arc<Quotas>,
    /// The latest kernel snapshot the supervisor sent (counters and whether every hook's link
    /// is attached), shared across reloads; `/readyz` reports from it.
    pub kernel: Arc<ArcSwap<KernelCounters>>,
}

impl AppState {
    pub fn new(
        config: Config,
        identity: Arc<Identity>,
        quotas: Arc<Quotas>,
    ) -> anyhow::Result<Self> {
        let pools = Pools::from_config(&config);
        let upstreams = Upstreams::from_config(&config)?;
        Ok(Self {
            config,
            identity,
            pools,
            upstreams,
            quotas,
            kernel: Arc::default(),
        })
    }
}

pub type SharedState = Arc<AppState>;
