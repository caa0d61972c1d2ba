//! End-to-end data-plane hardening: a real `moat serve` in front of a real `moat-sim`.
//!
//! - quotas cannot be talked around: the larger completion cap is reserved, and every stream
//!   is reconciled (the gateway asks for usage and hides it from a client that did not);
//! - the prefix cache is the gateway's: tenants get different `cache_salt`s, a tenant always
//!   the same one, and a client's own salt never reaches the upstream;
//! - answers say no more than they must: an upstream refusal keeps its status, not its words;
//!   `model` is the public name in JSON answers and in every stream event;
//! - slow clients cannot hold a connection: a head or a body that trickles in, a kept-alive
//!   connection left idle, and a client that stops reading its answer are cut off at the
//!   `[server]` timeouts, on the admin plane too;
//! - HTTP/1.1 only: an HTTP/2 preface is refused.

use moat_tests::{Daemon, Events, Sim};
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";

/// One pool over `sim`, model `chat` (upstream id `org/chat-upstream`); `extra` is appended.
async fn start(sim: &Sim, extra: &str) -> Daemon {
    start_with(sim, "", extra).await
}

/// [`start`] with `server` as the `[server]` section's extra keys.
async fn start_with(sim: &Sim, server: &str, extra: &str) -> Daemon {
    let moat = Daemon::gateway(
        server,
        &format!(
            "[pools.gpu]\nhosts = [\"{}\"]\nhealth_interval_ms = 100\n\n\
             [models.chat]\npool = \"gpu\"\nupstream_model = \"org/chat-upstream\"\n\n{extra}\n",
            sim.addr
        ),
        &[],
    );
    moat.wait_pools_ready().await;
    moat
}

fn chat(content: &str) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": content}]})
}

/// A new user (role `tester`) in `tenant` and a key for it.
fn key_in(moat: &Daemon, tenant: &str, user: &str) -> String {
    if tenant != "testing" {
        moat.cli_ok(&["tenants", "add", tenant], None);
    }
    moat.add_user(tenant, user, &["tester"]);
    moat.create_key(user)
}

async fn post_as(moat: &Daemon, key: &str, path: &str, body: &Value) -> (u16, Value) {
    let auth = format!("Bearer {key}");
    let (status, _, v) =
        moat_tests::post_json(&moat.url(path), body, &[("authorization", &auth)]).await;
    (status.as_u16(), v)
}

/// The data of every event of a stream (the stream must end cleanly).
async fn stream(moat: &Daemon, body: &Value) -> Vec<String> {
    let resp = moat.open(CHAT, body).await;
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    let mut out = Vec::new();
    while let Some(data) = events.next().await.expect("a clean stream") {
        out.push(data);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_larger_completion_cap_is_reserved() {
    let sim = Sim::start(&[]);
    let moat = start(&sim, "[quotas.key]\ntokens_per_minute = 100\n").await;
    // A small `max_tokens` before a large `max_completion_tokens` (which vLLM and SGLang
    // honour): the request may generate 4096 tokens, so it can never fit 100 a minute.
    let mut body = chat("hi");
    body["max_tokens"] = json!(1);
    body["max_completion_tokens"] = json!(4096);
    body["stream"] = json!(true);
    let (status, _, v) = moat.post_json(CHAT, &body, &[]).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "tokens_exceed_quota", "{v}");
    assert_eq!(sim.requests().await, 0, "the request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stream_is_reconciled_and_shows_only_what_was_asked() {
    let sim = Sim::start(&[]);
    let mut body = chat("hi");
    body["max_tokens"] = json!(80);
    body["stream"] = json!(true);
    // Two reservations never fit the quota; one reservation plus one reconciled stream does.
    let reserve = 80 + body.to_string().len().div_ceil(4);
    let quota = 2 * reserve - 1;
    let moat = start(
        &sim,
        &format!("[quotas.key]\ntokens_per_minute = {quota}\n"),
    )
    .await;

    let events = stream(&moat, &body).await;
    // The client did not ask for usage: none reaches it, the stream still ends with [DONE].
    assert_eq!(events.last().unwrap(), "[DONE]");
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert!(v.get("usage").is_none(), "a usage event leaked: {e}");
        assert_eq!(v["model"], "chat", "{e}");
    }
    // ... but the upstream was asked for it, and it was used to reconcile the reservation.
    let stats = sim.stats().await;
    assert_eq!(
        stats["last_body"]["stream_options"],
        json!({"include_usage": true})
    );
    let second = stream(&moat, &body).await;
    assert_eq!(second.last().unwrap(), "[DONE]");

    // A client that asks for usage gets it, with the public model name.
    let mut asked = body.clone();
    asked["stream_options"] = json!({"include_usage": true});
    asked["max_tokens"] = json!(8);
    let events = stream(&moat, &asked).await;
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["choices"], json!([]), "{usage}");
    assert!(usage["usage"]["total_tokens"].as_u64().unwrap() > 0);
    assert_eq!(usage["model"], "chat");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_never_share_a_prefix_cache() {
    let sim = Sim::start(&[]);
    let moat = start(&sim, "").await;
    let same_tenant = key_in(&moat, "testing", "tester2");
    let other_tenant = key_in(&moat, "acme", "alice");
    for key in [moat.key(), &same_tenant, &other_tenant] {
        let (status, v) = post_as(&moat, key, CHAT, &chat("hello")).await;
        assert_eq!(status, 200, "{v}");
    }
    // Completions too; embeddings carry none.
    let completion = json!({"model": "chat", "prompt": "hello"});
    let (status, v) = post_as(&moat, &other_tenant, "/v1/completions", &completion).await;
    assert_eq!(status, 200, "{v}");
    let embedding = json!({"model": "chat", "input": "hello"});
    let (status, v) = post_as(&moat, moat.key(), "/v1/embeddings", &embedding).await;
    assert_eq!(status, 200, "{v}");

    let salts = sim.stats().await["cache_salts"].clone();
    let salt = |i: usize| {
        salts[i]
            .as_str()
            .unwrap_or_else(|| panic!("{salts}"))
            .to_owned()
    };
    assert_eq!(
        salt(0),
        salt(1),
        "one tenant keeps its own cache hits: {salts}"
    );
    assert_ne!(
        salt(0),
        salt(2),
        "two tenants share a prefix cache: {salts}"
    );
    assert_eq!(salt(2), salt(3), "{salts}");
    assert_eq!(salts[4], Value::Null, "{salts}");
    assert_eq!(salt(0).len(), 22);
    assert!(
        salt(0)
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    );

    // A client's own salt is refused, by name, and never reaches the upstream.
    let before = sim.requests().await;
    for salt in [
        json!("guessed"),
        json!(salt(2)),
        json!(null),
        json!({"x": 1}),
    ] {
        let mut body = chat("hello");
        body["cache_salt"] = salt;
        let (status, _, v) = moat.post_json(CHAT, &body, &[]).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "cache_salt", "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!(sim.requests().await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_can_isolate_users_or_nothing() {
    let users = Sim::start(&[]);
    let off = Sim::start(&[]);
    let moat = Daemon::gateway(
        "",
        &format!(
            "[pools.users]\nhosts = [\"{}\"]\nhealth_interval_ms = 100\n\
             prefix_cache_isolation = \"user\"\n\
             [pools.off]\nhosts = [\"{}\"]\nhealth_interval_ms = 100\n\
             prefix_cache_isolation = \"off\"\n\
             [models.a]\npool = \"users\"\n[models.b]\npool = \"off\"\n",
            users.addr, off.addr
        ),
        &[],
    );
    moat.wait_pools_ready().await;
    let colleague = key_in(&moat, "testing", "tester2");
    for key in [moat.key(), &colleague, moat.key()] {
        for model in ["a", "b"] {
            let mut body = chat("hello");
            body["model"] = json!(model);
            let (status, v) = post_as(&moat, key, CHAT, &body).await;
            assert_eq!(status, 200, "{v}");
        }
    }
    let salts = users.stats().await["cache_salts"].clone();
    assert_ne!(salts[0], salts[1], "two users, one salt: {salts}");
    assert_eq!(salts[0], salts[2], "{salts}");
    assert!(salts[0].is_string(), "{salts}");
    assert_eq!(
        off.stats().await["cache_salts"],
        json!([null, null, null]),
        "`off` sends no salt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_refusal_keeps_its_status_not_its_words() {
    let sim = Sim::start(&[]);
    let moat = start(&sim, "").await;
    sim.fail(json!({"mode": "error400", "count": 1})).await;
    let (status, _, v) = moat.post_json(CHAT, &chat("mysecretprompt"), &[]).await;
    assert_eq!(status, 400, "{v}");
    let text = v.to_string();
    for internal in ["meta-llama", "/opt", "vllm", "8192", "org/chat-upstream"] {
        assert!(
            !text.contains(internal),
            "{internal} reached the client: {v}"
        );
    }
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert_eq!(v["error"]["code"], "upstream_refused", "{v}");
    assert!(v["error"]["message"].is_string());
    // The operator's log has the upstream's words (written after the answer may have gone
    // out: waited for), never the prompt.
    moat.wait_log("max_num_batched_tokens");
    let logs = moat.log();
    assert!(!logs.contains("mysecretprompt"), "the prompt was logged");
    // A refusal does not count against the host: the next request is served.
    let (status, _, v) = moat.post_json(CHAT, &chat("hi"), &[]).await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_name_the_public_model() {
    let sim = Sim::start(&[]);
    let moat = start(&sim, "").await;
    let (status, _, v) = moat.post_json(CHAT, &chat("hi"), &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "chat", "{v}");
    assert_eq!(sim.stats().await["last_body"]["model"], "org/chat-upstream");
    let completion = json!({"model": "chat", "prompt": "hi"});
    let (status, _, v) = moat.post_json("/v1/completions", &completion, &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "chat", "{v}");
    let embedding = json!({"model": "chat", "input": ["a", "b"]});
    let (status, _, v) = moat.post_json("/v1/embeddings", &embedding, &[]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["model"], "chat", "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);

    let mut body = chat("hi");
    body["stream"] = json!(true);
    let events = stream(&moat, &body).await;
    assert!(events.len() > 3);
    assert!(
        !events.iter().any(|e| e.contains("org/chat-upstream")),
        "{events:?}"
    );
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        assert_eq!(v["model"], "chat", "{e}");
    }
}

/// What the server sent on `conn` until it closed it, and how long that took (at most `limit`:
/// a connection still open then fails the test).
fn until_closed(
    conn: &mut std::net::TcpStream,
    limit: std::time::Duration,
) -> (String, std::time::Duration) {
    use std::io::Read;
    let start = std::time::Instant::now();
    conn.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the connection is still open after {:?} ({e})",
                start.elapsed()
            ),
        }
    }
    (String::from_utf8_lossy(&got).into_owned(), start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_off() {
    use std::io::Write;
    // 8 tokens at 8 a second: a stream of about a second, longer than either timeout.
    let sim = Sim::start(&["--tokens-per-sec", "8"]);
    let moat = start_with(
        &sim,
        "header_timeout_ms = 400\nbody_timeout_ms = 400\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
    )
    .await;
    let limit = std::time::Duration::from_secs(5);
    let connect = || std::net::TcpStream::connect(moat.addr()).unwrap();

    // A head that never ends: the connection is closed, no request reaches the pipeline.
    let mut c = connect();
    c.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: moat\r\n")
        .unwrap();
    let (got, took) = until_closed(&mut c, limit);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(took >= std::time::Duration::from_millis(300), "{took:?}");

    // A kept-alive connection: answered, then closed when no next request comes.
    let mut c = connect();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: moat\r\n\r\n")
        .unwrap();
    let (got, _) = until_closed(&mut c, limit);
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");

    // A body that stops halfway: 408, OpenAI-shaped, and nothing sent upstream.
    let before = sim.requests().await;
    let body = serde_json::to_vec(&chat("hello there")).unwrap();
    let mut c = connect();
    let head = format!(
        "POST {CHAT} HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        moat.key(),
        body.len()
    );
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(&body[..body.len() / 2]).unwrap();
    let (got, _) = until_closed(&mut c, limit);
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    let json = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let v: Value = serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {json}"));
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    assert_eq!(sim.requests().await, before);

    // HTTP/1.1 only: an HTTP/2 prior-knowledge preface is closed at once (or answered with an
    // HTTP/1.1 error; either way an h2 client gets no SETTINGS frame), and nothing reaches the
    // upstream.
    let before = sim.requests().await;
    let mut c = connect();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let (got, took) = until_closed(&mut c, limit);
    assert!(
        got.is_empty() || got.starts_with("HTTP/1.1 4") || got.starts_with("HTTP/1.1 5"),
        "{got:?}"
    );
    assert!(took < std::time::Duration::from_millis(300), "{took:?}");
    assert_eq!(sim.requests().await, before);

    // The admin plane has the same deadlines (loopback only, but a local process must not
    // hold it either), and answers a whole request as before.
    let mut c = std::net::TcpStream::connect(moat.admin_addr()).unwrap();
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: moat\r\n")
        .unwrap();
    let (got, took) = until_closed(&mut c, limit);
    assert!(got.is_empty() || got.starts_with("HTTP/1.1 408"), "{got}");
    assert!(took >= std::time::Duration::from_millis(300), "{took:?}");
    let mut c = std::net::TcpStream::connect(moat.admin_addr()).unwrap();
    write!(
        c,
        "GET /metrics HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {}\r\n\r\n",
        moat.key()
    )
    .unwrap();
    let (got, _) = until_closed(&mut c, limit);
    assert!(
        got.starts_with("HTTP/1.1 ") && !got.starts_with("HTTP/1.1 408"),
        "{got}"
    );

    // A client that keeps up is served as before, a stream longer than the timeouts too.
    let (status, _, v) = moat.post_json(CHAT, &chat("hi"), &[]).await;
    assert_eq!(status, 200, "{v}");
    let mut body = chat("hi");
    body["stream"] = json!(true);
    let start = std::time::Instant::now();
    let events = stream(&moat, &body).await;
    assert!(start.elapsed() > std::time::Duration::from_millis(800));
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
}

/// A client that asks for a long stream and reads none of it: once every buffer between the
/// gateway and it is full, the gateway's writes block, and `server.send_timeout_ms` later the
/// connection is closed and the upstream request cancelled (without the timeout it would be
/// held, and the inference slot with it, for as long as the client likes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off() {
    use std::io::Write;
    // 300,000 events, ~50 MB: far more than the sockets on the way can buffer.
    let sim = Sim::start(&["--chunks", "300000"]);
    // `max_tokens` lands in `[models.chat]`, the table `start` ends with.
    let moat = start_with(&sim, "send_timeout_ms = 400\n", "max_tokens = 300000").await;
    let mut body = chat("hi");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(300000);
    let body = serde_json::to_vec(&body).unwrap();
    let mut c = std::net::TcpStream::connect(moat.addr()).unwrap();
    write!(
        c,
        "POST {CHAT} HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        moat.key(),
        body.len()
    )
    .unwrap();
    c.write_all(&body).unwrap();
    // Reads nothing from here on, and keeps the connection open.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let stats = sim.stats().await;
        if stats["cancelled"] == 1 && stats["in_flight"] == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the upstream request is still held: {stats}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        sim.stats().await["completed"],
        0,
        "the stream was not read to its end"
    );
    drop(c);
}
