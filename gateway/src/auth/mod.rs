//! Identity: who is calling. API keys, passwords, access tokens (JWT), rotating refresh tokens,
//! and the bearer check in front of the data plane.
//!
//! - [`Identity`] (in `service`) ties them together over a [`crate::store::Store`];
//! - [`Principal`] is what a handler receives once the caller is authenticated (an axum
//!   extractor: take `principal: Principal` as a handler argument);
//! - [`http`] holds the token, revoke and JWKS endpoints and the bearer check (a tower layer);
//! - [`admin`] holds the operator's operations (the CLI, and the admin plane bounded by what
//!   its caller holds);
//! - [`source`] says which client a token request comes from (trusted proxies, IPv6 /64).

pub mod admin;
pub mod api_key;
pub mod cache;
pub mod http;
pub mod jwt;
pub mod password;
pub mod refresh;
pub mod seal;
pub mod secrets;
mod service;
#[cfg(test)]
mod service_tests;
pub mod source;

use std::sync::Arc;

use axum::{extract::FromRequestParts, http::request::Parts};
use serde::Serialize;

pub use service::{AuthError, Identity, TokenResponse};

use crate::error::ApiError;

/// Unix seconds, UTC.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// How the caller authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthMethod {
    ApiKey,
    AccessToken,
}

/// The authenticated caller. Tenant and roles come only from the credential and the store,
/// never from the request. Inserted into the request's extensions, as an `Arc<Principal>`, by
/// the bearer check (`http::BearerLayer`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Principal {
    pub user_id: String,
    pub username: String,
    pub tenant: String,
    /// The API key used, directly or to open the session of this access token.
    pub key_id: Option<String>,
    /// The session (refresh family) of an access token.
    pub session_id: Option<String>,
    /// Effective roles: the user's, narrowed to the key's when a key is involved.
    pub roles: Vec<String>,
    pub method: AuthMethod,
}

/// A key's effective roles: those it names that its user still has (narrow, never widen).
pub fn effective_roles(user_roles: &[String], key_roles: Option<&[String]>) -> Vec<String> {
    match key_roles {
        None => user_roles.to_vec(),
        Some(k) => k
            .iter()
            .filter(|r| user_roles.contains(r))
            .cloned()
            .collect(),
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Only the bearer check inserts it; a route outside it has no principal, and
        // failing closed here keeps a mis-wired route from serving anonymously.
        parts
            .extensions
            .get::<Arc<Principal>>()
            .map(|p| Principal::clone(p))
            .ok_or_else(|| ApiError::unauthorized("missing bearer credential"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_narrow_and_never_widen() {
        let user = vec!["a".to_string(), "b".to_string()];
        assert_eq!(effective_roles(&user, None), user);
        let key = vec!["b".to_string(), "admin".to_string()];
        assert_eq!(effective_roles(&user, Some(&key)), vec!["b".to_string()]);
    }
}
