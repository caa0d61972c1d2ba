//! End to end: two gateway replicas (two real `moat serve`) on one real PostgreSQL
//! ([`moat_tests::servers`]), identity made with the real CLI.
//!
//! - a key created through one replica works on the other;
//! - a key revoked through replica A is refused by replica B within 100 ms (measured; B's
//!   revocation poll is set far longer, so only `LISTEN/NOTIFY` can do it), and B's open
//!   stream for it ends;
//! - concurrent refreshes of one token, spread over both replicas, have exactly one winner;
//! - PostgreSQL killed under load: credentials B verified before go on from its cache,
//!   anything else is a 503, and no other 5xx appears;
//! - both backends behind their secrets: PostgreSQL over TLS only, verified against the
//!   operator's CA, and Redis with a password.

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use moat_tests::{
    Daemon, Events, Sim,
    daemon::with_role,
    http::Client,
    servers::{Pg, Redis, TestCa},
};
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";

/// One replica's config: the shared database, `rest` (pools, models, auth...).
fn replica(pg: &Pg, db: &str, rest: &str) -> Daemon {
    replica_with(pg, db, "", rest, &[])
}

/// [`replica`] with more `[store]` lines and files beside the config.
fn replica_with(
    pg: &Pg,
    db: &str,
    store_extra: &str,
    rest: &str,
    files: &[(&str, &str)],
) -> Daemon {
    let rest = with_role(rest, "user", "\"model:*\", \"inference:*\"");
    let d = Daemon::off(
        "",
        &format!("{rest}\n{}{store_extra}", pg.store_toml(db, "pgpass")),
    );
    d.write_file("pgpass", pg.password());
    for (name, text) in files {
        d.write_file(name, text);
    }
    d
}

/// Gives `b` the pepper of `a` (every replica reads the same pepper from its own file: API
/// keys and refresh tokens are stored as HMACs under it). `a` must have made its own.
fn share_pepper(a: &Daemon, b: &Daemon) {
    // The CLI makes b's data directory and a pepper with the right owner and mode; then its
    // bytes are replaced in place.
    b.cli_ok(&["tenants", "list"], None);
    let pepper = std::fs::read(a.data_dir().join("secrets/pepper")).expect("a's pepper");
    std::fs::write(b.data_dir().join("secrets/pepper"), pepper).expect("b's pepper");
}

/// Two started replicas on one database; tenant `acme`, user `alice` (role `user`), and a
/// key made through A: returns (a, b, key, key id).
fn pair(pg: &Pg, rest: &str) -> (Daemon, Daemon, String, String) {
    pair_with(pg, &pg.create_database(), "", rest, &[])
}

/// [`pair`] on database `db`, with [`replica_with`]'s extras.
fn pair_with(
    pg: &Pg,
    db: &str,
    store_extra: &str,
    rest: &str,
    files: &[(&str, &str)],
) -> (Daemon, Daemon, String, String) {
    let mut a = replica_with(pg, db, store_extra, rest, files);
    let mut b = replica_with(pg, db, store_extra, rest, files);
    // One HS256 secret for configs that use it: access tokens then verify on every replica.
    for d in [&a, &b] {
        d.write_file(
            "jwt.key",
            "0123456789abcdef0123456789abcdef-shared-test-secret",
        );
    }
    a.cli_ok(&["tenants", "add", "acme"], None);
    a.cli_ok(
        &[
            "users", "add", "alice", "--tenant", "acme", "--role", "user",
        ],
        None,
    );
    let v: Value = serde_json::from_str(
        a.cli_ok(&["keys", "create", "--user", "alice", "--json"], None)
            .trim(),
    )
    .unwrap();
    share_pepper(&a, &b);
    a.start();
    b.start();
    (
        a,
        b,
        v["key"].as_str().unwrap().to_owned(),
        v["key_id"].as_str().unwrap().to_owned(),
    )
}

/// `POST /v1/auth/token` on `d` with `grant`; the answer's JSON.
fn token(d: &Daemon, grant: Value) -> Value {
    Client::new()
        .post(d.url("/v1/auth/token"))
        .json(&grant)
        .send()
        .unwrap()
        .json()
        .unwrap()
}

fn models_status(d: &Daemon, key: &str) -> u16 {
    Client::new()
        .get(d.url("/v1/models"))
        .bearer_auth(key)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn a_key_made_on_one_replica_works_on_the_other_and_the_schema_is_migrated_once() {
    let pg = Pg::start();
    let (a, b, key, _) = pair(
        &pg,
        "[pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n",
    );
    assert_eq!(models_status(&a, &key), 200);
    assert_eq!(models_status(&b, &key), 200);
    // A wrong secret with the right id is refused on both.
    let mut bad = key.clone();
    bad.replace_range(key.len() - 10..key.len() - 6, "AAAA");
    assert_eq!(models_status(&b, &bad), 401);
    // `moat store migrate` against the migrated database: nothing to do, same version.
    let out = b.cli_ok(&["store", "migrate"], None);
    let version = moat::store::MIGRATIONS.len().to_string();
    assert!(out.contains(&format!("version {version}")), "{out}");
    let db = a.read_config();
    let db = db
        .lines()
        .find_map(|l| l.strip_prefix("url = \""))
        .and_then(|u| u.rsplit('/').next())
        .map(|u| u.trim_end_matches('"').to_owned())
        .unwrap();
    assert_eq!(
        pg.psql(&db, "SELECT version FROM moat_schema").trim(),
        version
    );
    // Nothing identity-shaped is in either replica's data directory: it is all in PostgreSQL,
    // the signing keys too (one sealed row).
    for d in [&a, &b] {
        assert!(!d.data_dir().join("moat.db").exists());
        assert!(!d.data_dir().join("secrets/jwt-ed25519.json").exists());
    }
    assert_eq!(
        pg.psql(&db, "SELECT count(*) FROM signing_keys").trim(),
        "1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_revoked_on_a_is_refused_by_b_within_100_ms_and_its_stream_on_b_ends() {
    let pg = Pg::start();
    let sim = Sim::start(&["--chunks", "400", "--tokens-per-sec", "20"]);
    let rest = format!(
        // B's poll is 10 s: only the notification can make the 100 ms.
        "[auth]\nrevocation_poll_ms = 10000\n\
         [pools.p]\nhosts = [\"{}\"]\n[models.chat]\npool = \"p\"\n",
        sim.addr
    );
    let (a, b, key, key_id) = tokio::task::block_in_place(|| pair(&pg, &rest));
    // B has verified (and cached) the key.
    assert_eq!(tokio::task::block_in_place(|| models_status(&b, &key)), 200);
    let body = json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 400, "stream": true});
    let resp = moat_tests::send(
        "POST",
        &b.url(CHAT),
        &[
            ("content-type", "application/json"),
            ("authorization", &format!("Bearer {key}")),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    assert!(events.next().await.unwrap().is_some());

    // Revoke through replica A (its CLI, on its config: the shared store).
    tokio::task::block_in_place(|| a.cli_ok(&["keys", "revoke", &key_id], None));
    let revoked = Instant::now();
    let refused_after = tokio::task::block_in_place(|| {
        loop {
            let status = models_status(&b, &key);
            if status == 401 {
                return revoked.elapsed();
            }
            assert_eq!(status, 200);
            assert!(
                revoked.elapsed() < Duration::from_secs(5),
                "B never refused the revoked key"
            );
        }
    });
    eprintln!("revocation reached replica B after {refused_after:?}");
    assert!(
        refused_after < Duration::from_millis(100),
        "B refused the key {refused_after:?} after the revocation"
    );
    // B's open stream for the key ends, saying why.
    let mut last = String::new();
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match events.next().await {
                Ok(Some(e)) => last = e,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "B kept streaming for a revoked key");
    assert!(last.contains("revoked"), "the last event says why: {last}");
    drop(a);
}

#[test]
fn concurrent_refreshes_of_one_token_on_two_replicas_have_exactly_one_winner() {
    let pg = Pg::start();
    let (a, b, key, _) = pair(
        &pg,
        "[auth]\nrefresh_reuse_grace_secs = 0\n\
         [pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n",
    );
    let v = token(&a, json!({"grant_type": "api_key", "api_key": key}));
    let rt = v["refresh_token"]
        .as_str()
        .expect("refresh token")
        .to_owned();
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let urls = [a.url("/v1/auth/token"), b.url("/v1/auth/token")];
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let (barrier, url, rt) = (barrier.clone(), urls[i % 2].clone(), rt.clone());
            std::thread::spawn(move || {
                let c = Client::new();
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
    // A loser presented a spent token: the family is revoked, so the access token from the
    // first grant is refused on both replicas now.
    let at = v["access_token"].as_str().unwrap();
    assert_eq!(models_status(&a, at), 401);
    assert_eq!(models_status(&b, at), 401);
}

fn jwks(d: &Daemon) -> Value {
    Client::new()
        .get(d.url("/.well-known/jwks.json"))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

#[test]
fn the_default_eddsa_token_from_a_works_on_b_with_one_key_set_sealed_in_the_store() {
    let pg = Pg::start();
    let (a, b, key, _) = pair(
        &pg,
        "[pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n",
    );
    // One key set for both: the same JWKS, one EdDSA key, and no key file on either disk.
    let (ja, jb) = (jwks(&a), jwks(&b));
    assert_eq!(ja, jb);
    assert_eq!(ja["keys"][0]["alg"], "EdDSA", "{ja}");
    for d in [&a, &b] {
        assert!(!d.data_dir().join("secrets/jwt-ed25519.json").exists());
    }
    let v = token(&a, json!({"grant_type": "api_key", "api_key": key}));
    let at = v["access_token"].as_str().expect("access token");
    assert_eq!(models_status(&b, at), 200);
    assert_eq!(models_status(&a, at), 200);
    let v = token(
        &b,
        json!({"grant_type": "refresh_token", "refresh_token": v["refresh_token"]}),
    );
    let at2 = v["access_token"].as_str().expect("refreshed access token");
    assert_eq!(models_status(&a, at2), 200);
}

#[test]
fn a_replica_with_another_pepper_cannot_open_the_signing_keys_and_says_so() {
    let pg = Pg::start();
    let db = pg.create_database();
    let rest = "[pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n";
    let mut a = replica(&pg, &db, rest);
    a.start();
    a.wait_log("worker started");
    // C has its own pepper (made by the CLI), not A's.
    let mut c = replica(&pg, &db, rest);
    c.cli_ok(&["tenants", "list"], None);
    let (status, log) = c.run_to_exit(None);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("signing keys in the store cannot be decrypted with this replica's pepper"),
        "{log}"
    );
    // A is unaffected.
    assert_eq!(jwks(&a)["keys"][0]["alg"], "EdDSA");
}

#[test]
fn with_one_hs256_secret_an_access_token_from_a_works_on_b() {
    let pg = Pg::start();
    let (a, b, key, _) = pair(
        &pg,
        "[auth]\nalgorithm = \"HS256\"\nhs256_secret_file = \"jwt.key\"\n\
         [pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n",
    );
    let v = token(&a, json!({"grant_type": "api_key", "api_key": key}));
    let at = v["access_token"].as_str().expect("access token");
    assert_eq!(models_status(&b, at), 200);
    // Refreshed on B, the new access token works on A.
    let v = token(
        &b,
        json!({"grant_type": "refresh_token", "refresh_token": v["refresh_token"]}),
    );
    let at2 = v["access_token"].as_str().expect("refreshed access token");
    assert_eq!(models_status(&a, at2), 200);
}

#[test]
fn postgres_killed_under_load_cached_credentials_go_on_and_the_rest_get_503() {
    let mut pg = Pg::start();
    let (a, b, key, _) = pair(
        &pg,
        "[auth]\ncache_ttl_secs = 60\n\
         [pools.local]\nhosts = [\"127.0.0.1:9\"]\n[models.m]\npool = \"local\"\n",
    );
    // A second key, never presented to B before the store goes away.
    let v: Value = serde_json::from_str(
        a.cli_ok(&["keys", "create", "--user", "alice", "--json"], None)
            .trim(),
    )
    .unwrap();
    let unseen = v["key"].as_str().unwrap().to_owned();
    assert_eq!(models_status(&b, &key), 200);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = b.url("/v1/models");
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (stop, url, key) = (stop.clone(), url.clone(), key.clone());
            std::thread::spawn(move || {
                let c = Client::new();
                let mut statuses = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    statuses.push(
                        c.get(&url)
                            .bearer_auth(&key)
                            .send()
                            .unwrap()
                            .status()
                            .as_u16(),
                    );
                }
                statuses
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    pg.kill();
    std::thread::sleep(Duration::from_millis(700));
    // Unseen credentials: the store cannot vouch for them.
    let r = Client::new().get(&url).bearer_auth(&unseen).send().unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error", "{body}");
    assert!(
        body["error"]["message"].as_str().unwrap().contains("store"),
        "{body}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let statuses: Vec<u16> = load.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert!(statuses.len() > 10, "{}", statuses.len());
    assert!(
        statuses.iter().all(|&s| s == 200),
        "a credential verified before the outage kept working: {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    drop(a);
}

/// Two replicas whose quotas live in `redis`, with `quotas` (TOML lines of `[quotas]` after
/// the backend) and a chat model on `sim`.
fn quota_pair(pg: &Pg, redis: &Redis, sim: &Sim, quotas: &str) -> (Daemon, Daemon, String) {
    let rest = format!(
        "[quotas]\nbackend = \"redis\"\nredis_url = \"{}\"\n{quotas}\n\
         [pools.p]\nhosts = [\"{}\"]\n[models.chat]\npool = \"p\"\n",
        redis.url(),
        sim.addr
    );
    let (a, b, key, _) = pair(pg, &rest);
    (a, b, key)
}

fn chat_status(url: &str, key: &str) -> (u16, Option<String>, Value) {
    let r = Client::new()
        .post(url)
        .bearer_auth(key)
        .json(
            &json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4}),
        )
        .send()
        .unwrap();
    let status = r.status().as_u16();
    let retry = r
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    (status, retry, r.json().unwrap_or(Value::Null))
}

/// `n` chats from `threads` threads, alternating between the replicas; the statuses.
fn load(
    urls: [String; 2],
    key: &str,
    n: usize,
    threads: usize,
) -> Vec<(u16, Option<String>, Value)> {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (urls, key, next) = (urls.clone(), key.to_owned(), next.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= n {
                        return out;
                    }
                    out.push(chat_status(&urls[i % 2], &key));
                }
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

#[test]
fn a_quota_of_100_per_minute_admits_exactly_100_across_two_replicas() {
    let pg = Pg::start();
    let redis = Redis::start();
    let sim = Sim::start(&[]);
    let (a, b, key) = quota_pair(
        &pg,
        &redis,
        &sim,
        "[quotas.key]\nrequests_per_minute = 100\n",
    );
    let results = load([a.url(CHAT), b.url(CHAT)], &key, 160, 8);
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let refused: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert_eq!(ok, 100, "admitted across both replicas");
    for (status, retry, body) in &refused {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
        let retry: u64 = retry.as_deref().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
}

#[test]
fn redis_killed_under_load_denies_with_503_or_counts_locally_as_configured() {
    let pg = Pg::start();
    let sim = Sim::start(&[]);
    for posture in ["deny", "local"] {
        let mut redis = Redis::start();
        let (a, b, key) = quota_pair(
            &pg,
            &redis,
            &sim,
            &format!(
                "on_backend_error = \"{posture}\"\n[quotas.key]\nrequests_per_minute = 1000\n"
            ),
        );
        let urls = [a.url(CHAT), b.url(CHAT)];
        let before = load(urls.clone(), &key, 20, 4);
        assert!(before.iter().all(|r| r.0 == 200), "{posture}: {before:?}");
        redis.kill();
        // Requests covered by a share leased before the outage (charged in Redis then) are
        // admitted until that share ends (0.5 s); after that the posture decides.
        std::thread::sleep(Duration::from_millis(1200));
        let after = load(urls.clone(), &key, 40, 4);
        for (status, retry, body) in &after {
            match posture {
                "deny" => {
                    assert_eq!(*status, 503, "{body}");
                    assert_eq!(body["error"]["code"], "quota_backend_unavailable", "{body}");
                    assert!(retry.is_some(), "503 without Retry-After");
                }
                _ => assert_eq!(*status, 200, "{body}"),
            }
        }
        let needle = match posture {
            "deny" => "refusing quota-limited requests with 503",
            _ => "COUNTING ON THIS REPLICA ONLY",
        };
        for d in [&a, &b] {
            d.wait_log(needle);
        }
    }
}

/// A chat on `url` from its own thread: its status, or `None` if none came within `wait`
/// (admitted, and held by the hanging upstream).
fn chat_within(url: &str, key: &str, wait: Duration) -> Option<u16> {
    let (tx, rx) = std::sync::mpsc::channel();
    let (url, key) = (url.to_owned(), key.to_owned());
    std::thread::spawn(move || {
        let r = Client::new()
            .post(url)
            .bearer_auth(key)
            .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
            .send();
        if let Ok(r) = r {
            let _ = tx.send(r.status().as_u16());
        }
    });
    rx.recv_timeout(wait).ok()
}

#[test]
fn slots_held_by_a_killed_replica_come_back_after_the_lease_and_not_before() {
    const LEASE_SECS: u64 = 6;
    let pg = Pg::start();
    let redis = Redis::start();
    // An upstream that answers after a minute: an admitted chat holds its slot until then.
    let sim = Sim::start(&["--latency-ms", "60000"]);
    let (mut a, b, key) = quota_pair(
        &pg,
        &redis,
        &sim,
        &format!("redis_lease_secs = {LEASE_SECS}\n[quotas.key]\nconcurrent_requests = 2\n"),
    );
    let worker = a.wait_log("worker started")["pid"]
        .as_u64()
        .expect("worker pid") as i32;
    // Two chats on A take both slots; B then refuses at once.
    for _ in 0..2 {
        assert_eq!(
            chat_within(&a.url(CHAT), &key, Duration::from_millis(300)),
            None
        );
    }
    let (status, _, body) = chat_status(&b.url(CHAT), &key);
    assert_eq!(status, 429, "{body}");
    // A dies without any clean-up: its worker first (so no SIGTERM from the supervisor's
    // death lets it settle), then the supervisor.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    a.kill();
    let killed = Instant::now();
    let mut refusals_after_kill = 0;
    let admitted = loop {
        let sent = Instant::now();
        match chat_within(&b.url(CHAT), &key, Duration::from_millis(1500)) {
            Some(429) => refusals_after_kill += 1,
            Some(other) => panic!("B answered {other} while A's slots were held"),
            None => break sent.duration_since(killed),
        }
        assert!(
            killed.elapsed() < Duration::from_secs(LEASE_SECS + 10),
            "A's slots never came back"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    // A renewed its leases at most a third of a lease before it died, so they end between
    // 2/3 of a lease and one lease after the kill.
    assert!(refusals_after_kill > 0);
    assert!(
        admitted >= Duration::from_millis(LEASE_SECS * 1000 * 2 / 3 - 300),
        "slots came back {admitted:?} after the kill, before the lease ran out"
    );
    assert!(
        admitted <= Duration::from_secs(LEASE_SECS + 3),
        "slots came back only {admitted:?} after the kill"
    );
}

#[test]
fn replicas_reach_postgres_over_verified_tls_only_and_redis_with_its_password() {
    const REDIS_PASSWORD: &str = "test-only-redis-password";
    let ca = TestCa::for_loopback();
    // The server refuses sessions without TLS (`hostssl` only).
    let pg = Pg::start_tls(&ca);
    let redis = Redis::start_with_password(REDIS_PASSWORD);
    let sim = Sim::start(&[]);
    let db = format!("{}?sslmode=require", pg.create_database());
    let models = format!(
        "[pools.p]\nhosts = [\"{}\"]\n[models.chat]\npool = \"p\"\n",
        sim.addr
    );
    let quotas = format!(
        "[quotas]\nbackend = \"redis\"\nredis_url = \"{}\"\n\
         redis_password_file = \"redispass\"\n[quotas.key]\nrequests_per_minute = 5\n",
        redis.url()
    );
    let files = [
        ("ca.pem", ca.ca_pem.as_str()),
        ("redispass", REDIS_PASSWORD),
    ];
    let (a, b, key, _) = pair_with(
        &pg,
        &db,
        "ca_file = \"ca.pem\"\n",
        &format!("{quotas}{models}"),
        &files,
    );
    // The identity both replicas share travelled over TLS.
    assert_eq!(models_status(&a, &key), 200);
    assert_eq!(models_status(&b, &key), 200);
    // Redis took the password: 5 per minute across both replicas, then 429s (a refused AUTH
    // would have been 503s).
    let statuses: Vec<u16> = load([a.url(CHAT), b.url(CHAT)], &key, 8, 1)
        .into_iter()
        .map(|r| r.0)
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 429),
        "{statuses:?}"
    );

    // Without the password Redis refuses the replica: the documented 503 with Retry-After,
    // never an uncounted pass.
    let mut c = replica_with(
        &pg,
        &db,
        "ca_file = \"ca.pem\"\n",
        &format!(
            "{}{models}",
            quotas.replace("redis_password_file = \"redispass\"\n", "")
        ),
        &files,
    );
    share_pepper(&a, &c);
    c.start();
    let (status, retry, body) = chat_status(&c.url(CHAT), &key);
    assert_eq!(status, 503, "{body}");
    assert!(retry.is_some(), "{body}");
    drop(c);

    // Without the operator's CA the server's certificate is not trusted (webpki's roots do
    // not know the test's CA), and without TLS the server refuses the session: the replica
    // does not start, and says why.
    let plain_db = db.trim_end_matches("?sslmode=require").to_owned();
    for (db, extra, why) in [(&db, "", "certificate"), (&plain_db, "", "no encryption")] {
        let mut d = replica_with(&pg, db, extra, &models, &files);
        let (status, log) = d.run_to_exit(None);
        assert!(!status.success(), "{log}");
        assert!(log.contains(why), "{why}: {log}");
    }
}
