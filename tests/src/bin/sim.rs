//! `moat-sim`: an OpenAI-compatible inference server for tests, benchmarks and the demo.
//!
//! Serves `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings` (JSON or SSE with
//! `data: [DONE]` and `stream_options.include_usage`), `GET /v1/models` and `GET /health`.
//! Answers are made of numbered tokens (`t0 t1 …`) or, with `--echo`, the words of the caller's
//! last message: each word is a stream chunk, unless the message contains `␞` (U+241E), which
//! then marks the chunk boundaries exactly (so a test can split any text at any offset);
//! `{{system}}` in it is replaced by the request's first system message (a model leaking its
//! system prompt; in 5-character chunks when `␞` is used). With `--classifier WORD` the simulator is a prompt-guard model instead: it
//! answers `unsafe` when the last user message contains WORD (any case), else `safe`. Timing: `--latency-ms` before the first byte, `--tokens-per-sec` between tokens.
//!
//! Control plane for tests (never behind the gateway):
//! - `GET /_sim/stats`: requests, completed, cancelled (the client went away), failed
//!   (injected), in flight, health checks, the last request's headers and body, and the
//!   `cache_salt` of every request in order (`cache_salts`, `null` where none was sent);
//! - `POST /_sim/fail` `{"mode": "none|error500|error400|hang|reset_mid_stream|hang_mid_stream",
//!   "after_chunks": 2, "count": 1}`: inject a failure into the next `count` requests (all when
//!   absent);
//! - `POST /_sim/reset`: zero the counters.
//!
//! Prints `LISTENING <addr>` on stdout once bound (use `--listen 127.0.0.1:0` for a free port).
//! With `--control-listen ADDR` the `/_sim/*` routes are served on that address too (printed as
//! `CONTROL <addr>` next): a test can then read the counters of a simulator whose inference
//! port the kernel reserves for the gateway.
//!
//! With `--tls-cert`/`--tls-key` the inference port speaks TLS (tokio-rustls), and with
//! `--client-ca` too it requires a client certificate signed by that CA, as vLLM does with
//! `--ssl-ca-certs … --ssl-cert-reqs 2`. A failed handshake never reaches the routes: it only
//! counts in `tls_rejected` (and is printed on stderr). The control port stays plain HTTP.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use base64::Engine as _;
use clap::Parser;
use futures_util::stream;
use serde::Deserialize;
use serde_json::{Value, json};

#[derive(Parser, Debug, Clone)]
#[command(name = "moat-sim", about = "OpenAI-compatible inference simulator")]
struct Args {
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// A second listener for the `/_sim/*` control routes alone.
    #[arg(long)]
    control_listen: Option<SocketAddr>,
    /// Name reported as `system_fingerprint`, so tests can tell hosts apart.
    #[arg(long, default_value = "moat-sim")]
    name: String,
    /// Models listed by `/v1/models` (any model is served).
    #[arg(long = "model")]
    models: Vec<String>,
    /// Delay before the first byte of an answer.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Token rate of answers; 0 sends them as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    tokens_per_sec: f64,
    /// Tokens in an answer (without `--echo`).
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Answer with the words of the caller's last message.
    #[arg(long)]
    echo: bool,
    /// Act as a prompt-guard classifier: `unsafe` when the last user message contains this
    /// word, else `safe`.
    #[arg(long)]
    classifier: Option<String>,
    /// Require `Authorization: Bearer <key>` on `/v1/*`.
    #[arg(long)]
    api_key: Option<String>,
    /// Embedding dimension.
    #[arg(long, default_value_t = 8)]
    dim: usize,
    /// Serve TLS with this PEM certificate (chain) …
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// … and this PEM key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Require a client certificate signed by a CA of this PEM bundle (mutual TLS).
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
enum Mode {
    #[default]
    None,
    Error500,
    /// A 400 whose words carry internals (model id, paths, limits), as vLLM's do.
    Error400,
    Hang,
    ResetMidStream,
    HangMidStream,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Fail {
    mode: Mode,
    #[serde(default = "two")]
    after_chunks: usize,
    #[serde(default)]
    count: Option<u64>,
}

fn two() -> usize {
    2
}

#[derive(Default)]
struct Stats {
    requests: u64,
    completed: u64,
    cancelled: u64,
    failed: u64,
    in_flight: u64,
    health_checks: u64,
    /// TLS handshakes refused (no client certificate, an unknown CA, an expired one, …).
    tls_rejected: u64,
    /// The client certificate (DER, base64) of the last TLS connection that presented one.
    last_client_cert: Option<String>,
    by_path: BTreeMap<String, u64>,
    last_headers: BTreeMap<String, String>,
    last_body: Value,
    cache_salts: Vec<Value>,
}

struct Sim {
    args: Args,
    stats: Mutex<Stats>,
    fail: Mutex<Option<Fail>>,
}

type Shared = Arc<Sim>;

impl Sim {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The failure planned for this request, if any (and counts it down).
    fn take_failure(&self) -> Option<Fail> {
        let mut slot = self.fail.lock().unwrap_or_else(|e| e.into_inner());
        let f = slot.clone()?;
        if f.mode == Mode::None {
            return None;
        }
        match f.count {
            Some(0) => {
                *slot = None;
                return None;
            }
            Some(n) => slot.as_mut().unwrap().count = Some(n - 1),
            None => {}
        }
        Some(f)
    }
}

/// Counts a request in flight; on drop records how it ended. Dropped early = the client (the
/// gateway) went away: that is what the cancellation tests look for.
struct Track {
    sim: Shared,
    outcome: Option<&'static str>,
}

impl Track {
    fn new(sim: &Shared) -> Self {
        sim.stats().in_flight += 1;
        Self {
            sim: sim.clone(),
            outcome: None,
        }
    }
}

impl Drop for Track {
    fn drop(&mut self) {
        let mut s = self.sim.stats();
        s.in_flight -= 1;
        match self.outcome {
            Some("completed") => s.completed += 1,
            Some(_) => s.failed += 1,
            None => s.cancelled += 1,
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        println!("LISTENING {}", listener.local_addr()?);
        let control = match args.control_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await?;
                println!("CONTROL {}", l.local_addr()?);
                Some(l)
            }
            None => None,
        };
        let tls = tls_acceptor(&args)?;
        let sim = Arc::new(Sim {
            args,
            stats: Mutex::default(),
            fail: Mutex::default(),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/v1/embeddings", post(embeddings))
            .route("/v1/models", get(models))
            .route("/health", get(health))
            .route("/_sim/stats", get(stats))
            .route("/_sim/fail", post(fail))
            .route("/_sim/reset", post(reset))
            .with_state(sim.clone());
        let sim_tls = sim.clone();
        if let Some(l) = control {
            let control = Router::new()
                .route("/_sim/stats", get(stats))
                .route("/_sim/fail", post(fail))
                .route("/_sim/reset", post(reset))
                .with_state(sim);
            tokio::spawn(async move { axum::serve(l, control).await });
        }
        if let Some(acceptor) = tls {
            return serve_tls(listener, acceptor, app, sim_tls).await;
        }
        // Small SSE frames must leave at once, as a real server's would (no Nagle).
        let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

/// The TLS side of the inference port, when `--tls-cert` is given.
fn tls_acceptor(args: &Args) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    use anyhow::Context as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else {
        return Ok(None);
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .context("--tls-cert")?
        .collect::<Result<Vec<_>, _>>()
        .context("--tls-cert")?;
    let key = PrivateKeyDer::from_pem_file(key).context("--tls-key")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &args.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).context("--client-ca")? {
                roots.add(c.context("--client-ca")?)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let config = builder.with_single_cert(chain, key)?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// Accepts TLS connections and serves `app` over each (HTTP/1.1).
async fn serve_tls(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    sim: Shared,
) -> anyhow::Result<()> {
    loop {
        let (tcp, peer) = listener.accept().await?;
        let _ = tcp.set_nodelay(true);
        let (acceptor, app, sim) = (acceptor.clone(), app.clone(), sim.clone());
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(tls) => tls,
                Err(e) => {
                    sim.stats().tls_rejected += 1;
                    eprintln!("moat-sim: TLS handshake with {peer} failed: {e}");
                    return;
                }
            };
            if let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
                sim.stats().last_client_cert =
                    Some(base64::engine::general_purpose::STANDARD.encode(cert.as_ref()));
            }
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
        "param": null, "code": null}});
    (status, Json(body)).into_response()
}

/// What a real server's refusal gives away: its model id, its limits, its paths.
const INTERNALS: &str = "model meta-llama/Sim-70B-Instruct: max_num_batched_tokens=8192 \
    exceeded (vllm 0.6.3, /opt/vllm/entrypoints/openai/serving_engine.py)";

fn authorized(sim: &Sim, headers: &HeaderMap) -> bool {
    match &sim.args.api_key {
        None => true,
        Some(key) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}")),
    }
}

/// Records the request and parses its body; `Err` is the response to send instead.
async fn admit(sim: &Shared, path: &str, req: Request) -> Result<Value, Response> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, 16 * 1024 * 1024)
        .await
        .map_err(|_| error(StatusCode::BAD_REQUEST, "unreadable body"))?;
    let value: Value = serde_json::from_slice(&bytes)
        .map_err(|_| error(StatusCode::BAD_REQUEST, "invalid JSON"))?;
    {
        let mut s = sim.stats();
        s.requests += 1;
        *s.by_path.entry(path.to_owned()).or_default() += 1;
        s.last_headers = parts
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("?").to_owned()))
            .collect();
        s.last_body = value.clone();
        s.cache_salts
            .push(value.get("cache_salt").cloned().unwrap_or(Value::Null));
    }
    if !authorized(sim, &parts.headers) {
        return Err(error(StatusCode::UNAUTHORIZED, "bad upstream credential"));
    }
    Ok(value)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The text of the last user message (string content or the text parts).
fn last_user_text(body: &Value) -> String {
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    let Some(last) = msgs.iter().rev().find(|m| m["role"] == "user") else {
        return String::new();
    };
    match &last["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The content of the request's first system message.
fn first_system(body: &Value) -> String {
    let msgs = body["messages"].as_array().cloned().unwrap_or_default();
    msgs.iter()
        .find(|m| m["role"] == "system")
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned()
}

fn prompt_text(body: &Value) -> String {
    match &body["prompt"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// The chunk boundary marker of echo mode.
const SPLIT: char = '\u{241E}';

/// The answer's tokens: each word with its trailing space, so concatenation is the text.
fn answer_tokens(sim: &Sim, source: &str, body: &Value) -> Vec<String> {
    if let Some(word) = &sim.args.classifier {
        let unsafe_ = source.to_lowercase().contains(&word.to_lowercase());
        return vec![if unsafe_ { "unsafe" } else { "safe" }.to_owned()];
    }
    if sim.args.echo && source.contains(SPLIT) {
        // The leaked prompt comes in chunks of 5 characters.
        let chars: Vec<char> = first_system(body).chars().collect();
        let system: Vec<String> = chars.chunks(5).map(|c| c.iter().collect()).collect();
        let system = system.join(&SPLIT.to_string());
        return source
            .replace("{{system}}", &system)
            .split(SPLIT)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .collect();
    }
    let source = &source.replace("{{system}}", &first_system(body));
    let words: Vec<String> = if sim.args.echo {
        source.split_whitespace().map(str::to_owned).collect()
    } else {
        (0..sim.args.chunks).map(|i| format!("t{i}")).collect()
    };
    let max = body["max_tokens"]
        .as_u64()
        .or(body["max_completion_tokens"].as_u64())
        .unwrap_or(u64::MAX) as usize;
    let n = words.len().min(max);
    words
        .iter()
        .take(n)
        .enumerate()
        .map(|(i, w)| {
            if i + 1 < n {
                format!("{w} ")
            } else {
                w.clone()
            }
        })
        .collect()
}

fn usage(prompt: &str, completion: usize) -> Value {
    let p = prompt.split_whitespace().count();
    json!({"prompt_tokens": p, "completion_tokens": completion, "total_tokens": p + completion})
}

fn token_delay(sim: &Sim) -> Duration {
    if sim.args.tokens_per_sec > 0.0 {
        Duration::from_secs_f64(1.0 / sim.args.tokens_per_sec)
    } else {
        Duration::ZERO
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

async fn chat(State(sim): State<Shared>, req: Request) -> Response {
    generate(sim, Kind::Chat, req).await
}

async fn completions(State(sim): State<Shared>, req: Request) -> Response {
    generate(sim, Kind::Completion, req).await
}

async fn generate(sim: Shared, kind: Kind, req: Request) -> Response {
    let path = match kind {
        Kind::Chat => "/v1/chat/completions",
        Kind::Completion => "/v1/completions",
    };
    let body = match admit(&sim, path, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut track = Track::new(&sim);
    let failure = sim.take_failure();
    let model = body["model"].as_str().unwrap_or("").to_owned();
    let source = match kind {
        Kind::Chat => last_user_text(&body),
        Kind::Completion => prompt_text(&body),
    };
    let tokens = answer_tokens(&sim, &source, &body);
    let usage = usage(&source, tokens.len());
    let id = format!("cmpl-sim-{}", now());
    let fp = sim.args.name.clone();

    match failure.as_ref().map(|f| f.mode) {
        Some(Mode::Error500) => {
            track.outcome = Some("failed");
            return error(StatusCode::INTERNAL_SERVER_ERROR, "simulated failure");
        }
        Some(Mode::Error400) => {
            track.outcome = Some("failed");
            return error(StatusCode::BAD_REQUEST, INTERNALS);
        }
        Some(Mode::Hang) => {
            // Held until the caller gives up; `track` then records a cancellation.
            std::future::pending::<()>().await;
        }
        _ => {}
    }
    tokio::time::sleep(Duration::from_millis(sim.args.latency_ms)).await;

    if body["stream"] != Value::Bool(true) {
        tokio::time::sleep(token_delay(&sim) * tokens.len() as u32).await;
        let text: String = tokens.concat();
        let answer = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": now(), "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                    "logprobs": null, "finish_reason": "stop"}],
                "usage": usage,
            }),
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": now(), "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": 0, "text": text, "logprobs": null,
                    "finish_reason": "stop"}],
                "usage": usage,
            }),
        };
        track.outcome = Some("completed");
        // Headers a gateway must not relay.
        let leak = [
            ("x-sim-internal", "leaks-if-relayed"),
            ("set-cookie", "sim=1"),
        ];
        return (leak, Json(answer)).into_response();
    }

    let include_usage = body["stream_options"]["include_usage"] == Value::Bool(true);
    let chunk = |delta: Value, finish: Value| -> Value {
        match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": now(), "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": 0, "delta": delta, "logprobs": null,
                    "finish_reason": finish}],
            }),
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": now(), "model": model,
                "system_fingerprint": fp,
                "choices": [{"index": 0, "text": delta["content"].as_str().unwrap_or(""),
                    "logprobs": null, "finish_reason": finish}],
            }),
        }
    };
    let mut events = Vec::new();
    if let Kind::Chat = kind {
        events.push(chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
        ));
    }
    for t in &tokens {
        events.push(chunk(json!({"content": t}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        let mut u = chunk(json!({}), Value::Null);
        u["choices"] = json!([]);
        u["usage"] = usage;
        events.push(u);
    }
    let mut frames: Vec<Bytes> = events
        .iter()
        .map(|e| Bytes::from(format!("data: {e}\n\n")))
        .collect();
    frames.push(Bytes::from_static(b"data: [DONE]\n\n"));

    struct St {
        frames: std::vec::IntoIter<Bytes>,
        sent: usize,
        delay: Duration,
        failure: Option<Fail>,
        track: Track,
    }
    let st = St {
        frames: frames.into_iter(),
        sent: 0,
        delay: token_delay(&sim),
        failure,
        track,
    };
    let body = stream::unfold(st, |mut st| async move {
        // Pause first, so the frames before an injected failure are on the wire before it.
        let floor = Duration::from_millis(if st.failure.is_some() { 20 } else { 0 });
        let pause = st.delay.max(floor);
        // No pause at all when none is asked for: a zero sleep still waits for a timer tick.
        if st.sent > 0 && !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        if let Some(f) = &st.failure
            && st.sent == f.after_chunks
        {
            match f.mode {
                Mode::ResetMidStream => {
                    st.track.outcome = Some("failed");
                    let e = std::io::Error::other("simulated reset");
                    // Ending the body with an error makes hyper cut the connection.
                    st.failure = None;
                    st.frames = Vec::new().into_iter();
                    return Some((Err(e), st));
                }
                Mode::HangMidStream => std::future::pending::<()>().await,
                _ => {}
            }
        }
        match st.frames.next() {
            Some(f) => {
                st.sent += 1;
                if st.frames.len() == 0 && st.track.outcome.is_none() {
                    st.track.outcome = Some("completed");
                }
                Some((Ok::<Bytes, std::io::Error>(f), st))
            }
            None => None,
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("x-sim-internal", "leaks-if-relayed")
        .header(header::SET_COOKIE, "sim=1")
        .body(Body::from_stream(body))
        .unwrap()
}

async fn embeddings(State(sim): State<Shared>, req: Request) -> Response {
    let body = match admit(&sim, "/v1/embeddings", req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut track = Track::new(&sim);
    if let Some(f) = sim.take_failure() {
        match f.mode {
            Mode::Error500 => {
                track.outcome = Some("failed");
                return error(StatusCode::INTERNAL_SERVER_ERROR, "simulated failure");
            }
            Mode::Hang => std::future::pending::<()>().await,
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(sim.args.latency_ms)).await;
    let inputs: Vec<String> = match &body["input"] {
        Value::Array(a) => a.iter().map(|v| v.to_string()).collect(),
        v => vec![v.to_string()],
    };
    let base64 = body["encoding_format"] == "base64";
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let v = vector(text, sim.args.dim);
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|t| t.split_whitespace().count()).sum();
    track.outcome = Some("completed");
    Json(json!({
        "object": "list", "data": data, "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

/// A deterministic unit vector from the text.
fn vector(text: &str, dim: usize) -> Vec<f32> {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut out = Vec::with_capacity(dim);
    for i in 0..dim {
        for b in text.bytes().chain([i as u8]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
        out.push(((h >> 40) as f32 / (1u64 << 24) as f32) - 0.5);
    }
    let norm = out
        .iter()
        .map(|x| x * x)
        .sum::<f32>()
        .sqrt()
        .max(f32::EPSILON);
    out.iter().map(|x| x / norm).collect()
}

async fn models(State(sim): State<Shared>, headers: HeaderMap) -> Response {
    sim.stats().health_checks += 1;
    if !authorized(&sim, &headers) {
        return error(StatusCode::UNAUTHORIZED, "bad upstream credential");
    }
    let data: Vec<Value> = sim
        .args
        .models
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "moat-sim"}))
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

async fn health(State(sim): State<Shared>) -> &'static str {
    sim.stats().health_checks += 1;
    "ok"
}

async fn stats(State(sim): State<Shared>) -> Json<Value> {
    let s = sim.stats();
    Json(json!({
        "requests": s.requests,
        "completed": s.completed,
        "cancelled": s.cancelled,
        "failed": s.failed,
        "in_flight": s.in_flight,
        "health_checks": s.health_checks,
        "tls_rejected": s.tls_rejected,
        "last_client_cert": s.last_client_cert,
        "by_path": s.by_path,
        "last_headers": s.last_headers,
        "last_body": s.last_body,
        "cache_salts": s.cache_salts,
    }))
}

async fn fail(State(sim): State<Shared>, Json(f): Json<Fail>) -> StatusCode {
    *sim.fail.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    StatusCode::NO_CONTENT
}

async fn reset(State(sim): State<Shared>) -> StatusCode {
    let mut s = sim.stats();
    let in_flight = s.in_flight;
    *s = Stats {
        in_flight,
        ..Stats::default()
    };
    StatusCode::NO_CONTENT
}
