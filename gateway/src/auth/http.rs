//! The identity endpoints and the bearer check, as axum pieces for the routers to mount
//! (`dataplane::app`; the admin plane mounts the bearer check only):
//! [`BearerLayer`] (the bearer check), [`token`] (`POST /v1/auth/token`), [`revoke`]
//! (`POST /v1/auth/revoke`) and [`jwks`] (`GET /.well-known/jwks.json`).
//!
//! Request bodies are parsed strictly — JSON or form, unknown and duplicate fields refused —
//! and never logged.

use std::{
    convert::Infallible,
    future::Future,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    Json,
    body::Bytes,
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use tower::Service;
use zeroize::Zeroizing;

use super::{Identity, service::AuthError};
use crate::error::ApiError;

/// Largest body the token and revoke endpoints read.
const MAX_BODY: usize = 16 * 1024;

fn unauthorized(e: AuthError) -> Response {
    let mut resp = ApiError::from(e.clone()).into_response();
    if resp.status() == axum::http::StatusCode::UNAUTHORIZED {
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The bearer token of the request: exactly one `Authorization: Bearer <token>` header.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return None;
    }
    Some(token)
}

/// Step 4 of the data plane's pipeline (and the admin plane's bearer check) as a tower layer,
/// mounted as a `route_layer`: [`RequireBearer`] around the routes it guards.
#[derive(Clone)]
pub struct BearerLayer {
    identity: Arc<Identity>,
}

impl BearerLayer {
    pub fn new(identity: Arc<Identity>) -> Self {
        Self { identity }
    }
}

impl<S> tower::Layer<S> for BearerLayer {
    type Service = RequireBearer<S>;

    fn layer(&self, inner: S) -> RequireBearer<S> {
        RequireBearer {
            identity: self.identity.clone(),
            inner,
        }
    }
}

/// Authenticates the bearer and puts the [`super::Principal`] into the request's extensions,
/// as the `Arc` the identity cache shares (handlers take it as an extractor, the inference
/// handler takes the `Arc` out), before calling the route, or answers 401
/// (OpenAI-shaped, with `WWW-Authenticate: Bearer`).
#[derive(Clone)]
pub struct RequireBearer<S> {
    identity: Arc<Identity>,
    inner: S,
}

impl<S> Service<Request> for RequireBearer<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Response;
    type Error = Infallible;
    type Future = BearerFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request) -> Self::Future {
        let Some(token) = bearer(req.headers()) else {
            Identity::audit_failure("bearer", "missing bearer", None, None);
            return BearerFuture::Refused {
                resp: Some(unauthorized(AuthError::MissingBearer)),
            };
        };
        // A cached API key is decided at once: the route is called with no boxed future.
        match self.identity.authenticate_cached(token) {
            Some(Ok(p)) => {
                req.extensions_mut().insert(p);
                return BearerFuture::Passed {
                    inner: self.inner.call(req),
                };
            }
            Some(Err(e)) => {
                return BearerFuture::Refused {
                    resp: Some(unauthorized(e)),
                };
            }
            None => {}
        }
        let identity = self.identity.clone();
        // The service made ready is the one called; a clone stays for the next request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        BearerFuture::Checking {
            check: Box::pin(async move {
                // The same headers as above: there is a bearer.
                let Some(token) = bearer(req.headers()) else {
                    return Ok(unauthorized(AuthError::MissingBearer));
                };
                match identity.authenticate(token).await {
                    Ok(p) => {
                        req.extensions_mut().insert(p);
                        inner.call(req).await
                    }
                    Err(e) => Ok(unauthorized(e)),
                }
            }),
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of [`RequireBearer`]: the route's, the 401, or the check that awaits the
    /// store (one boxed future) and then the route's.
    #[project = BearerProj]
    pub enum BearerFuture<F> {
        Passed { #[pin] inner: F },
        Refused { resp: Option<Response> },
        Checking { check: Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>> },
    }
}

impl<F> Future for BearerFuture<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BearerProj::Passed { inner } => inner.poll(cx),
            BearerProj::Refused { resp } => {
                Poll::Ready(Ok(resp.take().expect("polled after completion")))
            }
            BearerProj::Checking { check } => check.as_mut().poll(cx),
        }
    }
}

/// Parses a JSON or form body into `T`, strictly.
fn parse_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.len() > MAX_BODY {
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request body too large",
        ));
    }
    let ctype = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    // Parse errors say which field is wrong but never echo a value (it may be a secret).
    match ctype.as_str() {
        "application/json" => serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("invalid JSON body ({})", e.classify_name()))
        }),
        "application/x-www-form-urlencoded" => serde_urlencoded::from_bytes(body)
            .map_err(|_| ApiError::bad_request("invalid form body")),
        _ => Err(ApiError::new(
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "use Content-Type application/json or application/x-www-form-urlencoded",
        )),
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        use serde_json::error::Category;
        match self.classify() {
            Category::Io => "io",
            Category::Syntax => "syntax error",
            Category::Data => "unknown, duplicate, missing or mistyped field",
            Category::Eof => "truncated",
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    grant_type: String,
    #[serde(default)]
    api_key: Option<Zeroizing<String>>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<Zeroizing<String>>,
    #[serde(default)]
    refresh_token: Option<Zeroizing<String>>,
}

fn source_ip(req: &Request) -> IpAddr {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

async fn read_body(req: Request) -> Result<(HeaderMap, Bytes), ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY).await.map_err(|_| {
        ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request body too large",
        )
    })?;
    Ok((parts.headers, bytes))
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

fn unexpected(param: &str) -> ApiError {
    ApiError::bad_request(format!("`{param}` does not belong to this grant_type")).with_param(param)
}

fn missing(param: &str) -> ApiError {
    ApiError::bad_request(format!("`{param}` is required")).with_param(param)
}

/// `POST /v1/auth/token`.
pub async fn token(State(identity): State<Arc<Identity>>, req: Request) -> Response {
    let source = identity.client_address(source_ip(&req), req.headers());
    let result = async {
        let (headers, body) = read_body(req).await?;
        let r: TokenRequest = parse_body(&headers, &body)?;
        let resp = match r.grant_type.as_str() {
            "api_key" => {
                for (present, name) in [
                    (r.username.is_some(), "username"),
                    (r.password.is_some(), "password"),
                    (r.refresh_token.is_some(), "refresh_token"),
                ] {
                    if present {
                        return Err(unexpected(name));
                    }
                }
                let key = r.api_key.ok_or_else(|| missing("api_key"))?;
                identity.grant_api_key(&key).await?
            }
            "password" => {
                for (present, name) in [
                    (r.api_key.is_some(), "api_key"),
                    (r.refresh_token.is_some(), "refresh_token"),
                ] {
                    if present {
                        return Err(unexpected(name));
                    }
                }
                let user = r.username.ok_or_else(|| missing("username"))?;
                let pw = r.password.ok_or_else(|| missing("password"))?;
                identity.grant_password(&user, pw, source).await?
            }
            "refresh_token" => {
                for (present, name) in [
                    (r.api_key.is_some(), "api_key"),
                    (r.username.is_some(), "username"),
                    (r.password.is_some(), "password"),
                ] {
                    if present {
                        return Err(unexpected(name));
                    }
                }
                let rt = r.refresh_token.ok_or_else(|| missing("refresh_token"))?;
                identity.grant_refresh(&rt).await?
            }
            _ => {
                return Err(ApiError::bad_request(
                    "unsupported grant_type (use api_key, password or refresh_token)",
                )
                .with_param("grant_type")
                .with_code("unsupported_grant_type"));
            }
        };
        Ok::<_, ApiError>(resp)
    }
    .await;
    match result {
        Ok(resp) => no_store(Json(resp).into_response()),
        Err(e) => no_store(e.into_response()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    token: Zeroizing<String>,
    #[serde(default)]
    #[allow(dead_code)] // accepted per RFC 7009; the token's shape tells its kind
    token_type_hint: Option<String>,
}

/// `POST /v1/auth/revoke`: ends the session of a refresh or access token. Always 200 for a
/// well-formed request, whether or not the token was known (RFC 7009).
pub async fn revoke(State(identity): State<Arc<Identity>>, req: Request) -> Response {
    let result = async {
        let (headers, body) = read_body(req).await?;
        let r: RevokeRequest = parse_body(&headers, &body)?;
        identity.revoke(&r.token).await?;
        Ok::<_, ApiError>(())
    }
    .await;
    match result {
        Ok(()) => no_store(Json(serde_json::json!({})).into_response()),
        Err(e) => no_store(e.into_response()),
    }
}

/// `GET /.well-known/jwks.json`.
pub async fn jwks(State(identity): State<Arc<Identity>>) -> Response {
    let mut resp = Json(identity.jwks()).into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}
