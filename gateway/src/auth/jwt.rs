//! Access tokens: JWTs signed with EdDSA (Ed25519) by default or HS256 with a ≥ 32-byte secret.
//!
//! This module owns the signing key set (generation, rotation with an overlap window, its
//! sealed copy in the shared store), issuing tokens, verifying them, and the JWKS document.
//!
//! The Ed25519 key set lives in the store (every replica signs and verifies with the same
//! keys), sealed under a key derived from the pepper ([`super::seal`]). Replicas change it by
//! compare-and-swap on its version, so two replicas rotating at once agree on one new key.
//!
//! Verification does not trust `jsonwebtoken`'s defaults (60 s leeway, `nbf` unchecked, only
//! `exp` required, `typ` unchecked). Before the library sees a token we decode the raw header
//! ourselves: only `alg`, `typ` and `kid` may appear (RFC 8725); `typ` must be `at+jwt`; `jku`,
//! `x5u`, `x5c`, `jwk` and `crit` are named in the refusal; `kid`
//! must name a key in our static set and `alg` must be that key's one algorithm (so `none` and
//! HS256-signed-with-the-public-key confusion cannot pass). Then the library checks the
//! signature, `exp`, `nbf`, `iss` and `aud` with our leeway, and the claim struct makes `sub`,
//! `tenant`, `sid`, `jti` and `iat` required. Finally `iat` may not be in the future and the
//! lifetime may not exceed the maximum.

use std::{
    io,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{SigningKey, pkcs8::EncodePrivateKey};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::{
    seal::Sealer,
    secrets::{self, Pepper, random_base62},
};
use crate::store::Store;

pub use crate::config::{MAX_LEEWAY_SECS, MAX_LIFETIME_SECS, SigningAlgorithm};
/// The `typ` header every access token carries (RFC 9068).
pub const TYP: &str = "at+jwt";
/// Headers that would let a token pick its own verification key or demand extensions.
pub const FORBIDDEN_HEADERS: [&str; 5] = ["jku", "x5u", "x5c", "jwk", "crit"];
/// The only header parameters an access token may carry (RFC 8725 §3.1: accept only what is
/// understood). Anything else — `zip`, `cty`, `b64`, a private name — is refused before the
/// signature is checked, even if the signature would verify.
pub const ALLOWED_HEADERS: [&str; 3] = ["alg", "typ", "kid"];
/// Longest token considered at all.
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Where moat before the shared store kept the Ed25519 key set (secrets folder); moved into
/// the store at first start.
pub const ED25519_KEYS_FILE: &str = "jwt-ed25519.json";
/// The HKDF info label (and associated data) of the signing keys' sealing key.
pub const SIGNING_KEYS_PURPOSE: &str = "moat signing-keys seal v1";
/// How often an unknown `kid` may send a replica to the store for keys another made.
const RELOAD_EVERY: Duration = Duration::from_secs(1);

/// The claims of a moat access token. Every field is required: a token missing one does not
/// deserialise and is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    /// The user id.
    pub sub: String,
    pub tenant: String,
    /// The session: the refresh family this token was issued from.
    pub sid: String,
    pub jti: String,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
}

/// Why a token was refused (for logs and tests; clients all get the same 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("forbidden header `{0}`")]
    ForbiddenHeader(&'static str),
    #[error("unexpected header `{0}` (only alg, typ and kid are accepted)")]
    UnexpectedHeader(String),
    #[error("`typ` is not at+jwt")]
    WrongType,
    #[error("unknown or retired key id")]
    UnknownKey,
    #[error("`alg` does not match the key's algorithm")]
    AlgorithmMismatch,
    #[error("`iat` is in the future")]
    IssuedInFuture,
    #[error("lifetime longer than allowed")]
    LifetimeTooLong,
    #[error("{0}")]
    Rejected(String),
}

/// One verification (and maybe signing) key: exactly one algorithm.
struct Key {
    kid: String,
    alg: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// base64url public key, for the JWKS (Ed25519 only: a symmetric key is never published).
    public_x: Option<String>,
}

/// The key set in force: the first key signs, every key verifies.
pub struct KeySet {
    keys: Vec<Key>,
}

/// What the verifier checks claims against.
#[derive(Debug, Clone)]
pub struct VerifyParams {
    pub issuer: String,
    pub audience: String,
    pub leeway: u64,
    pub max_lifetime: u64,
}

impl KeySet {
    fn find(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key id new tokens are signed with.
    pub fn signing_kid(&self) -> &str {
        &self.keys[0].kid
    }

    pub fn sign(&self, claims: &AccessClaims) -> String {
        let key = &self.keys[0];
        let mut header = Header::new(key.alg);
        header.typ = Some(TYP.to_owned());
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).expect("signing with a valid key")
    }

    /// Verifies `token` and returns its claims. `now` is Unix seconds.
    pub fn verify(
        &self,
        token: &str,
        params: &VerifyParams,
        now: i64,
    ) -> Result<AccessClaims, JwtError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(JwtError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            // An empty signature is a stripped one; never hand it to a library.
            return Err(JwtError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?;
        let header: Map<String, Value> =
            serde_json::from_slice(&raw).map_err(|_| JwtError::Malformed)?;
        for name in FORBIDDEN_HEADERS {
            if header.contains_key(name) {
                return Err(JwtError::ForbiddenHeader(name));
            }
        }
        if let Some(extra) = header
            .keys()
            .find(|k| !ALLOWED_HEADERS.contains(&k.as_str()))
        {
            // Only the name, truncated: the header is attacker-controlled text bound for logs.
            let name: String = extra.chars().take(32).filter(|c| !c.is_control()).collect();
            return Err(JwtError::UnexpectedHeader(name));
        }
        match header.get("typ").and_then(Value::as_str) {
            Some(t)
                if t.eq_ignore_ascii_case(TYP) || t.eq_ignore_ascii_case("application/at+jwt") => {}
            _ => return Err(JwtError::WrongType),
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(JwtError::Malformed)?;
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or(JwtError::UnknownKey)?;
        let key = self.find(kid).ok_or(JwtError::UnknownKey)?;
        if alg != alg_name(key.alg) {
            return Err(JwtError::AlgorithmMismatch);
        }

        let leeway = params.leeway.min(MAX_LEEWAY_SECS);
        let mut v = Validation::new(key.alg);
        v.leeway = leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        v.validate_aud = true;
        v.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        v.set_issuer(&[&params.issuer]);
        v.set_audience(&[&params.audience]);
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &v)
            .map_err(|e| JwtError::Rejected(describe(&e)))?;
        let c = data.claims;
        // The library compares against its own clock; re-check against ours so tests and
        // callers with an explicit `now` get the same answer.
        let lw = leeway as i64;
        if c.exp + lw <= now {
            return Err(JwtError::Rejected("expired".into()));
        }
        if c.nbf - lw > now {
            return Err(JwtError::Rejected("not yet valid".into()));
        }
        if c.iat - lw > now {
            return Err(JwtError::IssuedInFuture);
        }
        let max = params.max_lifetime.min(MAX_LIFETIME_SECS) as i64;
        if c.exp - c.iat > max || c.exp - c.nbf > max {
            return Err(JwtError::LifetimeTooLong);
        }
        Ok(c)
    }

    /// The public keys, as a JWKS document. Empty for HS256.
    pub fn jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .keys
            .iter()
            .filter_map(|k| {
                k.public_x.as_ref().map(|x| {
                    json!({"kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
                           "kid": k.kid, "x": x})
                })
            })
            .collect();
        json!({ "keys": keys })
    }
}

/// A fixed description of a library error: its own messages may quote token contents.
fn describe(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match e.kind() {
        K::ExpiredSignature => "expired".into(),
        K::ImmatureSignature => "not yet valid".into(),
        K::InvalidSignature => "bad signature".into(),
        K::InvalidIssuer => "wrong issuer".into(),
        K::InvalidAudience => "wrong audience".into(),
        K::MissingRequiredClaim(c) => format!("missing claim `{c}`"),
        K::Json(_) => "claims do not parse (a required claim is missing or mistyped)".into(),
        K::Base64(_) | K::Utf8(_) | K::InvalidToken => "malformed".into(),
        _ => "invalid".into(),
    }
}

fn alg_name(a: Algorithm) -> &'static str {
    match a {
        Algorithm::EdDSA => "EdDSA",
        Algorithm::HS256 => "HS256",
        _ => "unsupported",
    }
}

/// One Ed25519 key as kept in the key file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StoredEdKey {
    pub kid: String,
    /// base64url of the 32-byte seed.
    pub seed: String,
    pub created_at: i64,
    /// Set when a newer key took over: verification ends here, then the key is retired.
    pub verify_until: Option<i64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EdKeyFile {
    pub keys: Vec<StoredEdKey>,
}

impl EdKeyFile {
    /// Rotates and retires: drops keys past their overlap window; if the newest key is older
    /// than `rotate_after` (or there is none), makes a new one and gives the others
    /// `overlap` seconds more for verification. True if anything changed.
    pub fn maintain(&mut self, now: i64, rotate_after: i64, overlap: i64) -> bool {
        let before = self.keys.len();
        self.keys.retain(|k| k.verify_until.is_none_or(|t| now < t));
        let mut changed = self.keys.len() != before;
        let newest = self.keys.iter().map(|k| k.created_at).max();
        if newest.is_none_or(|c| now >= c + rotate_after) {
            for k in &mut self.keys {
                if k.verify_until.is_none() {
                    k.verify_until = Some(now + overlap);
                }
            }
            let seed = Zeroizing::new(secrets::random_bytes::<32>());
            self.keys.push(StoredEdKey {
                kid: format!("ed-{}", random_base62(12)),
                seed: URL_SAFE_NO_PAD.encode(&seed[..]),
                created_at: now,
                verify_until: None,
            });
            changed = true;
        }
        changed
    }

    /// The key set: newest (signing) key first.
    pub fn key_set(&self) -> io::Result<KeySet> {
        let mut stored: Vec<&StoredEdKey> = self.keys.iter().collect();
        stored.sort_by_key(|k| std::cmp::Reverse(k.created_at));
        let mut keys = Vec::new();
        for k in stored {
            let seed = Zeroizing::new(URL_SAFE_NO_PAD.decode(&k.seed).map_err(invalid)?);
            let seed: &[u8; 32] = seed.as_slice().try_into().map_err(invalid)?;
            let sk = SigningKey::from_bytes(seed);
            let der = sk.to_pkcs8_der().map_err(invalid)?;
            let public = sk.verifying_key().to_bytes();
            keys.push(Key {
                kid: k.kid.clone(),
                alg: Algorithm::EdDSA,
                encoding: EncodingKey::from_ed_der(der.as_bytes()),
                decoding: DecodingKey::from_ed_der(&public),
                public_x: Some(URL_SAFE_NO_PAD.encode(public)),
            });
        }
        if keys.is_empty() {
            return Err(invalid("no signing key"));
        }
        Ok(KeySet { keys })
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// An HS256 key set from a secret of at least 32 bytes.
pub fn hs256_key_set(secret: &[u8]) -> io::Result<KeySet> {
    if secret.len() < 32 {
        return Err(invalid(format!(
            "an HS256 secret needs at least 32 bytes, this one has {}",
            secret.len()
        )));
    }
    // The kid names the secret without revealing it: a MAC of a constant under the secret.
    let tag = super::secrets::Pepper::from_bytes(sha256(secret)).mac("moat hs256 kid", &[]);
    let kid = format!("hs-{}", URL_SAFE_NO_PAD.encode(&tag[..9]));
    Ok(KeySet {
        keys: vec![Key {
            kid,
            alg: Algorithm::HS256,
            encoding: EncodingKey::from_secret(secret).map_err(invalid)?,
            decoding: DecodingKey::from_secret(secret).map_err(invalid)?,
            public_x: None,
        }],
    })
}

fn sha256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(b).into()
}

/// Rotation settings for the Ed25519 key file.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub rotate_after: i64,
    pub overlap: i64,
}

/// Where the key set comes from, and the set in force (swapped whole on rotation).
pub struct KeyRing {
    source: Source,
    current: RwLock<Arc<KeySet>>,
}

enum Source {
    Stored(Box<Stored>),
    Hs256,
}

struct Stored {
    store: Arc<dyn Store>,
    sealer: Sealer,
    rotation: Rotation,
    /// The pre-store key file, moved into the store if the store has none yet.
    legacy_file: PathBuf,
    /// The pepper file, named when the sealed keys do not open.
    pepper_file: PathBuf,
    last_reload: Mutex<Option<Instant>>,
}

/// The key set as the store holds it, opened.
fn stored_file(
    store: &dyn Store,
    sealer: &Sealer,
    pepper_file: &Path,
) -> io::Result<Option<(i64, EdKeyFile)>> {
    let Some((version, sealed)) = store.signing_keys().map_err(io::Error::other)? else {
        return Ok(None);
    };
    let plain = sealer.open(&sealed).map_err(|e| {
        invalid(format!(
            "the signing keys in the store {e} ({}): every replica needs the same pepper",
            pepper_file.display()
        ))
    })?;
    let file = serde_json::from_slice(&plain)
        .map_err(|e| invalid(format!("the signing keys in the store: {e}")))?;
    Ok(Some((version, file)))
}

/// The store's Ed25519 key set opened with `pepper` (for tools and tests that sign as moat).
pub fn stored_ed25519_keys(store: &dyn Store, pepper: &Pepper) -> io::Result<Option<EdKeyFile>> {
    let sealer = Sealer::new(pepper, SIGNING_KEYS_PURPOSE);
    Ok(stored_file(store, &sealer, Path::new("pepper"))?.map(|(_, f)| f))
}

impl KeyRing {
    /// Ed25519 keys shared through `store`, sealed under `pepper`; created by the first replica
    /// (or moved there from `secrets_dir/jwt-ed25519.json`, which is then removed).
    pub fn ed25519(
        store: Arc<dyn Store>,
        pepper: &Pepper,
        secrets_dir: &Path,
        rotation: Rotation,
        now: i64,
    ) -> io::Result<Self> {
        let stored = Stored {
            store,
            sealer: Sealer::new(pepper, SIGNING_KEYS_PURPOSE),
            rotation,
            legacy_file: secrets_dir.join(ED25519_KEYS_FILE),
            pepper_file: secrets_dir.join(secrets::PEPPER_FILE),
            last_reload: Mutex::new(None),
        };
        let set = stored.maintain(now)?;
        Ok(Self {
            source: Source::Stored(Box::new(stored)),
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// HS256 with the secret in `path` (created with 32 random bytes if missing).
    pub fn hs256(path: &Path) -> io::Result<Self> {
        let secret = secrets::load_or_create(path, || {
            Zeroizing::new(secrets::random_bytes::<32>().to_vec())
        })?;
        Self::hs256_from(path, &secret)
    }

    /// An HS256 ring from a secret already read (`path` only names it in errors).
    pub fn hs256_from(path: &Path, secret: &[u8]) -> io::Result<Self> {
        let set = hs256_key_set(secret)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Self {
            source: Source::Hs256,
            current: RwLock::new(Arc::new(set)),
        })
    }

    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn install(&self, set: KeySet) -> Option<String> {
        let before = self.current().signing_kid().to_owned();
        let kid = set.signing_kid().to_owned();
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        (kid != before).then_some(kid)
    }

    /// Rotates if due and retires keys past their overlap (or adopts what another replica
    /// did). Returns the signing kid if it changed.
    pub fn maintain(&self, now: i64) -> io::Result<Option<String>> {
        let Source::Stored(stored) = &self.source else {
            return Ok(None);
        };
        let set = stored.maintain(now)?;
        Ok(self.install(set))
    }

    /// Rereads the store's key set, at most once per [`RELOAD_EVERY`]: a token naming a kid
    /// this replica has not seen may carry a key another replica just made. True if the set
    /// was reread.
    pub fn reload_if_allowed(&self) -> io::Result<bool> {
        let Source::Stored(stored) = &self.source else {
            return Ok(false);
        };
        {
            let mut last = stored.last_reload.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < RELOAD_EVERY) {
                return Ok(false);
            }
            *last = Some(Instant::now());
        }
        if let Some((_, file)) =
            stored_file(stored.store.as_ref(), &stored.sealer, &stored.pepper_file)?
        {
            self.install(file.key_set()?);
        }
        Ok(true)
    }

    /// Whether the ring may learn keys from the store (Ed25519), so an unknown kid is worth a
    /// reread.
    pub fn is_shared(&self) -> bool {
        matches!(self.source, Source::Stored(_))
    }
}

impl Stored {
    /// One compare-and-swap round trip per change: read, maintain, write only the version
    /// read. A replica that loses the race rereads and adopts the winner's keys.
    fn maintain(&self, now: i64) -> io::Result<KeySet> {
        for _ in 0..8 {
            let current = stored_file(self.store.as_ref(), &self.sealer, &self.pepper_file)?;
            let (expected, mut file, migrated) = match current {
                Some((v, f)) => (Some(v), f, false),
                None => match self.read_legacy()? {
                    Some(f) => (None, f, true),
                    None => (None, EdKeyFile::default(), false),
                },
            };
            let changed = file.maintain(now, self.rotation.rotate_after, self.rotation.overlap);
            if !changed && expected.is_some() {
                return file.key_set();
            }
            let plain = Zeroizing::new(serde_json::to_vec(&file).map_err(invalid)?);
            let sealed = self.sealer.seal(&plain);
            if self
                .store
                .put_signing_keys(expected, &sealed, now)
                .map_err(io::Error::other)?
            {
                if migrated {
                    // The keys now live sealed in the store; no plain copy stays on disk.
                    std::fs::remove_file(&self.legacy_file)?;
                    tracing::info!(
                        event = "signing_keys_moved_to_store",
                        file = %self.legacy_file.display()
                    );
                }
                return file.key_set();
            }
        }
        Err(io::Error::other(
            "the signing keys in the store kept changing under this replica",
        ))
    }

    fn read_legacy(&self) -> io::Result<Option<EdKeyFile>> {
        match secrets::read_secret_file(&self.legacy_file) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| invalid(format!("{}: {e}", self.legacy_file.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The library also checks `exp`/`nbf` against the real clock, so tests live in the present.
    fn now() -> i64 {
        crate::auth::now()
    }

    fn params() -> VerifyParams {
        VerifyParams {
            issuer: "moat".into(),
            audience: "moat-api".into(),
            leeway: 5,
            max_lifetime: 300,
        }
    }

    fn claims() -> AccessClaims {
        AccessClaims {
            iss: "moat".into(),
            aud: "moat-api".into(),
            sub: "u1".into(),
            tenant: "acme".into(),
            sid: "f1".into(),
            jti: "j1".into(),
            iat: now(),
            nbf: now(),
            exp: now() + 300,
        }
    }

    fn ed_set() -> (EdKeyFile, KeySet) {
        let mut f = EdKeyFile::default();
        assert!(f.maintain(now(), 86_400, 3_600));
        let s = f.key_set().unwrap();
        (f, s)
    }

    fn b64(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
    }

    /// A token with an arbitrary header and payload, signed by `set`'s signing key for real.
    fn forge(set: &KeySet, header: &Value, payload: &Value) -> String {
        let key = &set.keys[0];
        let msg = format!("{}.{}", b64(header), b64(payload));
        let sig = jsonwebtoken::crypto::sign(msg.as_bytes(), &key.encoding, key.alg).unwrap();
        format!("{msg}.{sig}")
    }

    fn header(set: &KeySet) -> Value {
        json!({"alg": alg_name(set.keys[0].alg), "typ": "at+jwt", "kid": set.signing_kid()})
    }

    #[test]
    fn issued_tokens_verify_with_eddsa() {
        let (_, set) = ed_set();
        let t = set.sign(&claims());
        assert_eq!(set.verify(&t, &params(), now() + 1).unwrap(), claims());
        let h: Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(t.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        assert_eq!(h["typ"], "at+jwt");
        assert_eq!(h["alg"], "EdDSA");
    }

    #[test]
    fn issued_tokens_verify_with_hs256_and_short_secrets_are_refused() {
        let set = hs256_key_set(&[9u8; 32]).unwrap();
        let t = set.sign(&claims());
        assert!(set.verify(&t, &params(), now()).is_ok());
        assert!(hs256_key_set(&[9u8; 31]).is_err());
        assert_eq!(set.jwks()["keys"].as_array().unwrap().len(), 0);
    }

    #[test]
    fn alg_none_is_refused() {
        let (_, set) = ed_set();
        let mut h = header(&set);
        h["alg"] = json!("none");
        let t = format!(
            "{}.{}.",
            b64(&h),
            b64(&serde_json::to_value(claims()).unwrap())
        );
        assert_eq!(set.verify(&t, &params(), now()), Err(JwtError::Malformed));
        let t = format!(
            "{}.{}.AAAA",
            b64(&h),
            b64(&serde_json::to_value(claims()).unwrap())
        );
        assert_eq!(
            set.verify(&t, &params(), now()),
            Err(JwtError::AlgorithmMismatch)
        );
    }

    #[test]
    fn hs256_signed_with_the_public_key_is_refused() {
        let (_, set) = ed_set();
        // The classic confusion: HMAC keyed with the published Ed25519 public key.
        let x = URL_SAFE_NO_PAD
            .decode(set.keys[0].public_x.as_ref().unwrap())
            .unwrap();
        let mut h = header(&set);
        h["alg"] = json!("HS256");
        let msg = format!(
            "{}.{}",
            b64(&h),
            b64(&serde_json::to_value(claims()).unwrap())
        );
        let sig = jsonwebtoken::crypto::sign(
            msg.as_bytes(),
            &EncodingKey::from_secret(&x).unwrap(),
            Algorithm::HS256,
        )
        .unwrap();
        let t = format!("{msg}.{sig}");
        assert_eq!(
            set.verify(&t, &params(), now()),
            Err(JwtError::AlgorithmMismatch)
        );
        // And EdDSA presented to an HS256 set.
        let hs = hs256_key_set(&[1u8; 32]).unwrap();
        let mut h = header(&hs);
        h["alg"] = json!("EdDSA");
        let t = forge(&set, &h, &serde_json::to_value(claims()).unwrap());
        assert_eq!(
            hs.verify(&t, &params(), now()),
            Err(JwtError::AlgorithmMismatch)
        );
    }

    #[test]
    fn tampered_payload_and_stripped_signature_are_refused() {
        let (_, set) = ed_set();
        let t = set.sign(&claims());
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims();
        c.tenant = "other".into();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            b64(&serde_json::to_value(c).unwrap()),
            parts[2]
        );
        assert!(matches!(
            set.verify(&tampered, &params(), now()),
            Err(JwtError::Rejected(_))
        ));
        let stripped = format!("{}.{}.", parts[0], parts[1]);
        assert_eq!(
            set.verify(&stripped, &params(), now()),
            Err(JwtError::Malformed)
        );
        let two = format!("{}.{}", parts[0], parts[1]);
        assert_eq!(set.verify(&two, &params(), now()), Err(JwtError::Malformed));
    }

    #[test]
    fn time_claims_are_enforced_with_bounded_leeway() {
        let (_, set) = ed_set();
        let t = set.sign(&claims());
        // Expired (beyond the 5 s leeway).
        assert!(set.verify(&t, &params(), now() + 306).is_err());
        // Not yet valid.
        let mut c = claims();
        c.nbf = now() + 60;
        c.iat = now() + 60;
        c.exp = now() + 300;
        assert!(set.verify(&set.sign(&c), &params(), now()).is_err());
        // A leeway asked for beyond 30 s is cut to 30 s.
        let mut p = params();
        p.leeway = 3600;
        let mut c = claims();
        c.exp = now() - 31;
        c.iat = now() - 200;
        c.nbf = now() - 200;
        assert!(set.verify(&set.sign(&c), &p, now()).is_err());
        // Lifetime beyond the maximum.
        let mut c = claims();
        c.exp = now() + 301;
        assert_eq!(
            set.verify(&set.sign(&c), &params(), now()),
            Err(JwtError::LifetimeTooLong)
        );
    }

    #[test]
    fn wrong_iss_aud_typ_are_refused() {
        let (_, set) = ed_set();
        let mut c = claims();
        c.iss = "evil".into();
        assert!(set.verify(&set.sign(&c), &params(), now()).is_err());
        let mut c = claims();
        c.aud = "other".into();
        assert!(set.verify(&set.sign(&c), &params(), now()).is_err());
        let claims = serde_json::to_value(claims()).unwrap();
        for typ in [json!("JWT"), json!(null), json!(1)] {
            let mut h = header(&set);
            h["typ"] = typ;
            assert_eq!(
                set.verify(&forge(&set, &h, &claims), &params(), now()),
                Err(JwtError::WrongType)
            );
        }
        let mut h = header(&set);
        h.as_object_mut().unwrap().remove("typ");
        assert_eq!(
            set.verify(&forge(&set, &h, &claims), &params(), now()),
            Err(JwtError::WrongType)
        );
    }

    #[test]
    fn every_required_claim_is_required() {
        let (_, set) = ed_set();
        for name in [
            "iss", "aud", "sub", "tenant", "sid", "jti", "iat", "nbf", "exp",
        ] {
            let mut c = serde_json::to_value(claims()).unwrap();
            c.as_object_mut().unwrap().remove(name);
            let t = forge(&set, &header(&set), &c);
            assert!(
                set.verify(&t, &params(), now()).is_err(),
                "token without `{name}` accepted"
            );
        }
        // The intact forged token passes, so the refusals above are about the claim.
        let t = forge(
            &set,
            &header(&set),
            &serde_json::to_value(claims()).unwrap(),
        );
        assert!(set.verify(&t, &params(), now()).is_ok());
    }

    #[test]
    fn forbidden_headers_are_refused() {
        let (_, set) = ed_set();
        let c = serde_json::to_value(claims()).unwrap();
        for name in FORBIDDEN_HEADERS {
            let mut h = header(&set);
            h[name] = json!("https://evil.example/keys");
            assert_eq!(
                set.verify(&forge(&set, &h, &c), &params(), now()),
                Err(JwtError::ForbiddenHeader(name))
            );
        }
    }

    #[test]
    fn headers_beyond_alg_typ_kid_are_refused_even_when_signed() {
        let (_, set) = ed_set();
        let c = serde_json::to_value(claims()).unwrap();
        // The plain header verifies: the refusal below is about the extra parameter only.
        assert!(
            set.verify(&forge(&set, &header(&set), &c), &params(), now())
                .is_ok()
        );
        for (name, value) in [
            ("cty", json!("JWT")),
            ("zip", json!("DEF")),
            ("b64", json!(false)),
            ("x-private", json!({"a": 1})),
        ] {
            let mut h = header(&set);
            h[name] = value;
            assert_eq!(
                set.verify(&forge(&set, &h, &c), &params(), now()),
                Err(JwtError::UnexpectedHeader(name.to_owned())),
                "{name}"
            );
        }
    }

    #[test]
    fn unknown_kid_is_refused() {
        let (_, set) = ed_set();
        let (_, other) = ed_set();
        let t = other.sign(&claims());
        assert_eq!(set.verify(&t, &params(), now()), Err(JwtError::UnknownKey));
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_overlap_then_retires_it() {
        let (mut f, set0) = ed_set();
        let old = set0.sign(&claims());
        // Not due yet.
        assert!(!f.maintain(now() + 100, 86_400, 3_600));
        // Due: a new key signs, the old one still verifies during the overlap.
        let t1 = now() + 86_400;
        assert!(f.maintain(t1, 86_400, 3_600));
        let set1 = f.key_set().unwrap();
        assert_ne!(set1.signing_kid(), set0.signing_kid());
        assert_eq!(f.keys.len(), 2);
        // (Key-file times are simulated; token times stay real, the library checks those.)
        assert!(set1.verify(&old, &params(), now()).is_ok());
        let new = set1.sign(&claims());
        assert!(set1.verify(&new, &params(), now()).is_ok());
        assert_eq!(
            set0.verify(&new, &params(), now()),
            Err(JwtError::UnknownKey)
        );
        assert_eq!(set1.jwks()["keys"].as_array().unwrap().len(), 2);
        // After the overlap the old key is gone: its kid is refused.
        assert!(f.maintain(t1 + 3_600, 86_400, 3_600));
        let set2 = f.key_set().unwrap();
        assert_eq!(f.keys.len(), 1);
        assert_eq!(
            set2.verify(&old, &params(), now()),
            Err(JwtError::UnknownKey)
        );
    }

    #[test]
    fn key_set_is_shared_through_the_store_sealed_and_a_legacy_file_moves_in() {
        let rot = Rotation {
            rotate_after: 86_400,
            overlap: 3_600,
        };
        let pepper = Pepper::from_bytes([3; 32]);
        let dir = tempfile::tempdir().unwrap();
        // A key file from before the shared store.
        let mut legacy = EdKeyFile::default();
        legacy.maintain(now(), 86_400, 3_600);
        let path = dir.path().join(ED25519_KEYS_FILE);
        secrets::write_secret_file(&path, &serde_json::to_vec(&legacy).unwrap()).unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::store::sqlite::SqliteStore::open_in(dir.path()).unwrap());
        let a = KeyRing::ed25519(store.clone(), &pepper, dir.path(), rot, now()).unwrap();
        assert_eq!(a.current().signing_kid(), legacy.keys[0].kid);
        assert!(!path.exists(), "the plain key file is gone once moved");
        // Sealed: the stored bytes do not contain the seed.
        let (_, sealed) = store.signing_keys().unwrap().unwrap();
        let seed = legacy.keys[0].seed.as_bytes();
        assert!(!sealed.windows(seed.len()).any(|w| w == seed));
        // A second replica with the same pepper uses the same keys; a rotation on it is
        // adopted by the first.
        let b = KeyRing::ed25519(store.clone(), &pepper, dir.path(), rot, now() + 5).unwrap();
        assert_eq!(a.current().signing_kid(), b.current().signing_kid());
        let rotated = b.maintain(now() + 86_400).unwrap().expect("rotated");
        assert!(a.reload_if_allowed().unwrap());
        assert_eq!(a.current().signing_kid(), rotated);
        assert!(!a.reload_if_allowed().unwrap(), "rate limited");
        // Another pepper: a clear refusal naming the pepper file.
        let e = KeyRing::ed25519(store, &Pepper::from_bytes([4; 32]), dir.path(), rot, now())
            .err()
            .unwrap();
        assert!(e.to_string().contains("pepper"), "{e}");
    }
}
