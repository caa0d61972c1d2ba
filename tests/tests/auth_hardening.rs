//! End to end over a real `moat serve`: the refresh-token reuse grace (racing refreshes of one
//! client share one successor; a spent token after the grace still ends the session) and the
//! per-source password lock-out behind a trusted proxy (its `X-Forwarded-For` names the client)
//! and without one (the header is ignored).

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use moat_tests::{
    Daemon,
    http::{Client, Request},
};
use serde_json::{Value, json};

/// A daemon with user `alice` in tenant `acme` and an API key for it.
fn start(extra: &str) -> (Daemon, String) {
    let mut moat = Daemon::no_upstream(extra);
    moat.start();
    moat.cli_ok(&["tenants", "add", "acme"], None);
    moat.add_user("acme", "alice", &["user"]);
    let key = moat.create_key("alice");
    (moat, key)
}

fn token(moat: &Daemon, body: &Value) -> Request {
    Client::new().post(moat.url("/v1/auth/token")).json(body)
}

/// (status, body) of a token request.
fn send(r: Request) -> (u16, Value) {
    let r = r.send().unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn refresh(rt: &str) -> Value {
    json!({"grant_type": "refresh_token", "refresh_token": rt})
}

fn models_status(moat: &Daemon, bearer: &str) -> u16 {
    Client::new()
        .get(moat.url("/v1/models"))
        .bearer_auth(bearer)
        .send()
        .unwrap()
        .status()
        .as_u16()
}

#[test]
fn racing_refreshes_within_the_grace_share_one_successor() {
    let (moat, key) = start("");
    let (status, v) = send(token(
        &moat,
        &json!({"grant_type": "api_key", "api_key": key}),
    ));
    assert_eq!(status, 200, "{v}");
    let rt = v["refresh_token"].as_str().unwrap().to_owned();
    let n = 12;
    let barrier = Arc::new(Barrier::new(n));
    let url = moat.url("/v1/auth/token");
    let handles: Vec<_> = (0..n)
        .map(|_| {
            let (barrier, url, body) = (barrier.clone(), url.clone(), refresh(&rt));
            std::thread::spawn(move || {
                let c = Client::new();
                barrier.wait();
                send(c.post(url).json(&body))
            })
        })
        .collect();
    let answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (status, v) in &answers {
        assert_eq!(*status, 200, "every racer is answered: {v}");
        assert_eq!(
            v["refresh_token"], answers[0].1["refresh_token"],
            "one successor"
        );
        assert_eq!(
            models_status(&moat, v["access_token"].as_str().unwrap()),
            200
        );
    }
    // The session goes on with that successor.
    let next = answers[0].1["refresh_token"].as_str().unwrap();
    assert_eq!(send(token(&moat, &refresh(next))).0, 200);
}

#[test]
fn a_spent_refresh_token_after_the_grace_ends_the_session() {
    let (moat, key) = start("[auth]\nrefresh_reuse_grace_secs = 1\n");
    let (_, v) = send(token(
        &moat,
        &json!({"grant_type": "api_key", "api_key": key}),
    ));
    let rt1 = v["refresh_token"].as_str().unwrap().to_owned();
    let (status, v2) = send(token(&moat, &refresh(&rt1)));
    assert_eq!(status, 200, "{v2}");
    let (rt2, at2) = (
        v2["refresh_token"].as_str().unwrap().to_owned(),
        v2["access_token"].as_str().unwrap().to_owned(),
    );
    // Presented again until the grace is over: the same successor each time inside it, then
    // a refusal.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, v) = send(token(&moat, &refresh(&rt1)));
        if status == 401 {
            assert_eq!(v["error"]["code"], "invalid_grant", "{v}");
            break;
        }
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["refresh_token"], rt2.as_str());
        assert!(Instant::now() < deadline, "the grace never ended");
        std::thread::sleep(Duration::from_millis(50));
    }
    // That reuse revoked the session: its newest tokens are dead too.
    assert_eq!(send(token(&moat, &refresh(&rt2))).0, 401);
    assert_eq!(models_status(&moat, &at2), 401);
    // The log writer batches lines: waited for.
    moat.wait_log("refresh_reuse_detected");
}

/// A wrong password for a user nobody has, from `moat`'s point of view sent by `forwarded`.
fn guess(moat: &Daemon, forwarded: &str) -> u16 {
    let body =
        json!({"grant_type": "password", "username": "nobody", "password": "wrong wrong wrong"});
    send(token(moat, &body).header("x-forwarded-for", forwarded)).0
}

#[test]
fn behind_a_trusted_proxy_the_forwarded_client_is_the_source() {
    let (moat, _) = start(
        "[auth]\ntrusted_proxies = [\"127.0.0.1/32\"]\n\
         password_max_failures_per_source = 2\npassword_max_failures_per_user = 100\n",
    );
    assert_eq!(guess(&moat, "203.0.113.1"), 401);
    assert_eq!(guess(&moat, "203.0.113.1"), 401);
    assert_eq!(
        guess(&moat, "203.0.113.1"),
        429,
        "that client is locked out"
    );
    // Another client behind the same proxy is not.
    assert_eq!(guess(&moat, "203.0.113.2"), 401);
    // A client cannot pick its source: the proxy appends the real one on the right.
    assert_eq!(guess(&moat, "198.51.100.77, 203.0.113.1"), 429);
    // IPv6 clients count per /64.
    assert_eq!(guess(&moat, "2001:db8:1:2::1"), 401);
    assert_eq!(guess(&moat, "2001:db8:1:2::ffff"), 401);
    assert_eq!(guess(&moat, "2001:db8:1:2:aaaa::1"), 429);
    assert_eq!(guess(&moat, "2001:db8:1:3::1"), 401);
}

#[test]
fn without_trusted_proxies_forwarding_headers_are_ignored() {
    let (moat, _) = start(
        "[auth]\npassword_max_failures_per_source = 2\npassword_max_failures_per_user = 100\n",
    );
    assert_eq!(guess(&moat, "203.0.113.1"), 401);
    assert_eq!(guess(&moat, "203.0.113.2"), 401);
    // Everything came from 127.0.0.1, whatever the header claims.
    assert_eq!(guess(&moat, "203.0.113.3"), 429);
}
