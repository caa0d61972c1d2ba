//! [`Identity`]: the authentication service. Verifies bearers (API keys and access tokens)
//! through bounded caches, runs the three grants of the token endpoint, revokes sessions, and
//! keeps the caches honest: local revocations evict at once, and the store's revocation epoch
//! is polled so changes made by other processes (the CLI, other replicas) land within one poll.
//! The token endpoint's grants and revocation are in [`grants`].

mod grants;

pub use grants::TokenResponse;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{
    AuthMethod, Principal, api_key,
    cache::TtlCache,
    effective_roles,
    jwt::{AccessClaims, JwtError, KeyRing, Rotation, SigningAlgorithm, VerifyParams},
    now,
    password::PasswordGate,
    refresh,
    secrets::{self, Pepper},
    source::TrustedProxies,
};
use crate::{
    config::{AuthConfig, Config},
    error::ApiError,
    store::{Session, Store, StoreResult},
};

/// Why authentication failed. Each maps to one fixed client answer; the variants that must not
/// be told apart (unknown key id, wrong secret, revoked key) share one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    MissingBearer,
    InvalidApiKey,
    InvalidAccessToken,
    RefreshTokenAsBearer,
    InvalidGrant,
    Throttled(u64),
    Busy(u64),
    Unavailable,
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::MissingBearer => ApiError::unauthorized(
                "missing bearer credential: send `Authorization: Bearer <api key or access token>`",
            ),
            AuthError::InvalidApiKey => ApiError::unauthorized("invalid API key"),
            AuthError::InvalidAccessToken => {
                ApiError::unauthorized("invalid access token").with_code("invalid_token")
            }
            AuthError::RefreshTokenAsBearer => ApiError::unauthorized(
                "a refresh token is not a bearer credential: exchange it at /v1/auth/token",
            )
            .with_code("invalid_token"),
            AuthError::InvalidGrant => {
                ApiError::unauthorized("invalid grant").with_code("invalid_grant")
            }
            AuthError::Throttled(s) => ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too many failed attempts; try again later",
            )
            .with_code("login_throttled")
            .with_retry_after(s),
            AuthError::Busy(s) => {
                ApiError::unavailable("authentication is busy; try again").with_retry_after(s)
            }
            AuthError::Unavailable => ApiError::unavailable("identity store unavailable"),
        }
    }
}

struct CachedKey {
    secret_hmac: Vec<u8>,
    expires_at: Option<i64>,
    principal: Arc<Principal>,
}

pub struct Identity {
    store: Arc<dyn Store>,
    pepper: Pepper,
    keys: Arc<KeyRing>,
    params: VerifyParams,
    access_ttl: u64,
    refresh_idle: i64,
    refresh_absolute: i64,
    key_cache: TtlCache<String, Arc<CachedKey>>,
    session_cache: TtlCache<String, Arc<Principal>>,
    /// Access tokens whose signature and claims verified, by SHA-256 of the token: an
    /// Ed25519 check per request would cost more than everything else on the path. A hit is
    /// the same bytes verified before; expiry is re-checked and the session looked up on
    /// every request all the same.
    token_cache: TtlCache<[u8; 32], Arc<AccessClaims>>,
    passwords: PasswordGate,
    /// Whose forwarding headers name the client for the per-source throttle.
    proxies: TrustedProxies,
    /// How long a just-rotated refresh token still gets its successor again (seconds).
    refresh_grace: i64,
    /// Moves on every local invalidation; a cache fill started before a move is discarded.
    generation: AtomicU64,
    /// Wakes whoever waits for the generation to move (open streams), once the caches are
    /// cleared: a stream that then asks whether its credential still stands is not answered
    /// from a cache entry about to go.
    moved: Arc<tokio::sync::Notify>,
    /// The store's revocation epoch as last seen.
    epoch: AtomicI64,
    poll: Duration,
    signing_check: Duration,
}

impl Identity {
    /// Opens the configured store and secrets (creating them on first start).
    pub fn open(config: &Config) -> anyhow::Result<Arc<Self>> {
        let store = crate::store::open(config)?;
        Ok(Arc::new(Self::new(config, store)?))
    }

    /// Builds the service over `store`, with secrets from the config's data directory.
    pub fn new(config: &Config, store: Arc<dyn Store>) -> anyhow::Result<Self> {
        let auth = config.auth();
        let secrets_dir = secrets::secrets_dir(&config.data_dir);
        let pepper = Pepper::load_or_create(&config.data_dir)?;
        let keys = match auth.algorithm {
            SigningAlgorithm::EdDSA => KeyRing::ed25519(
                store.clone(),
                &pepper,
                &secrets_dir,
                Rotation {
                    rotate_after: auth.signing_key_rotation_secs as i64,
                    overlap: auth.signing_key_overlap_secs as i64,
                },
                now(),
            )?,
            SigningAlgorithm::HS256 => {
                let path = match &auth.hs256_secret_file {
                    Some(p) => config.resolve(p),
                    None => secrets_dir.join("jwt-hs256.key"),
                };
                // The supervisor read an operator-named file the worker may not be able to.
                match config.captured.file(&path) {
                    Some(secret) => KeyRing::hs256_from(&path, secret)?,
                    None => KeyRing::hs256(&path)?,
                }
            }
        };
        Self::with_parts(auth, store, pepper, keys)
    }

    fn with_parts(
        auth: &AuthConfig,
        store: Arc<dyn Store>,
        pepper: Pepper,
        keys: KeyRing,
    ) -> anyhow::Result<Self> {
        let epoch = store.auth_epoch()?;
        let cache_ttl = Duration::from_secs(auth.cache_ttl_secs);
        let concurrency = match auth.password_concurrency {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        };
        Ok(Self {
            store,
            pepper,
            keys: Arc::new(keys),
            params: VerifyParams {
                issuer: auth.issuer.clone(),
                audience: auth.audience.clone(),
                leeway: auth.leeway_secs,
                max_lifetime: auth.access_token_ttl_secs,
            },
            access_ttl: auth.access_token_ttl_secs,
            refresh_idle: auth.refresh_idle_ttl_secs as i64,
            refresh_absolute: auth.refresh_absolute_ttl_secs as i64,
            key_cache: TtlCache::new(auth.cache_capacity, cache_ttl),
            session_cache: TtlCache::new(auth.cache_capacity, cache_ttl),
            token_cache: TtlCache::new(auth.cache_capacity, cache_ttl),
            passwords: PasswordGate::new(
                concurrency,
                auth.password_max_failures_per_user,
                auth.password_max_failures_per_source,
                Duration::from_secs(auth.password_lockout_secs),
            ),
            proxies: TrustedProxies::new(&auth.trusted_proxies),
            refresh_grace: auth.refresh_reuse_grace_secs as i64,
            generation: AtomicU64::new(0),
            moved: Arc::default(),
            epoch: AtomicI64::new(epoch),
            poll: Duration::from_millis(auth.revocation_poll_ms),
            signing_check: Duration::from_secs(60),
        })
    }

    /// For the live expiry check of `moat audit report`: this service, issuing access tokens
    /// that live `ttl` seconds. `leeway` replaces the verifier's clock-skew allowance: only
    /// the report's tests use it, to show the check fails when expiry is not enforced as
    /// configured.
    pub fn for_expiry_probe(mut self, ttl: u64, leeway: Option<u64>) -> Self {
        self.access_ttl = ttl;
        if let Some(l) = leeway {
            self.params.leeway = l;
        }
        self
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn pepper(&self) -> &Pepper {
        &self.pepper
    }

    /// Runs a store call on the blocking pool.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Store) -> StoreResult<T> + Send + 'static,
    ) -> Result<T, AuthError> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(store.as_ref())).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                warn!(error = %e, "identity store call failed");
                Err(AuthError::Unavailable)
            }
            Err(_) => Err(AuthError::Unavailable),
        }
    }

    // ---- bearer verification -------------------------------------------------------------

    /// Authenticates the token of an `Authorization: Bearer` header. The principal is shared
    /// with the identity cache: a cached credential costs no copy of it.
    pub async fn authenticate(&self, bearer: &str) -> Result<Arc<Principal>, AuthError> {
        if bearer.starts_with(refresh::PREFIX) {
            Self::audit_failure("bearer", "refresh token presented as a bearer", None, None);
            return Err(AuthError::RefreshTokenAsBearer);
        }
        if bearer.starts_with(api_key::PREFIX) {
            return self.verify_api_key(bearer).await;
        }
        if bearer.bytes().filter(|&b| b == b'.').count() == 2 {
            return self.verify_access_token(bearer).await;
        }
        Self::audit_failure("bearer", "not an API key or access token", None, None);
        Err(AuthError::InvalidApiKey)
    }

    /// Records a refused credential (ids only, never the credential).
    pub(crate) fn audit_failure(
        method: &str,
        reason: &str,
        key_id: Option<&str>,
        sid: Option<&str>,
    ) {
        crate::audit::emit(crate::audit::Event::AuthFailure {
            method: method.to_owned(),
            reason: reason.to_owned(),
            user_id: None,
            key_id: key_id.map(str::to_owned),
            sid: sid.map(str::to_owned),
            source: None,
        });
    }

    /// Records an accepted credential. Called where a credential is checked against the store
    /// or a token's signature (cache misses, token grants), not on every cached request: one
    /// record per verification, not per request.
    pub(crate) fn audit_success(method: &str, p: &Principal) {
        crate::audit::emit(crate::audit::Event::AuthSuccess {
            method: method.to_owned(),
            user_id: Some(p.user_id.clone()),
            key_id: p.key_id.clone(),
            sid: p.session_id.clone(),
            tenant: Some(p.tenant.clone()),
        });
    }

    /// [`Self::authenticate`] for a bearer the key cache decides, without waiting: a cached API
    /// key's principal, or its refusal (logged and audited alike). `None`: anything else, for
    /// [`Self::authenticate`] to decide. (The bearer check calls the route at once then, with
    /// no boxed future.)
    pub fn authenticate_cached(&self, bearer: &str) -> Option<Result<Arc<Principal>, AuthError>> {
        if bearer.starts_with(refresh::PREFIX) {
            return None;
        }
        self.cached_key(&api_key::parse(bearer)?, now())
    }

    /// What the key cache says of a well-formed key at `t`; `None` if it is not cached.
    fn cached_key(
        &self,
        parsed: &api_key::ParsedKey<'_>,
        t: i64,
    ) -> Option<Result<Arc<Principal>, AuthError>> {
        let c = self.key_cache.get(parsed.key_id)?;
        if parsed.matches(&self.pepper, &c.secret_hmac) && c.expires_at.is_none_or(|e| t < e) {
            return Some(Ok(c.principal.clone()));
        }
        info!(event = "auth_failed", method = "api_key", key_id = %parsed.key_id, reason = "bad secret");
        Self::audit_failure("api_key", "bad secret", Some(parsed.key_id), None);
        Some(Err(AuthError::InvalidApiKey))
    }

    /// Verifies an API key. A malformed key or a bad checksum is refused before any look-up.
    pub async fn verify_api_key(&self, key: &str) -> Result<Arc<Principal>, AuthError> {
        let Some(parsed) = api_key::parse(key) else {
            info!(
                event = "auth_failed",
                method = "api_key",
                reason = "malformed"
            );
            Self::audit_failure("api_key", "malformed", None, None);
            return Err(AuthError::InvalidApiKey);
        };
        let t = now();
        if let Some(decided) = self.cached_key(&parsed, t) {
            return decided;
        }
        let key_id = parsed.key_id.to_owned();
        let generation = self.generation.load(Ordering::Acquire);
        let kid = key_id.clone();
        let rec = self.db(move |s| s.api_key(&kid)).await?;
        let Some(rec) = rec else {
            // Same work as a wrong secret, so timing does not tell unknown ids apart.
            let _ = parsed.matches(&self.pepper, &[0u8; 32]);
            info!(event = "auth_failed", method = "api_key", key_id = %key_id, reason = "unknown key");
            Self::audit_failure("api_key", "unknown key", Some(&key_id), None);
            return Err(AuthError::InvalidApiKey);
        };
        if !parsed.matches(&self.pepper, &rec.secret_hmac) {
            info!(event = "auth_failed", method = "api_key", key_id = %key_id, reason = "bad secret");
            Self::audit_failure("api_key", "bad secret", Some(&key_id), None);
            return Err(AuthError::InvalidApiKey);
        }
        if !rec.is_active(t) {
            info!(event = "auth_failed", method = "api_key", key_id = %key_id, reason = "inactive key");
            Self::audit_failure("api_key", "inactive key", Some(&key_id), None);
            return Err(AuthError::InvalidApiKey);
        }
        let principal = Arc::new(Principal {
            user_id: rec.user_id.clone(),
            username: rec.username.clone(),
            tenant: rec.tenant.clone(),
            key_id: Some(rec.key_id.clone()),
            session_id: None,
            roles: effective_roles(&rec.user_roles, Some(&rec.roles)),
            method: AuthMethod::ApiKey,
        });
        Self::audit_success("api_key", &principal);
        if self.generation.load(Ordering::Acquire) == generation {
            self.key_cache.insert(
                key_id,
                Arc::new(CachedKey {
                    secret_hmac: rec.secret_hmac,
                    expires_at: rec.expires_at,
                    principal: principal.clone(),
                }),
            );
        }
        Ok(principal)
    }

    /// Checks a token's signature and claims; a kid this replica does not know sends it to
    /// the store once (rate limited) for keys another replica just made.
    async fn verify_signature(&self, token: &str, t: i64) -> Result<AccessClaims, JwtError> {
        match self.keys.current().verify(token, &self.params, t) {
            Err(JwtError::UnknownKey) if self.keys.is_shared() => {}
            other => return other,
        }
        let keys = self.keys.clone();
        match tokio::task::spawn_blocking(move || keys.reload_if_allowed()).await {
            Ok(Ok(true)) => self.keys.current().verify(token, &self.params, t),
            Ok(Ok(false)) | Err(_) => Err(JwtError::UnknownKey),
            Ok(Err(e)) => {
                warn!(error = %e, "cannot reread the signing keys");
                Err(JwtError::UnknownKey)
            }
        }
    }

    /// Verifies an access token and that its session still stands.
    pub async fn verify_access_token(&self, token: &str) -> Result<Arc<Principal>, AuthError> {
        let t = now();
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let claims = match self.token_cache.get(&digest) {
            Some(c) if c.exp + self.params.leeway as i64 > t => c,
            Some(c) => {
                info!(
                    event = "auth_failed",
                    method = "access_token",
                    reason = "expired"
                );
                Self::audit_failure("access_token", "expired", None, Some(&c.sid));
                return Err(AuthError::InvalidAccessToken);
            }
            None => match self.verify_signature(token, t).await {
                Ok(c) => {
                    let c = Arc::new(c);
                    self.token_cache.insert(digest, c.clone());
                    c
                }
                Err(e) => {
                    info!(event = "auth_failed", method = "access_token", reason = %e);
                    Self::audit_failure("access_token", &e.to_string(), None, None);
                    return Err(AuthError::InvalidAccessToken);
                }
            },
        };
        let Some(p) = self.session_principal(&claims.sid).await? else {
            info!(event = "auth_failed", method = "access_token", sid = %claims.sid, reason = "session ended");
            Self::audit_failure("access_token", "session ended", None, Some(&claims.sid));
            return Err(AuthError::InvalidAccessToken);
        };
        if p.user_id != claims.sub || p.tenant != claims.tenant {
            info!(event = "auth_failed", method = "access_token", sid = %claims.sid, reason = "claims do not match the session");
            Self::audit_failure(
                "access_token",
                "claims do not match the session",
                None,
                Some(&claims.sid),
            );
            return Err(AuthError::InvalidAccessToken);
        }
        Ok(p)
    }

    fn principal_of(s: &Session) -> Principal {
        Principal {
            user_id: s.user_id.clone(),
            username: s.username.clone(),
            tenant: s.tenant.clone(),
            key_id: s.key_id.clone(),
            session_id: Some(s.family_id.clone()),
            roles: effective_roles(&s.user_roles, s.key_roles.as_deref()),
            method: AuthMethod::AccessToken,
        }
    }

    /// The principal of a live session, through the cache. `None` if it ended.
    async fn session_principal(&self, sid: &str) -> Result<Option<Arc<Principal>>, AuthError> {
        if let Some(p) = self.session_cache.get(sid) {
            return Ok(Some(p));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let id = sid.to_owned();
        let Some(s) = self.db(move |st| st.session(&id, now())).await? else {
            return Ok(None);
        };
        if !s.is_active(now()) {
            return Ok(None);
        }
        let p = Arc::new(Self::principal_of(&s));
        if self.generation.load(Ordering::Acquire) == generation {
            self.session_cache.insert(sid.to_owned(), p.clone());
        }
        Ok(Some(p))
    }

    pub fn jwks(&self) -> serde_json::Value {
        self.keys.current().jwks()
    }

    // ---- operator actions in this process ----------------------------------------------------

    /// The operator's operations over this service's store (for the admin plane). Follow a
    /// revocation with [`Self::revoke_key`]/[`Self::disable_user`] or the `evict_*` methods so
    /// it takes effect at once rather than at the next epoch poll.
    pub fn admin(&self) -> super::admin::Admin<'_> {
        super::admin::Admin {
            store: self.store.as_ref(),
            pepper: &self.pepper,
            caller: None,
        }
    }

    /// The same operations on behalf of an admin-plane caller: bounded by what it holds (see
    /// `auth::admin`).
    pub fn admin_as<'a>(&'a self, caller: super::admin::Grantor<'a>) -> super::admin::Admin<'a> {
        super::admin::Admin {
            caller: Some(caller),
            ..self.admin()
        }
    }

    /// Revokes a key (and its sessions) with immediate effect in this process.
    pub async fn revoke_key(self: &Arc<Self>, key_id: &str) -> anyhow::Result<bool> {
        let (me, id) = (self.clone(), key_id.to_owned());
        let changed = tokio::task::spawn_blocking(move || me.admin().revoke_key(&id)).await??;
        self.evict_key(key_id);
        info!(event = "key_revoked", key_id);
        Ok(changed)
    }

    /// Disables a user (its keys and sessions end) with immediate effect in this process.
    pub async fn disable_user(self: &Arc<Self>, username: &str) -> anyhow::Result<bool> {
        let (me, name) = (self.clone(), username.to_owned());
        let (user_id, changed) =
            tokio::task::spawn_blocking(move || me.admin().disable_user(&name)).await??;
        self.evict_user(&user_id);
        info!(event = "user_disabled", user_id = %user_id);
        Ok(changed)
    }

    /// Whether the store answers (for `/readyz`).
    pub async fn ready(&self) -> bool {
        self.db(|s| s.auth_epoch()).await.is_ok()
    }

    // ---- long-lived requests -----------------------------------------------------------------

    /// Moves whenever a cached credential may have been revoked (locally or, through the epoch
    /// poll, by another process). A stream holder compares it cheaply and calls
    /// [`Self::still_valid`] only when it moved.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Resolves when the generation has moved and the caches are cleared, counting from when
    /// it is first polled (or enabled). An open stream waits on this instead of checking the
    /// generation on a clock: no wake-up while nothing is revoked, none missed when something is.
    pub fn generation_moved(&self) -> tokio::sync::futures::OwnedNotified {
        self.moved.clone().notified_owned()
    }

    /// Whether `p`'s credential still stands (key not revoked or expired, user enabled,
    /// session not revoked), for ending in-flight streams of a revoked principal.
    pub async fn still_valid(&self, p: &Principal) -> bool {
        match (p.method, &p.key_id, &p.session_id) {
            (AuthMethod::AccessToken, _, Some(sid)) => {
                matches!(self.session_principal(sid).await, Ok(Some(_)))
            }
            (AuthMethod::ApiKey, Some(kid), _) => {
                if self.key_cache.get(kid).is_some() {
                    return true;
                }
                let id = kid.clone();
                matches!(self.db(move |s| s.api_key(&id)).await, Ok(Some(k)) if k.is_active(now()))
            }
            _ => false,
        }
    }

    // ---- invalidation ---------------------------------------------------------------------

    fn bump(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// After an eviction: wakes the waiters of [`Self::generation_moved`].
    fn evicted(&self) {
        self.moved.notify_waiters();
    }

    pub fn evict_session(&self, sid: &str) {
        self.bump();
        self.session_cache.remove(sid);
        self.evicted();
    }

    pub fn evict_key(&self, key_id: &str) {
        self.bump();
        self.key_cache.remove(key_id);
        self.session_cache
            .remove_where(|p| p.key_id.as_deref() == Some(key_id));
        self.evicted();
    }

    pub fn evict_user(&self, user_id: &str) {
        self.bump();
        self.key_cache
            .remove_where(|c| c.principal.user_id == user_id);
        self.session_cache.remove_where(|p| p.user_id == user_id);
        self.evicted();
    }

    pub fn evict_all(&self) {
        self.bump();
        self.key_cache.clear();
        self.session_cache.clear();
        self.token_cache.clear();
        self.evicted();
    }

    /// Checks the store's revocation epoch once; clears the caches if it moved.
    pub async fn poll_epoch(&self) {
        self.read_epoch(false).await;
    }

    /// Reads the store's revocation epoch; clears the caches if it moved, unless `evicted`
    /// (they were just cleared for this move).
    async fn read_epoch(&self, evicted: bool) {
        if let Ok(e) = self.db(|s| s.auth_epoch()).await
            && self.epoch.swap(e, Ordering::AcqRel) != e
            && !evicted
        {
            self.evict_all();
        }
    }

    /// Background upkeep: the revocation-epoch poll and signing-key rotation. Ends when the
    /// service is dropped. A store that announces epoch moves (PostgreSQL `NOTIFY`) wakes the
    /// poll at once; the interval stays as the fallback.
    pub fn spawn_upkeep(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let weak = Arc::downgrade(self);
        let (poll, signing_check) = (self.poll, self.signing_check);
        let signal = self.store.epoch_signal();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(poll);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_signing = tokio::time::Instant::now();
            loop {
                let notified = match &signal {
                    Some(s) => tokio::select! {
                        _ = tick.tick() => false,
                        _ = s.notified() => true,
                    },
                    None => {
                        tick.tick().await;
                        false
                    }
                };
                let Some(me) = weak.upgrade() else { return };
                if notified {
                    // A commit that moved the epoch notifies (or the listener reconnected and
                    // may have missed one): the caches go now, not after a store round trip
                    // (the read below only records the new epoch).
                    me.evict_all();
                }
                me.read_epoch(notified).await;
                if last_signing.elapsed() >= signing_check {
                    last_signing = tokio::time::Instant::now();
                    // A store call: off this loop, which must stay free to take the next
                    // notification at once.
                    let m = me.clone();
                    tokio::task::spawn_blocking(move || match m.keys.maintain(now()) {
                        Ok(Some(kid)) => info!(event = "signing_key_rotated", kid = %kid),
                        Ok(None) => {}
                        Err(e) => warn!(error = %e, "signing key maintenance failed"),
                    });
                }
            }
        })
    }
}
