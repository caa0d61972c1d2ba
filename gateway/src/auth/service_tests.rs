//! Tests of [`super::Identity`] over a real SQLite store, with a wrapper that counts look-ups.

use std::{
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::response::IntoResponse;
use zeroize::Zeroizing;

use super::{AuthError, AuthMethod, Identity, admin::Admin};
use crate::{
    config::Config,
    error::ApiError,
    store::{
        ApiKeyRecord, NewApiKey, NewFamily, NewRefreshToken, NewUser, RotateOutcome, SecurityEvent,
        Session, Store, StoreResult, Tenant, User, sqlite::SqliteStore,
    },
};

/// Delegates to SQLite and counts API-key look-ups.
struct Counting {
    inner: SqliteStore,
    key_lookups: AtomicUsize,
}

impl Store for Counting {
    fn create_tenant(&self, name: &str, now: i64) -> StoreResult<()> {
        self.inner.create_tenant(name, now)
    }
    fn list_tenants(&self) -> StoreResult<Vec<Tenant>> {
        self.inner.list_tenants()
    }
    fn create_user(&self, user: &NewUser<'_>) -> StoreResult<()> {
        self.inner.create_user(user)
    }
    fn user_by_name(&self, username: &str) -> StoreResult<Option<User>> {
        self.inner.user_by_name(username)
    }
    fn list_users(&self) -> StoreResult<Vec<User>> {
        self.inner.list_users()
    }
    fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()> {
        self.inner.set_password(user_id, password_hash)
    }
    fn disable_user(&self, user_id: &str, now: i64) -> StoreResult<bool> {
        self.inner.disable_user(user_id, now)
    }
    fn create_api_key(&self, key: &NewApiKey<'_>) -> StoreResult<()> {
        self.inner.create_api_key(key)
    }
    fn api_key(&self, key_id: &str) -> StoreResult<Option<ApiKeyRecord>> {
        self.key_lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.api_key(key_id)
    }
    fn list_api_keys(&self, user_id: Option<&str>) -> StoreResult<Vec<ApiKeyRecord>> {
        self.inner.list_api_keys(user_id)
    }
    fn revoke_api_key(&self, key_id: &str, now: i64) -> StoreResult<bool> {
        self.inner.revoke_api_key(key_id, now)
    }
    fn set_user_roles(&self, user_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        self.inner.set_user_roles(user_id, roles, now)
    }
    fn set_api_key_roles(&self, key_id: &str, roles: &[String], now: i64) -> StoreResult<bool> {
        self.inner.set_api_key_roles(key_id, roles, now)
    }
    fn create_family(&self, f: &NewFamily<'_>, first: &NewRefreshToken<'_>) -> StoreResult<()> {
        self.inner.create_family(f, first)
    }
    fn rotate_refresh(
        &self,
        token_hmac: &[u8],
        next: &NewRefreshToken<'_>,
        now: i64,
        grace_secs: i64,
    ) -> StoreResult<RotateOutcome> {
        self.inner.rotate_refresh(token_hmac, next, now, grace_secs)
    }
    fn session(&self, family_id: &str, now: i64) -> StoreResult<Option<Session>> {
        self.inner.session(family_id, now)
    }
    fn family_of_refresh(&self, token_hmac: &[u8]) -> StoreResult<Option<String>> {
        self.inner.family_of_refresh(token_hmac)
    }
    fn revoke_family(&self, family_id: &str, reason: &str, now: i64) -> StoreResult<bool> {
        self.inner.revoke_family(family_id, reason, now)
    }
    fn auth_epoch(&self) -> StoreResult<i64> {
        self.inner.auth_epoch()
    }
    fn security_events(&self) -> StoreResult<Vec<SecurityEvent>> {
        self.inner.security_events()
    }
    fn signing_keys(&self) -> StoreResult<Option<(i64, Vec<u8>)>> {
        self.inner.signing_keys()
    }
    fn put_signing_keys(&self, e: Option<i64>, sealed: &[u8], now: i64) -> StoreResult<bool> {
        self.inner.put_signing_keys(e, sealed, now)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Arc<Counting>,
    id: Arc<Identity>,
    key: Zeroizing<String>,
    key_id: String,
}

const PASSWORD: &str = "a long enough password";

fn fixture() -> Fixture {
    fixture_with("")
}

/// The fixture with more `[auth]` lines.
fn fixture_with(auth: &str) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let config = Config::from_str(
        &dir.path().join("moat.toml"),
        &format!(
            "[server]\ndata_dir = \"{}\"\n[auth]\npassword_concurrency = 2\n{auth}",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let store = Arc::new(Counting {
        inner: SqliteStore::open_in(&config.data_dir).unwrap(),
        key_lookups: AtomicUsize::new(0),
    });
    let id = Arc::new(Identity::new(&config, store.clone()).unwrap());
    let admin = Admin {
        store: store.as_ref(),
        pepper: id.pepper(),
        caller: None,
    };
    admin.add_tenant("acme").unwrap();
    admin
        .add_user(
            "alice",
            "acme",
            &["user".into(), "ops".into()],
            Some(PASSWORD),
        )
        .unwrap();
    let k = admin
        .create_key("alice", "ci", Some(&["user".into()]), None)
        .unwrap();
    Fixture {
        _dir: dir,
        store,
        id,
        key: k.plaintext,
        key_id: k.key_id,
    }
}

fn lookups(f: &Fixture) -> usize {
    f.store.key_lookups.load(Ordering::SeqCst)
}

async fn body_of(e: AuthError) -> (u16, Vec<u8>) {
    let resp = ApiError::from(e).into_response();
    let status = resp.status().as_u16();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 16)
        .await
        .unwrap();
    (status, bytes.to_vec())
}

fn src() -> IpAddr {
    "198.51.100.7".parse().unwrap()
}

#[tokio::test]
async fn malformed_keys_and_bad_checksums_never_reach_the_store() {
    let f = fixture();
    let k = f.key.as_str();
    let mut bad_sum = k.to_owned();
    let last = bad_sum.pop().unwrap();
    bad_sum.push(if last == 'A' { 'B' } else { 'A' });
    let wrong_len = format!("{k}A");
    for bad in [bad_sum.as_str(), wrong_len.as_str(), "moat_short", "moat_"] {
        assert_eq!(
            f.id.authenticate(bad).await,
            Err(AuthError::InvalidApiKey),
            "{bad}"
        );
    }
    assert_eq!(lookups(&f), 0, "a malformed key caused a store look-up");
    // The real key: one look-up, then served from the cache.
    let p = f.id.authenticate(k).await.unwrap();
    assert_eq!(p.key_id.as_deref(), Some(f.key_id.as_str()));
    assert_eq!(p.tenant, "acme");
    assert_eq!(p.method, AuthMethod::ApiKey);
    assert_eq!(
        p.roles,
        vec!["user".to_string()],
        "the key narrows the user's roles"
    );
    assert_eq!(lookups(&f), 1);
    f.id.authenticate(k).await.unwrap();
    assert_eq!(lookups(&f), 1, "a verified key is cached");
}

#[tokio::test]
async fn unknown_key_id_and_wrong_secret_answer_identically() {
    let f = fixture();
    let other = super::api_key::mint(f.id.pepper(), &super::api_key::new_key_id());
    let unknown = f.id.authenticate(&other.plaintext).await.unwrap_err();
    // Same key id, different secret, valid checksum.
    let forged = super::api_key::mint(f.id.pepper(), &f.key_id);
    let wrong = f.id.authenticate(&forged.plaintext).await.unwrap_err();
    // And once more with the real key cached.
    f.id.authenticate(&f.key).await.unwrap();
    let wrong_cached = f.id.authenticate(&forged.plaintext).await.unwrap_err();
    let a = body_of(unknown).await;
    assert_eq!(a.0, 401);
    assert_eq!(a, body_of(wrong).await);
    assert_eq!(a, body_of(wrong_cached).await);
}

/// The bearer check's fast path decides only what the key cache knows, and as
/// `authenticate` would.
#[tokio::test]
async fn the_key_cache_decides_cached_keys_at_once_and_nothing_else() {
    let f = fixture();
    let forged = super::api_key::mint(f.id.pepper(), &f.key_id);
    assert!(f.id.authenticate_cached(&f.key).is_none(), "not cached yet");
    let p = f.id.authenticate(&f.key).await.unwrap();
    let cached = f.id.authenticate_cached(&f.key).unwrap().unwrap();
    assert!(
        Arc::ptr_eq(&p, &cached),
        "the cached principal is shared, not copied"
    );
    assert_eq!(
        f.id.authenticate_cached(&forged.plaintext).unwrap(),
        Err(AuthError::InvalidApiKey)
    );
    let t = f.id.grant_api_key(&f.key).await.unwrap();
    for other in [
        t.access_token.as_str(),
        t.refresh_token.as_str(),
        "moat_short",
    ] {
        assert!(f.id.authenticate_cached(other).is_none());
    }
    assert_eq!(lookups(&f), 1);
}

#[tokio::test]
async fn revocation_by_this_process_and_by_another_takes_effect() {
    let f = fixture();
    let p = f.id.authenticate(&f.key).await.unwrap();
    let generation = f.id.generation();
    assert!(f.id.still_valid(&p).await);
    // Another process (the CLI) revokes in the store: the epoch poll clears the cache.
    f.store
        .inner
        .revoke_api_key(&f.key_id, super::now())
        .unwrap();
    f.id.poll_epoch().await;
    assert_ne!(f.id.generation(), generation, "a stream holder must notice");
    assert!(!f.id.still_valid(&p).await);
    assert_eq!(
        f.id.authenticate(&f.key).await,
        Err(AuthError::InvalidApiKey)
    );
}

#[tokio::test]
async fn in_process_revocations_take_effect_without_waiting_for_the_poll() {
    let f = fixture();
    let t =
        f.id.grant_password("alice", Zeroizing::new(PASSWORD.into()), src())
            .await
            .unwrap();
    f.id.authenticate(&f.key).await.unwrap();
    f.id.authenticate(&t.access_token).await.unwrap();
    assert!(f.id.ready().await);
    // No poll_epoch() here: the eviction alone must do it.
    assert!(f.id.revoke_key(&f.key_id).await.unwrap());
    assert_eq!(
        f.id.authenticate(&f.key).await,
        Err(AuthError::InvalidApiKey)
    );
    f.id.authenticate(&t.access_token).await.unwrap();
    assert!(f.id.disable_user("alice").await.unwrap());
    assert_eq!(
        f.id.authenticate(&t.access_token).await,
        Err(AuthError::InvalidAccessToken)
    );
}

#[tokio::test]
async fn password_grant_refresh_rotation_and_reuse_detection() {
    let f = fixture_with("refresh_reuse_grace_secs = 0\n");
    let t1 =
        f.id.grant_password("alice", Zeroizing::new(PASSWORD.into()), src())
            .await
            .unwrap();
    assert_eq!(t1.token_type, "Bearer");
    assert_eq!(t1.expires_in, 300);
    let p = f.id.authenticate(&t1.access_token).await.unwrap();
    assert_eq!(p.method, AuthMethod::AccessToken);
    assert_eq!(p.roles.len(), 2);
    let sid = p.session_id.clone().unwrap();

    // A refresh token is not a bearer credential.
    assert_eq!(
        f.id.authenticate(&t1.refresh_token).await,
        Err(AuthError::RefreshTokenAsBearer)
    );

    let t2 = f.id.grant_refresh(&t1.refresh_token).await.unwrap();
    assert_ne!(*t2.refresh_token, *t1.refresh_token);
    let p2 = f.id.authenticate(&t2.access_token).await.unwrap();
    assert_eq!(p2.session_id.as_deref(), Some(sid.as_str()));

    // Reuse of the spent token: refused, and the family dies — newest token and the access
    // tokens of the session too, at once.
    assert_eq!(
        f.id.grant_refresh(&t1.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant
    );
    assert_eq!(
        f.id.grant_refresh(&t2.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant
    );
    assert_eq!(
        f.id.authenticate(&t2.access_token).await,
        Err(AuthError::InvalidAccessToken)
    );
    let events = f.store.security_events().unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.kind == "refresh_reuse_detected" && e.family_id.as_deref() == Some(&sid))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_grace_concurrent_refreshes_of_one_token_have_exactly_one_winner() {
    let f = fixture_with("refresh_reuse_grace_secs = 0\n");
    let t = f.id.grant_api_key(&f.key).await.unwrap();
    let rt = Arc::new(t.refresh_token.clone());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (id, rt) = (f.id.clone(), rt.clone());
        tasks.push(tokio::spawn(async move { id.grant_refresh(&rt).await }));
    }
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(e) => assert_eq!(e, AuthError::InvalidGrant),
        }
    }
    assert_eq!(wins, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn within_the_grace_concurrent_refreshes_all_get_the_same_successor() {
    let f = fixture();
    let t = f.id.grant_api_key(&f.key).await.unwrap();
    let rt = Arc::new(t.refresh_token.clone());
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (id, rt) = (f.id.clone(), rt.clone());
        tasks.push(tokio::spawn(async move { id.grant_refresh(&rt).await }));
    }
    let mut successors = std::collections::BTreeSet::new();
    let mut access = std::collections::BTreeSet::new();
    for t in tasks {
        let r = t.await.unwrap().expect("every racer is answered");
        assert!(f.id.authenticate(&r.access_token).await.is_ok());
        successors.insert(r.refresh_token.to_string());
        access.insert(r.access_token);
    }
    assert_eq!(successors.len(), 1, "one successor for all");
    assert_eq!(access.len(), 16, "a fresh access token each");
    // The session goes on with that successor.
    let next = successors.pop_first().unwrap();
    f.id.grant_refresh(&next).await.unwrap();
}

#[tokio::test]
async fn a_rotated_token_is_regranted_within_the_grace_and_fatal_after_it() {
    let f = fixture_with("refresh_reuse_grace_secs = 1\n");
    let t1 = f.id.grant_api_key(&f.key).await.unwrap();
    let t2 = f.id.grant_refresh(&t1.refresh_token).await.unwrap();
    // Right away: the same successor again, a new access token, the session intact.
    let again = f.id.grant_refresh(&t1.refresh_token).await.unwrap();
    assert_eq!(*again.refresh_token, *t2.refresh_token);
    assert_ne!(again.access_token, t2.access_token);
    assert!(f.id.authenticate(&t2.access_token).await.is_ok());
    // Presented again until the grace is over: every answer inside it is that same successor;
    // the first one after it is a refusal that ends the session.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match f.id.grant_refresh(&t1.refresh_token).await {
            Ok(r) => assert_eq!(*r.refresh_token, *t2.refresh_token),
            Err(e) => {
                assert_eq!(e, AuthError::InvalidGrant);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the grace never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        f.id.grant_refresh(&t2.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant,
        "reuse after the grace revokes the family"
    );
    assert_eq!(
        f.id.authenticate(&t2.access_token).await,
        Err(AuthError::InvalidAccessToken)
    );
    assert!(
        f.store
            .security_events()
            .unwrap()
            .iter()
            .any(|e| e.kind == "refresh_reuse_detected")
    );
}

#[tokio::test]
async fn within_the_grace_a_token_whose_successor_moved_on_is_a_replay() {
    let f = fixture();
    let t1 = f.id.grant_api_key(&f.key).await.unwrap();
    let t2 = f.id.grant_refresh(&t1.refresh_token).await.unwrap();
    let t3 = f.id.grant_refresh(&t2.refresh_token).await.unwrap();
    assert_eq!(
        f.id.grant_refresh(&t1.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant
    );
    assert_eq!(
        f.id.grant_refresh(&t3.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant,
        "the family is revoked"
    );
}

#[tokio::test]
async fn revoking_a_session_ends_its_access_tokens_at_once() {
    let f = fixture();
    let t = f.id.grant_api_key(&f.key).await.unwrap();
    let p = f.id.authenticate(&t.access_token).await.unwrap();
    assert_eq!(p.key_id.as_deref(), Some(f.key_id.as_str()));
    assert!(f.id.still_valid(&p).await);
    f.id.revoke(&t.access_token).await.unwrap();
    assert!(!f.id.still_valid(&p).await);
    assert_eq!(
        f.id.authenticate(&t.access_token).await,
        Err(AuthError::InvalidAccessToken)
    );
    assert_eq!(
        f.id.grant_refresh(&t.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant
    );
    // Unknown and garbage tokens are accepted silently.
    f.id.revoke("garbage").await.unwrap();
    f.id.revoke(&super::refresh::mint()).await.unwrap();
}

#[tokio::test]
async fn disabling_a_user_ends_keys_and_sessions() {
    let f = fixture();
    let t =
        f.id.grant_password("alice", Zeroizing::new(PASSWORD.into()), src())
            .await
            .unwrap();
    f.id.authenticate(&f.key).await.unwrap();
    f.id.authenticate(&t.access_token).await.unwrap();
    let admin = Admin {
        store: f.store.as_ref(),
        pepper: f.id.pepper(),
        caller: None,
    };
    admin.disable_user("alice").unwrap();
    f.id.poll_epoch().await;
    assert_eq!(
        f.id.authenticate(&f.key).await,
        Err(AuthError::InvalidApiKey)
    );
    assert_eq!(
        f.id.authenticate(&t.access_token).await,
        Err(AuthError::InvalidAccessToken)
    );
    assert_eq!(
        f.id.grant_refresh(&t.refresh_token).await.unwrap_err(),
        AuthError::InvalidGrant
    );
    assert_eq!(
        f.id.grant_password("alice", Zeroizing::new(PASSWORD.into()), src())
            .await
            .unwrap_err(),
        AuthError::InvalidGrant
    );
}

#[tokio::test]
async fn wrong_passwords_are_throttled() {
    let f = fixture();
    for _ in 0..5 {
        assert_eq!(
            f.id.grant_password("alice", Zeroizing::new("wrong password!".into()), src())
                .await
                .unwrap_err(),
            AuthError::InvalidGrant
        );
    }
    assert!(matches!(
        f.id.grant_password("alice", Zeroizing::new(PASSWORD.into()), src())
            .await,
        Err(AuthError::Throttled(_))
    ));
    // Unknown users cost a hash too and answer like a wrong password.
    assert_eq!(
        f.id.grant_password(
            "nobody",
            Zeroizing::new(PASSWORD.into()),
            "198.51.100.8".parse().unwrap()
        )
        .await
        .unwrap_err(),
        AuthError::InvalidGrant
    );
}
