//! End-to-end data plane: a real `moat serve` in front of real `moat-sim` hosts.
//!
//! What is checked is what a client and an inference server would see: streamed content and
//! order, failover, no retry once bytes went upstream, cancellation reaching the upstream,
//! timeouts, header hygiene, and that bad input never reaches an upstream.

use std::time::{Duration, Instant};

use moat_tests::{Daemon, Events, Sim, eventually, fetch, get_json};
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";
/// The pool's credential, injected by the gateway.
const POOL_KEY: &str = "pool-upstream-key-7f3a";

fn hosts(sims: &[&Sim]) -> String {
    sims.iter()
        .map(|s| format!("\"{}\"", s.addr))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One pool `gpu` over `sims`, one model `chat` (upstream id `org/chat-upstream`), fast health
/// checks; `pool_extra` and `model_extra` are TOML lines added to each table.
fn config(sims: &[&Sim], pool_extra: &str, model_extra: &str) -> String {
    let interval = if pool_extra.contains("health_interval_ms") {
        ""
    } else {
        "health_interval_ms = 100\n"
    };
    format!(
        "[pools.gpu]\nhosts = [{}]\n{interval}health_timeout_ms = 500\n\
         connect_timeout_ms = 500\n{pool_extra}\n\n\
         [models.chat]\npool = \"gpu\"\nupstream_model = \"org/chat-upstream\"\n{model_extra}\n",
        hosts(sims)
    )
}

async fn start(sims: &[&Sim], pool_extra: &str, model_extra: &str) -> Daemon {
    let moat = Daemon::gateway("", &config(sims, pool_extra, model_extra), &[]);
    moat.wait_pools_ready().await;
    moat
}

fn chat(content: &str, stream: bool) -> Value {
    json!({
        "model": "chat",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}],
        "stream": stream,
    })
}

/// Collects a chat stream: the content deltas in order, arrival times, and the raw events.
struct Collected {
    content: String,
    times: Vec<Instant>,
    events: Vec<String>,
    error: Option<String>,
}

async fn collect(moat: &Daemon, body: &Value) -> Collected {
    let resp = moat.open(CHAT, body).await;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut events = Events::new(resp);
    let mut out = Collected {
        content: String::new(),
        times: Vec::new(),
        events: Vec::new(),
        error: None,
    };
    loop {
        match events.next().await {
            Ok(Some(data)) => {
                out.times.push(Instant::now());
                if data != "[DONE]"
                    && let Ok(v) = serde_json::from_str::<Value>(&data)
                    && let Some(c) = v["choices"][0]["delta"]["content"].as_str()
                {
                    out.content.push_str(c);
                }
                out.events.push(data);
            }
            Ok(None) => break,
            Err(e) => {
                out.error = Some(e);
                break;
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_and_plain_answers_pass_through_intact() {
    let sim = Sim::start(&["--echo", "--tokens-per-sec", "25", "--api-key", POOL_KEY]);
    let key_file = format!("{POOL_KEY}\n");
    let moat = Daemon::gateway(
        "",
        &config(&[&sim], "api_key_file = \"pool.key\"", ""),
        &[("pool.key", &key_file)],
    );
    moat.wait_pools_ready().await;

    let words: Vec<String> = (0..20).map(|i| format!("secretword{i}")).collect();
    let prompt = words.join(" ");

    // Streamed: every delta, in order, arriving over time (not gathered and sent at once).
    let mut body = chat(&prompt, true);
    body["stream_options"] = json!({"include_usage": true});
    let got = collect(&moat, &body).await;
    assert!(got.error.is_none(), "{:?}", got.error);
    assert_eq!(got.content, prompt);
    assert_eq!(got.events.last().unwrap(), "[DONE]");
    let usage: Value = serde_json::from_str(&got.events[got.events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 20, "{usage}");
    assert_eq!(usage["choices"], json!([]));
    let spread = *got.times.last().unwrap() - got.times[0];
    assert!(
        spread >= Duration::from_millis(500),
        "20 tokens at 25/s arrived within {spread:?}: the stream was buffered"
    );

    // What the upstream saw: its own credential, the upstream model id, the injected cap,
    // none of the client's headers.
    let stats = sim.stats().await;
    let seen = &stats["last_headers"];
    assert_eq!(seen["authorization"], format!("Bearer {POOL_KEY}"));
    assert!(
        !stats.to_string().contains(moat.key()),
        "the client's key went upstream"
    );
    assert_eq!(stats["last_body"]["model"], "org/chat-upstream");
    assert_eq!(stats["last_body"]["max_tokens"], 4096);

    // Plain JSON, with a client header that must not travel.
    let (status, headers, answer) = moat
        .post_json(
            CHAT,
            &chat(&prompt, false),
            &[("x-client-secret", "s3"), ("cookie", "a=b")],
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], prompt);
    let request_id = headers["x-request-id"].to_str().unwrap();
    assert!(request_id.starts_with("req_"));
    assert!(headers.get("set-cookie").is_none(), "{headers:?}");
    assert!(headers.get("x-sim-internal").is_none(), "{headers:?}");
    let stats = sim.stats().await;
    let seen = &stats["last_headers"];
    assert_eq!(
        seen["x-request-id"], request_id,
        "the upstream gets the same id"
    );
    assert_eq!(seen["authorization"], format!("Bearer {POOL_KEY}"));
    assert!(seen.get("x-client-secret").is_none(), "{seen}");
    assert!(seen.get("cookie").is_none(), "{seen}");

    // Completions (streamed) and embeddings.
    let resp = moat
        .open(
            "/v1/completions",
            &json!({"model": "chat", "prompt": "a b c", "stream": true}),
        )
        .await;
    let mut events = Events::new(resp);
    let mut text = String::new();
    while let Some(e) = events.next().await.unwrap() {
        if e != "[DONE]" {
            let v: Value = serde_json::from_str(&e).unwrap();
            text.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
        }
    }
    assert_eq!(text, "a b c");
    let (status, _, emb) = moat
        .post_json(
            "/v1/embeddings",
            &json!({"model": "chat", "input": ["one", "two"]}),
            &[],
        )
        .await;
    assert_eq!(status, 200, "{emb}");
    assert_eq!(emb["data"].as_array().unwrap().len(), 2);
    assert_eq!(emb["data"][1]["embedding"].as_array().unwrap().len(), 8);

    // Nothing of the prompt, the answer or any credential in the gateway's log, and every
    // request line carries its id. The log writer batches lines: the last request's line is
    // waited for.
    moat.wait_log("/v1/embeddings");
    let logs = moat.log();
    let key_secret = &moat.key()[moat.key().len() - 20..];
    for secret in ["secretword", POOL_KEY, key_secret, "s3"] {
        assert!(!logs.contains(secret), "`{secret}` in the log:\n{logs}");
    }
    assert!(logs.contains(request_id));
    for line in logs.lines().filter(|l| l.contains("\"route\"")) {
        assert!(line.contains("\"request_id\":\"req_"), "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_outstanding_spreads_concurrent_requests() {
    let a = Sim::start(&["--tokens-per-sec", "10", "--chunks", "20"]);
    let b = Sim::start(&["--tokens-per-sec", "10", "--chunks", "20"]);
    let moat = start(&[&a, &b], "", "").await;
    let mut streams = Vec::new();
    for _ in 0..4 {
        let resp = moat.open(CHAT, &chat("hi", true)).await;
        assert_eq!(resp.status(), 200);
        streams.push(resp);
    }
    // Both simulators hold two of the four open streams (each lasts ~2 s).
    let spread = eventually(Duration::from_secs(2), || async {
        a.stats().await["in_flight"] == 2 && b.stats().await["in_flight"] == 2
    })
    .await;
    assert!(
        spread,
        "not spread 2/2: {} / {}",
        a.stats().await,
        b.stats().await
    );
    drop(streams);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_fails_over_without_losing_a_request() {
    let mut a = Sim::start(&[]);
    let b = Sim::start(&[]);
    // Only the start-up health check runs, so the dead host is found by the requests
    // themselves: connect refused, retried on the other host, then ejected.
    let moat = start(&[&a, &b], "health_interval_ms = 600000", "").await;
    for _ in 0..6 {
        let (status, _, _) = moat.post_json(CHAT, &chat("x", false), &[]).await;
        assert_eq!(status, 200);
    }
    assert!(a.requests().await > 0 && b.requests().await > 0);

    a.kill();
    let before = b.requests().await;
    for i in 0..20 {
        let (status, _, body) = moat.post_json(CHAT, &chat("x", false), &[]).await;
        assert_eq!(status, 200, "request {i} after the kill: {body}");
    }
    assert_eq!(b.requests().await - before, 20, "every request served once");
    moat.wait_log("upstream host ejected");
    let logs = moat.log();
    let refused = logs
        .matches("upstream connect failed; nothing sent")
        .count();
    assert!(refused >= 1, "the dead host was never tried:\n{logs}");
    assert!(
        refused <= 4,
        "the dead host was not ejected ({refused} attempts)"
    );
    assert!(logs.contains("upstream host ejected"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_active_health_checks() {
    let mut sim = Sim::start(&[]);
    let moat = start(&[&sim], "", "").await;
    let (status, body) = get_json(&moat.url("/readyz")).await;
    assert_eq!(status, 200);
    assert_eq!(body["pools"]["gpu"]["ready"], true);
    assert_eq!(body["segmentation"], "off");
    sim.kill();
    let not_ready = eventually(Duration::from_secs(3), || async {
        get_json(&moat.url("/readyz")).await.0 == 503
    })
    .await;
    assert!(not_ready, "readyz still ready with every host dead");
    let (status, _) = get_json(&moat.url("/healthz")).await;
    assert_eq!(status, 200);
    let (status, _, body) = moat.post_json(CHAT, &chat("x", false), &[]).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_retried_once_the_request_went_upstream() {
    let a = Sim::start(&[]);
    let b = Sim::start(&[]);
    let moat = start(
        &[&a, &b],
        "first_byte_timeout_ms = 700\nidle_timeout_ms = 700\neject_after_failures = 100",
        "",
    )
    .await;
    let total = || async { a.requests().await + b.requests().await };

    // A 500 from the upstream: 502 to the client, and the other host never sees it.
    for s in [&a, &b] {
        s.fail(json!({"mode": "error500", "count": 1})).await;
    }
    let (status, _, body) = moat.post_json(CHAT, &chat("x", false), &[]).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    assert!(
        !body.to_string().contains("simulated"),
        "upstream words relayed"
    );
    assert_eq!(total().await, 1);

    // An upstream that dies mid-stream: the client's stream ends with an error event.
    for s in [&a, &b] {
        s.fail(json!({"mode": "reset_mid_stream", "after_chunks": 3, "count": 1}))
            .await;
    }
    let got = collect(&moat, &chat("x", true)).await;
    assert!(got.error.is_none(), "not a clean end: {:?}", got.error);
    assert_eq!(got.events.len(), 4, "{:?}", got.events);
    let last: Value = serde_json::from_str(got.events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{last}");
    assert_eq!(total().await, 2);

    // An upstream that goes quiet mid-stream: idle timeout, same clean end.
    for s in [&a, &b] {
        s.fail(json!({"mode": "hang_mid_stream", "after_chunks": 2, "count": 1}))
            .await;
    }
    let got = tokio::time::timeout(Duration::from_secs(5), collect(&moat, &chat("x", true)))
        .await
        .expect("the idle timeout (700 ms) ends the stream");
    assert!(got.error.is_none(), "{:?}", got.error);
    let last: Value = serde_json::from_str(got.events.last().unwrap()).unwrap();
    assert!(last["error"]["message"].is_string(), "{last}");
    assert_eq!(total().await, 3);

    // An upstream that never answers: 504 after the first-byte timeout, no retry, and the
    // upstream sees the request cancelled.
    for s in [&a, &b] {
        s.fail(json!({"mode": "hang", "count": 1})).await;
    }
    let started = Instant::now();
    let (status, _, body) = tokio::time::timeout(
        Duration::from_secs(5),
        moat.post_json(CHAT, &chat("x", false), &[]),
    )
    .await
    .expect("the first-byte timeout (700 ms) answers");
    assert_eq!(status, 504, "{body}");
    // A lower bound only: the timeout did not fire early (load can only make it later).
    assert!(started.elapsed() >= Duration::from_millis(650));
    assert_eq!(total().await, 4);
    let cancelled = eventually(Duration::from_secs(1), || async {
        a.stats().await["cancelled"].as_u64().unwrap()
            + b.stats().await["cancelled"].as_u64().unwrap()
            >= 2
    })
    .await;
    assert!(cancelled, "hung requests not cancelled upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_cancels_the_upstream_within_a_second() {
    let sim = Sim::start(&["--tokens-per-sec", "10", "--chunks", "200"]);
    let moat = start(&[&sim], "", "").await;
    let resp = moat.open(CHAT, &chat("go on", true)).await;
    let mut events = Events::new(resp);
    for _ in 0..3 {
        events.next().await.unwrap().unwrap();
    }
    assert!(
        eventually(Duration::from_secs(2), || async {
            sim.stats().await["in_flight"] == 1
        })
        .await,
        "the stream is in flight upstream: {}",
        sim.stats().await
    );
    drop(events);
    let seen = eventually(Duration::from_secs(1), || async {
        sim.stats().await["cancelled"] == 1
    })
    .await;
    assert!(
        seen,
        "the simulator did not see the cancel within 1 s: {}",
        sim.stats().await
    );
    assert!(
        eventually(Duration::from_secs(1), || async {
            sim.stats().await["in_flight"] == 0
        })
        .await,
        "nothing left in flight upstream: {}",
        sim.stats().await
    );
    assert!(
        eventually(Duration::from_secs(1), || async {
            moat.log().contains("client went away")
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_before_the_answer_cancels_the_upstream() {
    // A non-streamed request still waiting for the upstream's answer.
    let sim = Sim::start(&["--latency-ms", "30000"]);
    let moat = start(&[&sim], "", "").await;
    let pending = tokio::spawn({
        let body = chat("x", false);
        let (k, v) = moat.bearer();
        let url = moat.url(CHAT);
        async move {
            moat_tests::send(
                "POST",
                &url,
                &[("content-type", "application/json"), (k, v.as_str())],
                body.to_string(),
            )
            .await
        }
    });
    assert!(
        eventually(Duration::from_secs(2), || async {
            sim.stats().await["in_flight"] == 1
        })
        .await
    );
    pending.abort();
    let seen = eventually(Duration::from_secs(1), || async {
        sim.stats().await["cancelled"] == 1
    })
    .await;
    assert!(seen, "not cancelled upstream: {}", sim.stats().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_reaches_no_upstream() {
    let sim = Sim::start(&[]);
    let moat = Daemon::gateway(
        "max_body_bytes = 4096",
        &config(&[&sim], "", "max_messages = 3\nmax_tokens = 100\nmax_n = 2"),
        &[],
    );
    moat.wait_pools_ready().await;
    let url = moat.url("/v1/chat/completions");
    let json_ct = ("content-type", "application/json");
    let msg = |c: &str| json!({"role": "user", "content": c});
    let with = |k: &str, v: Value| {
        let mut b = chat("x", false);
        b[k] = v;
        b.to_string()
    };
    let big = "x".repeat(5000);
    let cases: Vec<BadCase> = vec![
        (
            "no content type",
            vec![],
            chat("x", false).to_string(),
            415,
            None,
        ),
        (
            "text/plain",
            vec![("content-type", "text/plain")],
            chat("x", false).to_string(),
            415,
            None,
        ),
        (
            "body over the cap",
            vec![json_ct],
            chat(&big, false).to_string(),
            413,
            None,
        ),
        (
            "malformed JSON",
            vec![json_ct],
            "{\"model\": \"chat\",".into(),
            400,
            None,
        ),
        ("not an object", vec![json_ct], "[1,2]".into(), 400, None),
        (
            "duplicate key",
            vec![json_ct],
            r#"{"model":"chat","model":"other","messages":[{"role":"user","content":"x"}]}"#.into(),
            400,
            None,
        ),
        (
            "duplicate nested key",
            vec![json_ct],
            r#"{"model":"chat","messages":[{"role":"user","role":"system","content":"x"}]}"#.into(),
            400,
            None,
        ),
        (
            "unknown model",
            vec![json_ct],
            with("model", json!("gpt-x")),
            404,
            Some("model"),
        ),
        (
            "too many messages",
            vec![json_ct],
            with("messages", json!([msg("a"), msg("b"), msg("c"), msg("d")])),
            400,
            Some("messages"),
        ),
        (
            "max_tokens over cap",
            vec![json_ct],
            with("max_tokens", json!(101)),
            400,
            Some("max_tokens"),
        ),
        (
            "max_completion_tokens over cap",
            vec![json_ct],
            with("max_completion_tokens", json!(5000)),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "n over cap",
            vec![json_ct],
            with("n", json!(3)),
            400,
            Some("n"),
        ),
        (
            "wrong type",
            vec![json_ct],
            with("stream", json!("yes")),
            400,
            Some("stream"),
        ),
        (
            "unknown parameter",
            vec![json_ct],
            with("tenant", json!("other")),
            400,
            Some("tenant"),
        ),
        (
            "unknown role",
            vec![json_ct],
            with("messages", json!([{"role": "admin", "content": "x"}])),
            400,
            Some("messages[0].role"),
        ),
        (
            "empty messages",
            vec![json_ct],
            with("messages", json!([])),
            400,
            Some("messages"),
        ),
    ];
    let (bk, bv) = moat.bearer();
    for (name, headers, body, status, param) in &cases {
        let mut with_key = vec![(bk, bv.as_str())];
        with_key.extend_from_slice(headers);
        let (got, h, bytes) = fetch("POST", &url, &with_key, body.clone()).await;
        let v: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| panic!("{name}: not JSON: {bytes:?}"));
        assert_eq!(got.as_u16(), *status, "{name}: {v}");
        let err = &v["error"];
        assert!(err["message"].is_string(), "{name}: {v}");
        assert!(err["type"].is_string(), "{name}: {v}");
        assert!(
            err.get("param").is_some() && err.get("code").is_some(),
            "{name}: {v}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], *p, "{name}: {v}");
        }
        assert!(h.contains_key("x-request-id"), "{name}");
    }

    // A body without Content-Length that grows past the cap is cut while being read.
    let chunked = send_chunked(&moat, &chat(&big, false).to_string()).await;
    assert_eq!(chunked, 413);

    // No bearer, a malformed one, a well-formed unknown key: 401 before anything is parsed.
    let unknown_key = format!("{}AAAA", &moat.key()[..moat.key().len() - 4]);
    for auth in [
        None,
        Some("Bearer nonsense".to_owned()),
        Some(format!("Bearer {unknown_key}")),
        Some(format!("Basic {}", moat.key())),
    ] {
        let mut headers = vec![json_ct];
        if let Some(a) = &auth {
            headers.push(("authorization", a.as_str()));
        }
        let (got, h, bytes) = fetch("POST", &url, &headers, chat("x", false).to_string()).await;
        let v: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(got, 401, "{auth:?}: {v}");
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
        assert!(h.contains_key("x-request-id"));
    }
    let (got, _, _) = fetch("POST", &url, &[("content-type", "text/plain")], "x").await;
    assert_eq!(got, 401, "authentication comes before parsing");

    // Routes: only the documented ones, wrong method 405 — OpenAI-shaped as well.
    let (status, h, body) = fetch("GET", &url, &[(bk, bv.as_str())], "").await;
    assert_eq!(status, 405);
    assert!(h.contains_key("x-request-id"));
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_object());
    let (status, _, body) = fetch("POST", &moat.url("/v1/admin"), &[json_ct], "{}").await;
    assert_eq!(status, 404);
    assert!(serde_json::from_slice::<Value>(&body).unwrap()["error"].is_object());

    assert_eq!(
        sim.requests().await,
        0,
        "a bad request reached the upstream"
    );
    // And a good one still works.
    let (status, _, _) = moat.post_json(CHAT, &chat("x", false), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(sim.requests().await, 1);
}

/// A bad request: name, headers, body, expected status, expected `param`.
type BadCase = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    String,
    u16,
    Option<&'static str>,
);

/// POSTs `body` with chunked transfer encoding (no Content-Length); returns the status.
async fn send_chunked(moat: &Daemon, body: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(moat.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: moat\r\n\
         content-type: application/json\r\ntransfer-encoding: chunked\r\n\
         authorization: Bearer {}\r\nconnection: close\r\n\r\n",
        moat.key()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    for part in body.as_bytes().chunks(1000) {
        let chunk = format!("{:x}\r\n", part.len());
        // The server may answer and close before taking the rest.
        if s.write_all(chunk.as_bytes()).await.is_err()
            || s.write_all(part).await.is_err()
            || s.write_all(b"\r\n").await.is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out);
    text.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text}"))
}
