//! The admin plane: keys, users, tenants, effective policy and `/metrics` (the kernel's
//! counters, Prometheus text, `audit:read`) over HTTP, on its own loopback
//! listener (`admin.listen`, bound by the supervisor and passed down like the data plane's;
//! never the data-plane port, which has no admin route at all).
//!
//! Every route needs a bearer (the same credentials as the data plane) and its own permission
//! (`admin:keys`, `admin:users`, `admin:tenants`, `admin:policy`, `audit:read` for `/metrics`
//! and `/admin/audit`); an inference
//! key gets 403. Users and keys are administered within the caller's own tenant only; creating and
//! listing tenants needs `admin:tenants`. What a caller may hand out (roles, keys) is bounded
//! by what it holds, and global permissions never (`auth::admin` decides; a refusal is a 403).
//! Changes take effect in this process at once (the identity caches are evicted) and in others
//! within one epoch poll. Key secrets appear once, in the answer that creates them, and are
//! never logged.

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use serde_json::json;
use tracing::info;

use arc_swap::ArcSwap;

use crate::{
    auth::{Identity, Principal, admin as auth_admin, http as auth_http},
    dataplane::authz::{self, Permissions},
    dataplane::state::SharedState,
    error::ApiError,
    metrics::KernelCounters,
};

/// Hands the admin plane the state of the config in force (it changes on reload).
pub type Current = Arc<dyn Fn() -> SharedState + Send + Sync>;

#[derive(Clone)]
struct Admin {
    current: Current,
    identity: Arc<Identity>,
    kernel: Arc<ArcSwap<KernelCounters>>,
}

/// The admin router. `kernel` holds the latest kernel counters the supervisor sent.
pub fn router(
    current: Current,
    identity: Arc<Identity>,
    kernel: Arc<ArcSwap<KernelCounters>>,
) -> Router {
    let state = Admin {
        current,
        identity: identity.clone(),
        kernel,
    };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/admin/tenants", get(list_tenants).post(add_tenant))
        .route("/admin/users", get(list_users).post(add_user))
        .route("/admin/users/{username}/disable", post(disable_user))
        .route("/admin/users/{username}/roles", post(set_roles))
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{key_id}/revoke", post(revoke_key))
        .route("/admin/keys/{key_id}/narrow", post(narrow_key))
        .route("/admin/policy", get(policy))
        .route("/admin/audit", get(audit_records))
        .route_layer(auth_http::BearerLayer::new(identity))
        .with_state(state)
        .fallback(|| async { ApiError::not_found("no such route") })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed() })
        .layer(crate::dataplane::request_id::Layer)
}

type Result<T> = std::result::Result<T, ApiError>;

/// An identity operation the store or its checks refused (a bad name, no such user, …): a 400
/// whose message is the reason, which never holds a secret.
///
/// A grant beyond the caller's own permissions is a 403 (`auth::admin` decides it).
fn refused(e: anyhow::Error) -> ApiError {
    if e.downcast_ref::<auth_admin::Forbidden>().is_some() {
        return ApiError::forbidden(format!("{e:#}")).with_code("permission_denied");
    }
    ApiError::bad_request(format!("{e:#}"))
}

/// A JSON body parsed strictly (unknown fields refused), its errors OpenAI-shaped 400s.
struct Body<T>(T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

impl Admin {
    /// The caller must hold `perm` under the config in force.
    fn require(&self, p: &Principal, perm: &str) -> Result<SharedState> {
        let state = (self.current)();
        if Permissions::of(&state.config, &p.roles).admin(perm) {
            Ok(state)
        } else {
            info!(user = %p.username, tenant = %p.tenant, permission = perm, "admin denied");
            crate::audit::emit(crate::audit::Event::AuthzDenied {
                permission: perm.to_owned(),
                user_id: Some(p.user_id.clone()),
                key_id: p.key_id.clone(),
                tenant: Some(p.tenant.clone()),
                plane: "admin".into(),
            });
            Err(
                ApiError::forbidden(format!("this needs the `{perm}` permission"))
                    .with_code("permission_denied"),
            )
        }
    }

    /// Runs a store operation off the async threads, on behalf of `p` under the config of
    /// `state`: what it may hand out is bounded by what it holds (`auth::admin`).
    async fn store<T: Send + 'static>(
        &self,
        p: &Principal,
        state: &SharedState,
        f: impl FnOnce(&auth_admin::Admin<'_>) -> anyhow::Result<T> + Send + 'static,
    ) -> Result<T> {
        let (identity, state, p) = (self.identity.clone(), state.clone(), p.clone());
        tokio::task::spawn_blocking(move || {
            f(&identity.admin_as(auth_admin::Grantor {
                config: &state.config,
                principal: &p,
            }))
        })
        .await
        .map_err(|_| ApiError::internal())?
        .map_err(refused)
    }

    /// The user, if it is in the caller's tenant (otherwise it does not exist for the caller).
    async fn own_user(
        &self,
        p: &Principal,
        state: &SharedState,
        username: &str,
    ) -> Result<crate::store::User> {
        let name = username.to_owned();
        let tenant = p.tenant.clone();
        self.store(p, state, move |a| {
            Ok(a.users()?.into_iter().find(|u| u.username == name))
        })
        .await?
        .filter(|u| u.tenant == tenant)
        .ok_or_else(|| ApiError::not_found(format!("no user `{username}` in your tenant")))
    }

    async fn own_key(
        &self,
        p: &Principal,
        state: &SharedState,
        key_id: &str,
    ) -> Result<crate::store::ApiKeyRecord> {
        let tenant = p.tenant.clone();
        self.store(p, state, |a| a.keys(None))
            .await?
            .into_iter()
            .find(|k| k.key_id == key_id && k.tenant == tenant)
            .ok_or_else(|| ApiError::not_found(format!("no key `{key_id}` in your tenant")))
    }
}

async fn list_tenants(State(a): State<Admin>, p: Principal) -> Result<Response> {
    let state = a.require(&p, "admin:tenants")?;
    let t = a.store(&p, &state, |s| s.tenants()).await?;
    Ok(Json(json!({ "tenants": t })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTenant {
    name: String,
}

async fn add_tenant(
    State(a): State<Admin>,
    p: Principal,
    Body(t): Body<NewTenant>,
) -> Result<Response> {
    let state = a.require(&p, "admin:tenants")?;
    let name = t.name.clone();
    a.store(&p, &state, move |s| s.add_tenant(&name)).await?;
    info!(by = %p.username, tenant = %t.name, event = "tenant_added");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({"name": t.name})),
    )
        .into_response())
}

async fn list_users(State(a): State<Admin>, p: Principal) -> Result<Response> {
    let state = a.require(&p, "admin:users")?;
    let tenant = p.tenant.clone();
    let users: Vec<_> = a
        .store(&p, &state, |s| s.users())
        .await?
        .into_iter()
        .filter(|u| u.tenant == tenant)
        .collect();
    Ok(Json(json!({ "users": users })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// Users are created in the caller's tenant: the body has no tenant field.
async fn add_user(
    State(a): State<Admin>,
    p: Principal,
    Body(u): Body<NewUser>,
) -> Result<Response> {
    let state = a.require(&p, "admin:users")?;
    let (name, tenant, roles) = (u.username.clone(), p.tenant.clone(), u.roles.clone());
    let id = a
        .store(&p, &state, move |s| {
            s.add_user(&name, &tenant, &roles, None)
        })
        .await?;
    info!(by = %p.username, user_id = %id, tenant = %p.tenant, event = "user_added");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({"id": id, "username": u.username, "tenant": p.tenant, "roles": u.roles})),
    )
        .into_response())
}

async fn disable_user(
    State(a): State<Admin>,
    p: Principal,
    Path(username): Path<String>,
) -> Result<Response> {
    let state = a.require(&p, "admin:users")?;
    a.own_user(&p, &state, &username).await?;
    // As the caller (not the root identity), so the audit record names who did it.
    let name = username.clone();
    let (user_id, changed) = a.store(&p, &state, move |s| s.disable_user(&name)).await?;
    a.identity.evict_user(&user_id);
    info!(by = %p.username, user_id = %user_id, event = "user_disabled");
    Ok(Json(json!({"username": username, "changed": changed})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Roles {
    roles: Vec<String>,
}

async fn set_roles(
    State(a): State<Admin>,
    p: Principal,
    Path(username): Path<String>,
    Body(r): Body<Roles>,
) -> Result<Response> {
    let state = a.require(&p, "admin:users")?;
    let u = a.own_user(&p, &state, &username).await?;
    let (name, roles) = (username.clone(), r.roles.clone());
    a.store(&p, &state, move |s| s.set_user_roles(&name, &roles))
        .await?;
    a.identity.evict_user(&u.id);
    info!(by = %p.username, user_id = %u.id, event = "user_roles_changed");
    Ok(Json(json!({"username": username, "roles": r.roles})).into_response())
}

async fn list_keys(State(a): State<Admin>, p: Principal) -> Result<Response> {
    let state = a.require(&p, "admin:keys")?;
    let tenant = p.tenant.clone();
    let keys: Vec<_> = a
        .store(&p, &state, |s| s.keys(None))
        .await?
        .into_iter()
        .filter(|k| k.tenant == tenant)
        .collect();
    Ok(Json(json!({ "keys": keys })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    user: String,
    #[serde(default)]
    name: String,
    roles: Option<Vec<String>>,
    expires_in_days: Option<u64>,
}

async fn create_key(
    State(a): State<Admin>,
    p: Principal,
    Body(k): Body<NewKey>,
) -> Result<Response> {
    let state = a.require(&p, "admin:keys")?;
    a.own_user(&p, &state, &k.user).await?;
    let created = a
        .store(&p, &state, move |s| {
            s.create_key(&k.user, &k.name, k.roles.as_deref(), k.expires_in_days)
        })
        .await?;
    info!(by = %p.username, key_id = %created.key_id, event = "key_created");
    Ok((
        axum::http::StatusCode::CREATED,
        Json(json!({"key_id": created.key_id, "key": created.plaintext.as_str()})),
    )
        .into_response())
}

async fn revoke_key(
    State(a): State<Admin>,
    p: Principal,
    Path(key_id): Path<String>,
) -> Result<Response> {
    let state = a.require(&p, "admin:keys")?;
    a.own_key(&p, &state, &key_id).await?;
    let id = key_id.clone();
    let changed = a.store(&p, &state, move |s| s.revoke_key(&id)).await?;
    a.identity.evict_key(&key_id);
    info!(by = %p.username, key_id = %key_id, event = "key_revoked");
    Ok(Json(json!({"key_id": key_id, "changed": changed})).into_response())
}

async fn narrow_key(
    State(a): State<Admin>,
    p: Principal,
    Path(key_id): Path<String>,
    Body(r): Body<Roles>,
) -> Result<Response> {
    let state = a.require(&p, "admin:keys")?;
    a.own_key(&p, &state, &key_id).await?;
    let (id, roles) = (key_id.clone(), r.roles.clone());
    a.store(&p, &state, move |s| s.narrow_key(&id, &roles))
        .await?;
    a.identity.evict_key(&key_id);
    info!(by = %p.username, key_id = %key_id, event = "key_narrowed");
    Ok(Json(json!({"key_id": key_id, "roles": r.roles})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyQuery {
    user: Option<String>,
}

/// Prometheus text: the kernel's allow/deny counters and the gateway's own metrics (needs
/// `audit:read`).
async fn metrics(State(a): State<Admin>, p: Principal) -> Result<Response> {
    let state = a.require(&p, "audit:read")?;
    let kernel = a.kernel.load();
    let mut text = kernel.render();
    let pools: Vec<(String, Vec<(String, bool)>)> = state
        .pools
        .iter()
        .map(|pool| {
            let hosts = pool
                .status()
                .into_iter()
                .map(|h| (h.host, h.ready))
                .collect();
            (pool.name.clone(), hosts)
        })
        .collect();
    // Written by the supervisor; dropped there and here (the worker's full socket).
    let dropped = kernel.audit_dropped + crate::audit::sink::counts().1;
    crate::metrics::gateway::METRICS.render(&mut text, &pools, (kernel.audit_written, dropped));
    text.push_str(&crate::guardrails::metrics::render());
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// What a user of the caller's tenant (default: the caller) may use, and where it would go.
async fn policy(
    State(a): State<Admin>,
    p: Principal,
    Query(q): Query<PolicyQuery>,
) -> Result<Response> {
    let state = a.require(&p, "admin:policy")?;
    let roles = match &q.user {
        None => p.roles.clone(),
        Some(u) => a.own_user(&p, &state, u).await?.roles,
    };
    Ok(Json(authz::effective(&state.config, &p.tenant, &roles)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default)]
    since: u64,
    limit: Option<usize>,
}

/// Most records one `GET /admin/audit` answers with; page on with `since`.
const AUDIT_PAGE_MAX: usize = 10_000;

/// `GET /admin/audit?since=<seq>&limit=<n>`: records after `since`, oldest first (needs
/// `audit:read`). A caller that also holds `admin:tenants` sees every record; any other
/// only its own tenant's. `next` is the `since` of the next page.
async fn audit_records(
    State(a): State<Admin>,
    p: Principal,
    axum::extract::RawQuery(q): axum::extract::RawQuery,
) -> Result<Response> {
    let state = a.require(&p, "audit:read")?;
    let q: AuditQuery = serde_urlencoded::from_str(q.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("query: {e}")))?;
    let limit = q.limit.unwrap_or(1000);
    if limit == 0 || limit > AUDIT_PAGE_MAX {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {AUDIT_PAGE_MAX}"
        )));
    }
    let everyone = Permissions::of(&state.config, &p.roles).admin("admin:tenants");
    let tenant = (!everyone).then(|| p.tenant.clone());
    let dir = state.config.audit_dir();
    let records = tokio::task::spawn_blocking(move || {
        crate::audit::read::since(&dir, q.since, tenant.as_deref(), limit)
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(|e| {
        tracing::error!(error = %e, "cannot read the audit log");
        ApiError::internal()
    })?;
    let next = records
        .last()
        .and_then(|r| r.get("seq").and_then(serde_json::Value::as_u64))
        .unwrap_or(q.since);
    Ok(Json(json!({ "records": records, "next": next })).into_response())
}
