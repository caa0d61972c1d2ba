//! End to end: a real `moat serve`, real HTTP, the real CLI, a real SQLite file.
//!
//! Identity (issue 3): every grant, every refusal, reuse detection, the refresh race,
//! revocation taking effect, and no plaintext secret in the database or the log.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::{Signer, SigningKey};
use hmac::{KeyInit, Mac};
use moat_tests::{
    daemon::Daemon,
    files_below,
    http::{Client, Reply as Response},
};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

fn client() -> Client {
    Client::new()
}

/// A daemon with tenant `acme`, user `alice` (password, roles user+ops) and one API key.
struct World {
    moat: Daemon,
    key: String,
    key_id: String,
}

fn world(extra: &str) -> World {
    let mut moat = Daemon::no_upstream(extra);
    moat.start();
    moat.cli_ok(&["tenants", "add", "acme"], None);
    moat.cli_ok(
        &[
            "users",
            "add",
            "alice",
            "--tenant",
            "acme",
            "--role",
            "user",
            "--role",
            "ops",
            "--password",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    let out = moat.cli_ok(
        &[
            "keys", "create", "--user", "alice", "--name", "ci", "--json",
        ],
        None,
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    World {
        key: v["key"].as_str().unwrap().to_owned(),
        key_id: v["key_id"].as_str().unwrap().to_owned(),
        moat,
    }
}

fn models(w: &World, bearer: Option<&str>) -> Response {
    let mut r = client().get(w.moat.url("/v1/models"));
    if let Some(b) = bearer {
        r = r.bearer_auth(b);
    }
    r.send().unwrap()
}

fn token_json(w: &World, body: Value) -> Response {
    client()
        .post(w.moat.url("/v1/auth/token"))
        .json(&body)
        .send()
        .unwrap()
}

fn token_form(w: &World, fields: &[(&str, &str)]) -> Response {
    let body = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    client()
        .post(w.moat.url("/v1/auth/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .unwrap()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Tokens from a successful token response.
fn tokens(r: Response) -> (String, String) {
    let status = r.status();
    assert_eq!(
        r.headers()
            .get("cache-control")
            .and_then(|v| v.to_str().ok()),
        Some("no-store")
    );
    let v: Value = r.json().unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    assert_eq!(v["expires_in"], 300);
    (
        v["access_token"].as_str().unwrap().to_owned(),
        v["refresh_token"].as_str().unwrap().to_owned(),
    )
}

/// Asserts a 200, showing the body otherwise.
fn assert_ok(r: Response) {
    let status = r.status();
    if status != 200 {
        panic!(
            "expected 200, got {status}: {}",
            r.text().unwrap_or_default()
        );
    }
}

/// Asserts an OpenAI-shaped error with `status`; returns the body.
/// A CLI run refused as the CLI refuses: exit status 1, nothing on stdout, `reason` on stderr.
fn assert_refused(out: &std::process::Output, reason: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(reason), "expected {reason:?} in: {err}");
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn assert_error(r: Response, status: u16) -> Value {
    assert_eq!(r.status().as_u16(), status);
    let v: Value = r.json().unwrap();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    v
}

/// Polls until `f` is true (for changes made by another process, which land within the
/// daemon's revocation poll).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn full_flow_and_no_plaintext_secret_in_the_database_or_log() {
    // No reuse grace: a spent token presented again is fatal at once (the grace is tested in
    // `auth_hardening`).
    let mut w = world("[auth]\nrefresh_reuse_grace_secs = 0\n");
    let mut secrets: Vec<String> = vec![PASSWORD.into(), w.key.clone()];

    // Public routes need no bearer; everything else does.
    assert_eq!(
        client()
            .get(w.moat.url("/healthz"))
            .send()
            .unwrap()
            .status(),
        200
    );
    let r = models(&w, None);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    assert_error(r, 401);
    assert_error(models(&w, Some("not-a-credential")), 401);

    // API key on the data plane.
    let r = models(&w, Some(&w.key));
    assert_eq!(r.status(), 200);
    let v: Value = r.json().unwrap();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "test-model");

    // JWKS: one Ed25519 key.
    let jwks: Value = client()
        .get(w.moat.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"][0]["kty"], "OKP");
    assert_eq!(jwks["keys"][0]["crv"], "Ed25519");

    // grant_type=api_key (JSON).
    let (at1, rt1) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    assert_ok(models(&w, Some(&at1)));

    // grant_type=password (form).
    let (at2, rt2) = tokens(token_form(
        &w,
        &[
            ("grant_type", "password"),
            ("username", "alice"),
            ("password", PASSWORD),
        ],
    ));
    assert_ok(models(&w, Some(&at2)));
    assert_error(
        token_form(
            &w,
            &[
                ("grant_type", "password"),
                ("username", "alice"),
                ("password", "wrong password here"),
            ],
        ),
        401,
    );

    // A refresh token is not a bearer.
    assert_error(models(&w, Some(&rt2)), 401);

    // grant_type=refresh_token rotates.
    let (at3, rt3) = tokens(token_form(
        &w,
        &[("grant_type", "refresh_token"), ("refresh_token", &rt2)],
    ));
    assert_ne!(rt3, rt2);
    assert_ok(models(&w, Some(&at3)));

    // Reuse of the spent rt2: refused, and the family dies — rt3 and at3 (and at2) too.
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "refresh_token", "refresh_token": rt2}),
        ),
        401,
    );
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "refresh_token", "refresh_token": rt3}),
        ),
        401,
    );
    assert_error(models(&w, Some(&at3)), 401);
    assert_error(models(&w, Some(&at2)), 401);
    // The api_key session is a different family and still stands.
    assert_ok(models(&w, Some(&at1)));

    // Revoke the api_key session with its access token: effective at once.
    let r = client()
        .post(w.moat.url("/v1/auth/revoke"))
        .json(&json!({"token": at1}))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_error(models(&w, Some(&at1)), 401);
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "refresh_token", "refresh_token": rt1}),
        ),
        401,
    );

    // Revoking with a refresh token ends that session too.
    let (at4, rt4) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    assert_ok(models(&w, Some(&at4)));
    let r = client()
        .post(w.moat.url("/v1/auth/revoke"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("token={rt4}&token_type_hint=refresh_token"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_error(models(&w, Some(&at4)), 401);

    // The key itself still works until the CLI revokes it; then it stops, with the sessions
    // opened with it.
    let (at5, rt5) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    assert_ok(models(&w, Some(&w.key)));
    let listed = w.moat.cli_ok(&["keys", "list"], None);
    assert!(listed.contains(&w.key_id) && !listed.contains(&w.key));
    w.moat.cli_ok(&["keys", "revoke", &w.key_id], None);
    eventually("revoked key refused", || {
        models(&w, Some(&w.key)).status() == 401
    });
    eventually("session of the revoked key refused", || {
        models(&w, Some(&at5)).status() == 401
    });
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "refresh_token", "refresh_token": rt5}),
        ),
        401,
    );

    // The log writer batches lines: waited for.
    w.moat.wait_log("refresh_reuse_detected");
    let log = w.moat.log();
    assert!(
        log.contains(&w.key_id),
        "the key id should appear in the log"
    );

    secrets.extend([at1, rt1, at2, rt2, at3, rt3, at4, rt4, at5, rt5]);
    w.moat.stop();
    // Every plaintext secret used, against every byte moat wrote: the database (and its WAL),
    // the log. Secret files are 0600 and hold only server secrets.
    let mut files = files_below(&w.moat.data_dir());
    files.push(w.moat.log_path().to_path_buf());
    let dump = w.moat.store_dump();
    match &dump {
        // On PostgreSQL: everything the database holds.
        Some(d) => files.push(d.clone()),
        None => assert!(files.iter().any(|f| f.ends_with("moat.db"))),
    }
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        for s in &secrets {
            assert!(
                !contains(&bytes, s.as_bytes()),
                "{} contains a plaintext secret",
                f.display()
            );
            // Nor the secret half of an API key on its own.
            if let Some((_, secret_part)) = s.strip_prefix("moat_").and_then(|r| r.split_once('_'))
            {
                assert!(!contains(&bytes, secret_part.as_bytes()));
            }
        }
    }
    for f in files_below(&w.moat.data_dir().join("secrets")) {
        let mode = std::fs::metadata(&f).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{}", f.display());
    }
    if dump.is_none() {
        let db_mode = std::fs::metadata(w.moat.data_dir().join("moat.db"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(db_mode & 0o777, 0o600);
    }
}

#[test]
fn unknown_key_id_and_wrong_secret_get_byte_identical_401s_and_bad_checksums_are_refused() {
    let w = world("");
    let body = |r: Response| (r.status().as_u16(), r.bytes().unwrap().to_vec());
    // A well-formed key (valid checksum) whose id this daemon does not know.
    let stranger = moat::auth::api_key::mint(
        &moat::auth::secrets::Pepper::from_bytes([9; 32]),
        &moat::auth::api_key::new_key_id(),
    );
    let unknown = body(models(&w, Some(&stranger.plaintext)));
    // The real key id with another secret, checksum correct.
    let forged =
        moat::auth::api_key::mint(&moat::auth::secrets::Pepper::from_bytes([9; 32]), &w.key_id);
    let wrong = body(models(&w, Some(&forged.plaintext)));
    assert_eq!(unknown.0, 401);
    assert_eq!(unknown, wrong);
    // Also once the real key is cached.
    assert_ok(models(&w, Some(&w.key)));
    assert_eq!(body(models(&w, Some(&forged.plaintext))), unknown);
    // Bad checksum: last character changed.
    let mut bad = w.key.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == 'A' { 'B' } else { 'A' });
    assert_error(models(&w, Some(&bad)), 401);
}

/// Signs arbitrary header and claims with the daemon's own current Ed25519 key (read from its
/// store, opened with its pepper), so a refusal can only be about the defect under test.
struct Forger {
    key: SigningKey,
    kid: String,
}

impl Forger {
    fn new(moat: &Daemon) -> Forger {
        let config = moat::config::Config::load(moat.config_path()).unwrap();
        let store = moat::store::open(&config).unwrap();
        let pepper: [u8; 32] = std::fs::read(moat.data_dir().join("secrets/pepper"))
            .unwrap()
            .try_into()
            .unwrap();
        let pepper = moat::auth::secrets::Pepper::from_bytes(pepper);
        let file = moat::auth::jwt::stored_ed25519_keys(store.as_ref(), &pepper)
            .unwrap()
            .expect("the daemon made its signing keys");
        let newest = file.keys.iter().max_by_key(|k| k.created_at).unwrap();
        let seed: [u8; 32] = URL_SAFE_NO_PAD
            .decode(&newest.seed)
            .unwrap()
            .try_into()
            .unwrap();
        Forger {
            key: SigningKey::from_bytes(&seed),
            kid: newest.kid.clone(),
        }
    }

    fn header(&self) -> Value {
        json!({"alg": "EdDSA", "typ": "at+jwt", "kid": self.kid})
    }

    fn sign(&self, header: &Value, claims: &Value) -> String {
        let msg = signing_input(header, claims);
        let sig = self.key.sign(msg.as_bytes());
        format!("{msg}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    )
}

fn claims_of(token: &str) -> Value {
    let p = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
}

#[test]
fn every_forged_or_broken_access_token_is_refused() {
    let w = world("");
    let (at, _) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    let f = Forger::new(&w.moat);
    let good = claims_of(&at);
    let now = good["iat"].as_i64().unwrap();

    // Control: a token we forge with the real key, header and claims is accepted, so each
    // refusal below is caused by its one defect.
    assert_eq!(
        models(&w, Some(&f.sign(&f.header(), &good))).status(),
        200,
        "control token refused"
    );

    let mut cases: BTreeMap<String, String> = BTreeMap::new();
    let with = |k: &str, v: Value| {
        let mut c = good.clone();
        c[k] = v;
        c
    };
    cases.insert(
        "expired".into(),
        f.sign(&f.header(), &with("exp", json!(now - 120))),
    );
    cases.insert(
        "nbf in the future".into(),
        f.sign(&f.header(), &with("nbf", json!(now + 120))),
    );
    cases.insert(
        "iat in the future".into(),
        f.sign(&f.header(), &with("iat", json!(now + 120))),
    );
    cases.insert(
        "lifetime over the maximum".into(),
        f.sign(&f.header(), &with("exp", json!(now + 3600))),
    );
    cases.insert(
        "wrong aud".into(),
        f.sign(&f.header(), &with("aud", json!("other"))),
    );
    cases.insert(
        "wrong iss".into(),
        f.sign(&f.header(), &with("iss", json!("evil"))),
    );
    cases.insert(
        "aud as array".into(),
        f.sign(&f.header(), &with("aud", json!(["moat", "other"]))),
    );
    cases.insert(
        "other tenant".into(),
        f.sign(&f.header(), &with("tenant", json!("globex"))),
    );
    cases.insert(
        "other subject".into(),
        f.sign(&f.header(), &with("sub", json!("u_someoneelse"))),
    );
    cases.insert(
        "unknown session".into(),
        f.sign(&f.header(), &with("sid", json!("nosuchsession"))),
    );
    for claim in [
        "iss", "aud", "sub", "tenant", "sid", "jti", "iat", "nbf", "exp",
    ] {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(claim);
        cases.insert(format!("missing {claim}"), f.sign(&f.header(), &c));
    }
    for typ in [json!("JWT"), json!("jwt"), Value::Null] {
        let mut h = f.header();
        h["typ"] = typ.clone();
        cases.insert(format!("typ {typ}"), f.sign(&h, &good));
    }
    let mut h = f.header();
    h.as_object_mut().unwrap().remove("typ");
    cases.insert("no typ".into(), f.sign(&h, &good));
    for name in ["jku", "x5u", "x5c", "jwk", "crit"] {
        let mut h = f.header();
        h[name] = json!("https://attacker.invalid/");
        cases.insert(format!("header {name}"), f.sign(&h, &good));
    }
    let mut h = f.header();
    h["kid"] = json!("ed-retired0000");
    cases.insert("unknown kid".into(), f.sign(&h, &good));
    let mut h = f.header();
    h.as_object_mut().unwrap().remove("kid");
    cases.insert("no kid".into(), f.sign(&h, &good));

    // alg none, with an empty signature and with one.
    let mut h = f.header();
    h["alg"] = json!("none");
    cases.insert(
        "alg none, empty signature".into(),
        format!("{}.", signing_input(&h, &good)),
    );
    cases.insert("alg none, signed".into(), f.sign(&h, &good));

    // HS256 keyed with the published Ed25519 public key (algorithm confusion).
    let jwks: Value = client()
        .get(w.moat.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let x = URL_SAFE_NO_PAD
        .decode(jwks["keys"][0]["x"].as_str().unwrap())
        .unwrap();
    let mut h = f.header();
    h["alg"] = json!("HS256");
    let msg = signing_input(&h, &good);
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&x).unwrap();
    mac.update(msg.as_bytes());
    cases.insert(
        "HS256 with the public key".into(),
        format!(
            "{msg}.{}",
            URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
        ),
    );

    // Tampered payload and stripped signature, on the daemon's own real token.
    let parts: Vec<&str> = at.split('.').collect();
    let mut tampered = good.clone();
    tampered["jti"] = json!("another");
    cases.insert(
        "tampered payload".into(),
        format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&tampered).unwrap()),
            parts[2]
        ),
    );
    cases.insert(
        "stripped signature".into(),
        format!("{}.{}.", parts[0], parts[1]),
    );
    cases.insert("two parts".into(), format!("{}.{}", parts[0], parts[1]));

    let mut accepted = Vec::new();
    for (name, token) in &cases {
        let r = models(&w, Some(token));
        if r.status() != 401 {
            accepted.push(format!("{name}: {}", r.status()));
        } else {
            let v: Value = r.json().unwrap();
            assert_eq!(v["error"]["type"], "authentication_error", "{name}");
        }
    }
    assert!(accepted.is_empty(), "accepted: {accepted:?}");
    // The genuine token still works after all that.
    assert_ok(models(&w, Some(&at)));
}

#[test]
fn without_grace_concurrent_refreshes_of_one_token_have_exactly_one_winner() {
    let w = world("[auth]\nrefresh_reuse_grace_secs = 0\n");
    let (_, rt) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let url = w.moat.url("/v1/auth/token");
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url, rt) = (barrier.clone(), url.clone(), rt.clone());
            std::thread::spawn(move || {
                let c = client();
                barrier.wait();
                c.post(url)
                    .json(&json!({"grant_type": "refresh_token", "refresh_token": rt}))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        1,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 401),
        "{statuses:?}"
    );
}

#[test]
fn password_failures_are_throttled_with_retry_after() {
    let w = world("[auth]\npassword_max_failures_per_user = 3\n");
    for _ in 0..3 {
        assert_error(
            token_json(
                &w,
                json!({"grant_type": "password", "username": "alice", "password": "nope nope nope"}),
            ),
            401,
        );
    }
    let r = token_json(
        &w,
        json!({"grant_type": "password", "username": "alice", "password": PASSWORD}),
    );
    let retry: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=900).contains(&retry));
    assert_error(r, 429);
}

#[test]
fn token_endpoint_parses_strictly() {
    let w = world("");
    let v = assert_error(
        token_json(&w, json!({"grant_type": "client_credentials"})),
        400,
    );
    assert_eq!(v["error"]["code"], "unsupported_grant_type");
    // Unknown field, a field of another grant, a missing one, a wrong type.
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "api_key", "api_key": w.key, "tenant": "x"}),
        ),
        400,
    );
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "api_key", "api_key": w.key, "username": "alice"}),
        ),
        400,
    );
    assert_error(token_json(&w, json!({"grant_type": "api_key"})), 400);
    assert_error(token_json(&w, json!({"grant_type": 1})), 400);
    // Duplicate keys.
    let r = client()
        .post(w.moat.url("/v1/auth/token"))
        .header("content-type", "application/json")
        .body(r#"{"grant_type":"api_key","grant_type":"password"}"#)
        .send()
        .unwrap();
    assert_error(r, 400);
    let r = client()
        .post(w.moat.url("/v1/auth/token"))
        .header("content-type", "text/plain")
        .body("grant_type=api_key")
        .send()
        .unwrap();
    assert_error(r, 415);
    let r = client()
        .post(w.moat.url("/v1/auth/token"))
        .header("content-type", "application/json")
        .body(vec![b' '; 64 * 1024])
        .send()
        .unwrap();
    assert_error(r, 413);
    // Wrong method, unknown route.
    assert_error(
        client().get(w.moat.url("/v1/auth/token")).send().unwrap(),
        405,
    );
    assert_error(client().get(w.moat.url("/v1/nope")).send().unwrap(), 404);
}

#[test]
fn disabling_a_user_ends_its_keys_and_sessions() {
    let w = world("");
    let (at, rt) = tokens(token_json(
        &w,
        json!({"grant_type": "password", "username": "alice", "password": PASSWORD}),
    ));
    assert_ok(models(&w, Some(&at)));
    assert_ok(models(&w, Some(&w.key)));
    w.moat.cli_ok(&["users", "disable", "alice"], None);
    eventually("disabled user's key refused", || {
        models(&w, Some(&w.key)).status() == 401
    });
    assert_error(models(&w, Some(&at)), 401);
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "refresh_token", "refresh_token": rt}),
        ),
        401,
    );
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "password", "username": "alice", "password": PASSWORD}),
        ),
        401,
    );
    let users = w.moat.cli_ok(&["users", "list", "--json"], None);
    let v: Value = serde_json::from_str(&users).unwrap();
    assert!(v[0]["disabled_at"].is_i64());
    assert!(
        !users.contains("argon2"),
        "password hashes must not be listed"
    );
}

#[test]
fn cli_refuses_bad_input_and_passwd_works() {
    let w = world("");
    let out = w
        .moat
        .cli(&["users", "add", "bob", "--tenant", "nope"], None);
    assert_refused(&out, "tenant `nope` not found");
    let out = w.moat.cli(
        &["users", "add", "bob", "--tenant", "acme", "--password"],
        Some("short\n"),
    );
    assert_refused(&out, "a password needs at least");
    let out = w.moat.cli(
        &["keys", "create", "--user", "alice", "--role", "admin"],
        None,
    );
    // A key must not widen its user's roles.
    assert_refused(
        &out,
        "user `alice` does not have role `admin`: a key can only narrow its user's roles",
    );
    let users = w.moat.cli_ok(&["users", "list", "--json"], None);
    assert!(!users.contains("\"bob\""), "no user was made: {users}");
    w.moat.cli_ok(
        &["users", "passwd", "alice"],
        Some("a brand new password\n"),
    );
    tokens(token_json(
        &w,
        json!({"grant_type": "password", "username": "alice", "password": "a brand new password"}),
    ));
    assert_error(
        token_json(
            &w,
            json!({"grant_type": "password", "username": "alice", "password": PASSWORD}),
        ),
        401,
    );
    let t = w.moat.cli_ok(&["tenants", "list"], None);
    assert!(t.contains("acme"));
    // Plain `keys create` prints the key alone on stdout.
    let k = w.moat.cli_ok(&["keys", "create", "--user", "alice"], None);
    assert_ok(models(&w, Some(k.trim())));
}

#[test]
fn hs256_mode_issues_verifiable_tokens_and_publishes_no_key() {
    let w = world("[auth]\nalgorithm = \"HS256\"\n");
    let (at, _) = tokens(token_json(
        &w,
        json!({"grant_type": "api_key", "api_key": w.key}),
    ));
    let h: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD
            .decode(at.split('.').next().unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(h["alg"], "HS256");
    assert_eq!(h["typ"], "at+jwt");
    assert_ok(models(&w, Some(&at)));
    let jwks: Value = client()
        .get(w.moat.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(jwks["keys"], json!([]));
    let secret = w.moat.data_dir().join("secrets/jwt-hs256.key");
    assert_eq!(std::fs::read(&secret).unwrap().len(), 32);
}

#[test]
fn a_short_hs256_secret_stops_the_daemon_from_starting() {
    let mut m =
        Daemon::no_upstream("[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"short.key\"\n");
    let path = m.dir().join("short.key");
    std::fs::write(&path, [7u8; 31]).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (status, err) = m.run_to_exit(None);
    assert_eq!(status.code(), Some(1), "{err}");
    let want = format!(
        "key `auth.hs256_secret_file`: {} holds 31 bytes; an HS256 secret needs at least 32 bytes",
        path.display()
    );
    assert!(err.contains(&want), "expected {want:?} in: {err}");
}
