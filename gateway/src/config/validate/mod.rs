//! Checks of the file as written, one function per section, run by `Config::parse` in this
//! order: pools (with their credentials and TLS), models, server, tenancy (roles, tenants,
//! dedicated pools, quotas), admin, segmentation, auth, guardrails. Each returns the first problem it finds
//! as an [`Invalid`]: the dotted key and the reason; the loader adds the file's name.

mod auth;
mod client_cert;
mod credentials;
mod guardrails;
mod models;
mod pools;
mod segmentation;
mod server;
mod store;
mod tenancy;

use std::collections::BTreeMap;

pub use self::store::{PgTls, pg_tls};
pub(super) use self::{
    auth::auth,
    guardrails::guardrails,
    models::models,
    pools::pools,
    segmentation::segmentation,
    server::{admin, server},
    store::store,
    tenancy::tenancy,
};

/// A problem with one key.
#[derive(Debug)]
pub(super) struct Invalid {
    /// Dotted path (`pools.gpu.hosts[0]`); empty for the file as a whole.
    pub key: String,
    pub reason: String,
}

impl Invalid {
    pub(super) fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// The names in `map`, for "known: …" hints.
fn known<V>(map: &BTreeMap<String, V>) -> String {
    if map.is_empty() {
        "none".to_owned()
    } else {
        map.keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}
