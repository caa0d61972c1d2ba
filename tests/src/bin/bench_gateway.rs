//! `cargo xtask bench gateway`: what moat costs in front of an inference server, next to nginx
//! doing the same job, in one run on one machine.
//!
//! - **Upstream**: nginx answering at once (`return 200`): a fixed ~600-byte `chat.completion`
//!   JSON, or a fixed 20-chunk SSE body (plus the usage event and `[DONE]`). It listens twice
//!   for each kind: once for moat (a pool host, so segmentation protects it) and once for
//!   `direct` and the nginx peer (segmentation lets only the gateway reach a pool host).
//! - `direct`: wrk straight to the upstream;
//! - `nginx`: nginx as a reverse proxy with a bearer check (keep-alive upstream pool,
//!   buffering off, access log on as by default);
//! - `moat`: moat with every check on, as issue 15's goal asks: enforcing (segmentation on,
//!   worker as `moat` in its cgroup), an API key, RBAC, quotas per tenant and key (generous:
//!   every request counted, none refused), guardrails on (shipped rules, secrets redacted),
//!   access log on;
//! - `before` (with `--moat-before PATH`): another moat binary, set up as `moat`, so that a
//!   change is measured against the build before it in one run.
//!
//! Each cell: a warm-up (default 3 s), then a measured run (default 15 s) of wrk (2 threads,
//! keep-alive, a ~1 KB chat body); JSON and SSE at 32 and 64 connections. Printed per cell:
//! requests/s, p50, p99, the ratio to direct, the p50 added, and the proxy's CPU time per 1,000
//! requests (user + system of all its processes, from /proc, and the two apart: the system
//! part is mostly the sockets' work, about the same for every proxy). Then a soak (moat, JSON at the
//! first concurrency, `--soak` seconds in 30-second slices: first slice vs last, RSS at start
//! and end), the RSS of moat holding `--idle-streams` open streams and `--keepalive` idle
//! keep-alive connections, sequential time to first chunk, and the policy case.
//!
//! Then the guardrails case: moat with guardrails off and on under the same load (its own
//! simulator upstream), the hold-back window's added time to first token, and in process the
//! filter's cost per stream chunk and its MB/s on 1 MB.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::BodyExt;
use moat_tests::{Daemon, Sim, send, servers::free_port};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per measured run.
    #[arg(long, default_value_t = 15)]
    duration: u64,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Concurrency levels (JSON and SSE).
    #[arg(long, default_value = "32,64", value_delimiter = ',')]
    concurrency: Vec<u32>,
    /// Seconds of the soak (moat, JSON); 0 skips it.
    #[arg(long, default_value_t = 300)]
    soak: u64,
    /// Open streams held for the memory figure; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    idle_streams: u32,
    /// Idle keep-alive connections held for the memory figure; 0 skips it.
    #[arg(long, default_value_t = 10_000)]
    keepalive: u32,
    /// Sequential streamed requests for the time-to-first-chunk measurement.
    #[arg(long, default_value_t = 200)]
    sequential: u32,
    /// Keys in the policy case (50 roles, 20 models); 0 skips it.
    #[arg(long, default_value_t = 1000)]
    policy_keys: u32,
    /// Skip the guardrails case (off vs on, filter costs).
    #[arg(long)]
    no_guardrails: bool,
    /// Only the guardrails' in-process filter costs (no daemons, no load).
    #[arg(long)]
    filter_costs_only: bool,
    /// Only the guardrails case (off vs on, then the filter costs).
    #[arg(long)]
    guardrails_only: bool,
    /// `postgres`: instead of the cells above, moat on the shared store (two replicas on a
    /// throw-away PostgreSQL) against the embedded default, and revocation propagation.
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// `redis`: the shared-store case counts quotas in a throw-away Redis.
    #[arg(long, default_value = "memory")]
    quotas: String,
    /// Revocations timed from replica A to replica B (shared-store case).
    #[arg(long, default_value_t = 100)]
    revocations: u32,
    /// Another `moat` binary (say a build of the previous commit) measured in the same run, as
    /// extra `before` rows of the JSON and SSE cells (its own daemon, upstream ports and key);
    /// in the guardrails case, its own pair of daemons (off and on) in the same rounds; in the
    /// shared-store case, a third replica on the same PostgreSQL and Redis. The file must be
    /// named `moat` (another name runs as the service user next to the other daemons' workers,
    /// which then refuse to start).
    #[arg(long)]
    moat_before: Option<std::path::PathBuf>,
}

struct Nginx {
    child: Child,
}

impl Nginx {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    /// SIGTERM, so the master stops its workers (a SIGKILLed master leaves them running),
    /// then SIGKILL if it has not exited within 5 s.
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts nginx in `dir` with `servers` inside its `http` block.
fn nginx(dir: &Path, name: &str, servers: &str, ports: &[u16]) -> Result<Nginx> {
    let d = dir.join(name);
    std::fs::create_dir_all(&d)?;
    let d = d.display();
    let conf = format!(
        r#"daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
{servers}
}}
"#
    );
    let path = dir.join(format!("{name}.conf"));
    std::fs::write(&path, conf)?;
    let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx not found (cargo xtask setup installs nginx-light)")?;
    let child = Command::new(bin)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join(format!("{name}-error.log")))
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start nginx")?;
    let n = Nginx { child };
    for port in ports {
        let mut up = false;
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", *port)).is_ok() {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !up {
            bail!("nginx {name} did not start on port {port}");
        }
    }
    Ok(n)
}

/// The fixed non-streamed answer: a `chat.completion` of about 600 bytes. Written by hand, in
/// the key order vLLM and OpenAI send (`serde_json` would sort the keys: `choices` before
/// `model`).
fn json_answer(model: &str) -> String {
    let model = json!(model);
    let mut content = String::new();
    let make = |content: &str| {
        format!(
            r#"{{"id":"chatcmpl-bench0000000000000000","object":"chat.completion","created":1700000000,"model":{model},"system_fingerprint":"fp_bench","choices":[{{"index":0,"message":{{"role":"assistant","content":{}}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":230,"completion_tokens":64,"total_tokens":294}}}}"#,
            json!(content)
        )
    };
    while make(&content).len() < 600 {
        content.push_str("tok ");
    }
    make(&content)
}

/// The fixed stream: 20 content chunks, the finish chunk, the usage event, `[DONE]`; keys in
/// vLLM's order, as in [`json_answer`].
fn sse_answer(model: &str) -> String {
    let model = json!(model);
    let chunk = |delta: serde_json::Value, finish: serde_json::Value, usage: bool| {
        let head = format!(
            r#"{{"id":"chatcmpl-bench0000000000000000","object":"chat.completion.chunk","created":1700000000,"model":{model},"system_fingerprint":"fp_bench","choices":"#
        );
        if usage {
            format!(
                "data: {head}[],\"usage\":{{\"prompt_tokens\":230,\"completion_tokens\":20,\"total_tokens\":250}}}}\n\n"
            )
        } else {
            format!(
                "data: {head}[{{\"index\":0,\"delta\":{delta},\"logprobs\":null,\"finish_reason\":{finish}}}]}}\n\n"
            )
        }
    };
    let mut s = chunk(
        json!({"role": "assistant", "content": ""}),
        json!(null),
        false,
    );
    for i in 0..20 {
        s += &chunk(json!({"content": format!("tok{i} ")}), json!(null), false);
    }
    s += &chunk(json!({}), json!("stop"), false);
    s += &chunk(json!({}), json!(null), true);
    s += "data: [DONE]\n\n";
    s
}

/// An nginx `return 200` text (single-quoted: escape quotes and backslashes).
fn nginx_text(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    errors: u64,
}

/// wrk's `12.34ms` / `1.2s` / `800us` to milliseconds.
fn ms(text: &str) -> f64 {
    let (num, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .unwrap_or((text, "ms"));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1000.0,
        "s" => v * 1000.0,
        "m" => v * 60_000.0,
        _ => v,
    }
}

/// In a body for [`wrk`]: replaced by a text that differs in every request (so no two
/// requests send the same prompt).
const EACH_REQUEST: &str = "@EACH_REQUEST@";

fn wrk(
    dir: &Path,
    url: &str,
    bearer: Option<&str>,
    body: &str,
    conc: u32,
    secs: u64,
) -> Result<Load> {
    let auth = bearer
        .map(|k| format!("wrk.headers[\"Authorization\"] = \"Bearer {k}\"\n"))
        .unwrap_or_default();
    // Each wrk thread numbers its requests, prefixed by the thread's own number.
    let body_lua = match body.split_once(EACH_REQUEST) {
        None => format!("wrk.body = [==[{body}]==]\n"),
        Some((pre, post)) => format!(
            "local threads = 0\n\
             setup = function(thread) threads = threads + 1; thread:set(\"me\", threads) end\n\
             local n = 0\n\
             request = function()\n\
               n = n + 1\n\
               return wrk.format(nil, nil, nil, [==[{pre}]==] .. me .. \"-\" .. n .. [==[{post}]==])\n\
             end\n"
        ),
    };
    let script = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n{auth}\
         {body_lua}\
         done = function(summary, latency, requests)\n\
           io.write(string.format(\"NON2XX %d\\n\", summary.errors.status))\n\
         end\n"
    );
    let path = dir.join("load.lua");
    std::fs::write(&path, script)?;
    run_wrk(&path, url, conc, secs)
}

fn run_wrk(script: &Path, url: &str, conc: u32, secs: u64) -> Result<Load> {
    let out = Command::new("wrk")
        .args([
            "-t",
            "2",
            "-c",
            &conc.to_string(),
            "-d",
            &format!("{secs}s"),
        ])
        .arg("--latency")
        .arg("-s")
        .arg(script)
        .arg(url)
        .output()
        .context("cannot run wrk (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(|r| r.split_whitespace().next().unwrap_or("").to_owned())
    };
    let errors: u64 = field("NON2XX").and_then(|v| v.parse().ok()).unwrap_or(0);
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    Ok(Load {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").map_or(f64::NAN, |v| ms(&v)),
        p99_ms: field("99%").map_or(f64::NAN, |v| ms(&v)),
        requests,
        errors,
    })
}

/// `pid` and its descendants.
fn tree(pid: u32) -> Vec<u32> {
    let mut all = vec![pid];
    let mut i = 0;
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split_whitespace().nth(1)?.parse().ok()?;
            Some((p, ppid))
        })
        .collect();
    while i < all.len() {
        let parent = all[i];
        all.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    all
}

/// CPU seconds (user + system) used so far by `pid` and its descendants.
fn cpu_secs(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// CPU seconds used so far by `pid` and its descendants: (user, system). The split shows
/// what a proxy spends in the kernel (the sockets, the same work for every proxy) apart from
/// its own code.
fn cpu_split(pid: u32) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let (user, system) = tree(pid)
        .iter()
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let f: Vec<&str> = stat[stat.rfind(')')? + 2..].split_whitespace().collect();
            // Fields 14 and 15 of stat (utime, stime), counted after the command name.
            Some((f[11].parse::<f64>().ok()?, f[12].parse::<f64>().ok()?))
        })
        .fold((0.0, 0.0), |(u, s), (du, ds)| (u + du, s + ds));
    (user / hz, system / hz)
}

/// Resident memory (MiB) of `pid` and its descendants.
fn rss_mib(pid: u32) -> f64 {
    tree(pid)
        .iter()
        .filter_map(|p| {
            let status = std::fs::read_to_string(format!("/proc/{p}/status")).ok()?;
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .sum::<f64>()
        / 1024.0
}

/// Sequential streamed requests: mean time to the first chunk and to the last.
async fn stream_timing(url: &str, bearer: Option<&str>, body: &str, n: u32) -> (f64, f64) {
    let auth = bearer.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    let (mut first, mut total) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..n {
        let start = Instant::now();
        let resp = send("POST", url, &headers, body.to_owned()).await;
        assert!(resp.status().is_success(), "{url}: {}", resp.status());
        let mut body = resp.into_body();
        let mut got_first = false;
        while let Some(frame) = body.frame().await {
            let frame = frame.expect("stream frame");
            if !got_first && frame.data_ref().is_some_and(|d| !d.is_empty()) {
                first += start.elapsed();
                got_first = true;
            }
        }
        total += start.elapsed();
    }
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / n as f64;
    (per(first), per(total))
}

fn chat_body_for(model: &str, stream: bool) -> String {
    // About 1 KB, like a short system prompt and a question.
    let filler = "Please answer carefully and concisely. ".repeat(22);
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": filler},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "max_tokens": 64,
        "stream": stream,
    })
    .to_string()
}

fn chat_body(stream: bool) -> String {
    chat_body_for("bench", stream)
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.filter_costs_only {
        filter_costs();
        return Ok(());
    }
    // Room for the idle connections of the memory figures (inherited by the upstreams).
    let limit = libc::rlimit {
        rlim_cur: 65_536,
        rlim_max: 65_536,
    };
    // SAFETY: plain syscall with a valid pointer; failure leaves the limit as it was.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

/// One target of a cell: its name, its URL, the bearer it needs, the process whose CPU counts.
struct Target {
    name: &'static str,
    url: String,
    bearer: Option<String>,
    pid: Option<u32>,
}

async fn run(args: Args) -> Result<()> {
    if args.guardrails_only {
        let sim = Sim::start(&["--chunks", "20", "--model", "bench"]);
        let tmp = tempfile::tempdir()?;
        return guardrails(&args, &sim, tmp.path()).await;
    }
    match (args.store.as_str(), args.quotas.as_str()) {
        ("sqlite", "memory") => {}
        ("sqlite" | "postgres", "memory" | "redis") => {
            return tokio::task::block_in_place(|| shared_store(&args));
        }
        (s, q) => bail!("--store {s} --quotas {q}: sqlite|postgres and memory|redis"),
    }
    let tmp = tempfile::tempdir()?;
    // The static upstream: JSON on (moat's, direct's) ports, SSE likewise.
    let [
        json_moat,
        json_direct,
        sse_moat,
        sse_direct,
        peer_json,
        peer_sse,
        json_before,
        sse_before,
    ] = [(); 8].map(|_| free_port());
    let (json_text, sse_text) = (json_answer("m"), sse_answer("s"));
    // The stream is a static file (longer than an nginx parameter may be); a POST to a static
    // file is a 405 that `error_page` turns into the file, answered 200.
    std::fs::write(tmp.path().join("sse.txt"), &sse_text)?;
    {
        // nginx's workers (not root) read it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(
            tmp.path().join("sse.txt"),
            std::fs::Permissions::from_mode(0o644),
        )?;
    }
    let mut servers = String::new();
    for port in [json_moat, json_direct, json_before] {
        servers += &format!(
            "    server {{ listen 127.0.0.1:{port} reuseport; access_log off;\n        \
             location / {{ default_type application/json; return 200 {}; }} }}\n",
            nginx_text(&json_text)
        );
    }
    for port in [sse_moat, sse_direct, sse_before] {
        servers += &format!(
            "    server {{ listen 127.0.0.1:{port} reuseport; access_log off; root {};\n        \
             location / {{ default_type text/event-stream; try_files /sse.txt =404; \
             error_page 405 =200 $uri; }} }}\n",
            tmp.path().display()
        );
    }
    let upstream = nginx(
        tmp.path(),
        "upstream",
        &servers,
        &[
            json_moat,
            json_direct,
            sse_moat,
            sse_direct,
            json_before,
            sse_before,
        ],
    )?;

    // moat, enforcing: its pool hosts are the upstream's moat ports.
    let slow = Sim::start(&[
        "--chunks",
        "20",
        "--model",
        "slow",
        "--tokens-per-sec",
        "0.02",
    ]);
    let mut moat = Daemon::enforcing();
    let host = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
    let config = moat.enforcing_config(&[host(json_moat)], "", EVERY_CHECK)
        + &format!(
            "\n[pools.sse]\nhosts = [\"{}\"]\n[models.s]\npool = \"sse\"\n\
             [pools.slow]\nhosts = [\"{}\"]\nidle_timeout_ms = 600000\n\
             [models.slow]\npool = \"slow\"\n",
            host(sse_moat),
            slow.addr
        );
    moat.write_config(&config);
    moat.create_tester_key();
    let _gateway = moat.cgroup().child("gateway");
    moat.start();
    moat.wait_pools_ready().await;
    let key = moat.key().to_owned();
    // The older binary: the same config shape on upstream ports of its own (each daemon's
    // segmentation keeps its pool hosts to its own worker).
    let before = match &args.moat_before {
        Some(bin) => {
            let mut d = Daemon::enforcing();
            let config = d.enforcing_config(&[host(json_before)], "", EVERY_CHECK)
                + &format!(
                    "\n[pools.sse]\nhosts = [\"{}\"]\n[models.s]\npool = \"sse\"\n",
                    host(sse_before)
                );
            d.write_config(&config);
            d.create_tester_key();
            let gateway = d.cgroup().child("gateway");
            d.start_binary(bin);
            d.wait_pools_ready().await;
            Some((d, gateway))
        }
        None => None,
    };

    let peer = nginx(
        tmp.path(),
        "peer",
        &format!(
            "    upstream json {{ server 127.0.0.1:{json_direct}; keepalive 128; }}\n\
             upstream sse {{ server 127.0.0.1:{sse_direct}; keepalive 128; }}\n{}{}",
            peer_server(peer_json, "json", &key),
            peer_server(peer_sse, "sse", &key)
        ),
        &[peer_json, peer_sse],
    )?;

    println!(
        "gateway benchmark: wrk -t2 keep-alive, {} s warm-up + {} s per cell, ~{} B chat body; \
         upstream nginx `return 200` ({} B JSON, {} B / 20-chunk SSE); moat enforcing, API key, \
         quotas, guardrails",
        args.warmup,
        args.duration,
        chat_body_for("m", false).len(),
        json_text.len(),
        sse_text.len()
    );
    println!(
        "\n{:<14} {:<7} {:>9} {:>8} {:>8} {:>7} {:>9} {:>12} {:>15} {:>8}",
        "case",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "p50 added",
        "CPU ms/1000",
        "of it user/sys",
        "non-2xx"
    );
    let path = "/v1/chat/completions";
    for (kind, model, direct_port, peer_port) in [
        ("json", "m", json_direct, peer_json),
        ("sse", "s", sse_direct, peer_sse),
    ] {
        let body = chat_body_for(model, kind == "sse");
        let mut targets = vec![
            Target {
                name: "direct",
                url: format!("http://127.0.0.1:{direct_port}{path}"),
                bearer: None,
                pid: None,
            },
            Target {
                name: "nginx",
                url: format!("http://127.0.0.1:{peer_port}{path}"),
                bearer: Some(key.clone()),
                pid: Some(peer.pid()),
            },
        ];
        if let Some((b, _)) = &before {
            targets.push(Target {
                name: "before",
                url: b.url(path),
                bearer: Some(b.key().to_owned()),
                pid: Some(b.pid()),
            });
        }
        targets.push(Target {
            name: "moat",
            url: moat.url(path),
            bearer: Some(key.clone()),
            pid: Some(moat.pid()),
        });
        for conc in &args.concurrency {
            let name = format!("{kind} c={conc}");
            let mut base: Option<Load> = None;
            for t in &targets {
                let bearer = t.bearer.as_deref();
                if args.warmup > 0 {
                    wrk(tmp.path(), &t.url, bearer, &body, *conc, args.warmup)?;
                }
                let cpu0 = t.pid.map(cpu_split);
                let l = wrk(tmp.path(), &t.url, bearer, &body, *conc, args.duration)?;
                let (cpu, split) = match (t.pid, cpu0) {
                    (Some(p), Some((u0, s0))) if l.requests > 0 => {
                        let (u1, s1) = cpu_split(p);
                        let per_1000 = |secs: f64| secs * 1000.0 / (l.requests as f64 / 1000.0);
                        let (user, system) = (per_1000(u1 - u0), per_1000(s1 - s0));
                        (
                            format!("{:.1}", user + system),
                            format!("{user:.1} / {system:.1}"),
                        )
                    }
                    _ => ("-".into(), "-".into()),
                };
                let (ratio, added) = match &base {
                    None => (1.0, 0.0),
                    Some(b) => (l.rps / b.rps, l.p50_ms - b.p50_ms),
                };
                println!(
                    "{:<14} {:<7} {:>9.0} {:>8.2} {:>8.2} {:>6.2}x {:>9.2} {:>12} {:>15} {:>8}",
                    name, t.name, l.rps, l.p50_ms, l.p99_ms, ratio, added, cpu, split, l.errors
                );
                if base.is_none() {
                    base = Some(l);
                }
            }
        }
    }

    if args.soak > 0 {
        soak(&args, tmp.path(), &moat, &key)?;
    }
    if args.idle_streams > 0 {
        idle_streams(&args, &moat, &key)?;
    }
    if args.keepalive > 0 {
        keepalive(&args, &moat)?;
    }

    println!(
        "\nstreaming, {} sequential requests (20 chunks each): mean ms",
        args.sequential
    );
    println!(
        "{:<7} {:>14} {:>10} {:>18}",
        "target", "first chunk", "total", "added per chunk"
    );
    let body = chat_body_for("s", true);
    let mut base_total = None;
    for (target, url, bearer) in [
        (
            "direct",
            format!("http://127.0.0.1:{sse_direct}{path}"),
            None,
        ),
        (
            "nginx",
            format!("http://127.0.0.1:{peer_sse}{path}"),
            Some(key.as_str()),
        ),
        ("moat", moat.url(path), Some(key.as_str())),
    ] {
        let (first, total) = stream_timing(&url, bearer, &body, args.sequential).await;
        let added = base_total.map_or(0.0, |b: f64| (total - b) / 20.0);
        println!("{target:<7} {first:>14.3} {total:>10.3} {added:>18.4}");
        base_total.get_or_insert(total);
    }
    println!(
        "\ngoal (issue 15): moat's ratio to direct at or above nginx's, p50 added at most \
         nginx's + 0.1 ms, CPU per 1,000 requests at most nginx's, the soak flat within 5 %."
    );
    drop(peer);
    drop(before);
    drop(moat);
    drop(upstream);
    if args.policy_keys > 0 {
        let sim = Sim::start(&["--chunks", "20", "--model", "bench"]);
        policy(&args, &sim, tmp.path()).await?;
    }
    if !args.no_guardrails {
        let sim = Sim::start(&["--chunks", "20", "--model", "bench"]);
        guardrails(&args, &sim, tmp.path()).await?;
    }
    Ok(())
}

/// The nginx peer's server on `port`: the bearer check, then `upstream`.
/// What the cells turn on beyond authentication and RBAC: quotas per tenant and key, generous
/// enough that every request is counted and none refused, and the guardrails with the shipped
/// rules (the prompt screened, the answer filtered, secrets redacted).
const EVERY_CHECK: &str = "\n[quotas.tenant]\nrequests_per_minute = 100000000\n\
    tokens_per_minute = 100000000000\n\
    [quotas.key]\nrequests_per_minute = 100000000\nconcurrent_requests = 10000\n\
    [guardrails]\nenabled = true\n[guardrails.policy]\nsecrets = \"redact\"\n";

fn peer_server(port: u16, upstream: &str, key: &str) -> String {
    format!(
        "    server {{\n        listen 127.0.0.1:{port} reuseport;\n        location / {{\n            \
         if ($http_authorization != \"Bearer {key}\") {{ return 401; }}\n            \
         proxy_pass http://{upstream};\n            proxy_http_version 1.1;\n            \
         proxy_set_header Connection \"\";\n            proxy_set_header Authorization \"\";\n            \
         proxy_buffering off;\n        }}\n    }}\n"
    )
}

/// moat under the benchmark's JSON load for `--soak` seconds, in 30-second slices (or halves
/// of a shorter soak): throughput of the first slice against the last, RSS at start and end.
fn soak(args: &Args, dir: &Path, moat: &Daemon, key: &str) -> Result<()> {
    let conc = args.concurrency.first().copied().unwrap_or(32);
    let slice = 30.min(args.soak / 2).max(1);
    let slices = (args.soak / slice).max(2);
    let body = chat_body_for("m", false);
    let url = moat.url("/v1/chat/completions");
    let rss0 = rss_mib(moat.pid());
    println!(
        "\nsoak: moat, json c={conc}, {} s in {slices} slices of {slice} s",
        slices * slice
    );
    // Per slice beside the rate: moat's CPU per request, and the machine's steal time and
    // idle share. A rate that falls while moat's cost per request stays flat is CPU taken
    // from moat (by the hypervisor, or by the load and the upstream), not moat slowing.
    let mut rates = Vec::new();
    let mut costs = Vec::new();
    let mut machine = Vec::new();
    for _ in 0..slices {
        let (cpu0, stat0) = (cpu_secs(moat.pid()), MachineTime::now());
        let l = wrk(dir, &url, Some(key), &body, conc, slice)?;
        let (cpu1, stat1) = (cpu_secs(moat.pid()), MachineTime::now());
        rates.push(l.rps);
        costs.push((cpu1 - cpu0) * 1e6 / l.requests.max(1) as f64);
        machine.push(stat1.shares_since(&stat0));
        if l.errors > 0 {
            println!("  slice with {} non-2xx", l.errors);
        }
    }
    let rss1 = rss_mib(moat.pid());
    let (first, last) = (rates[0], rates[rates.len() - 1]);
    let join = |v: Vec<String>| v.join(" ");
    println!(
        "  req/s per slice: {}",
        join(rates.iter().map(|r| format!("{r:.0}")).collect())
    );
    println!(
        "  moat CPU µs per request: {}",
        join(costs.iter().map(|c| format!("{c:.1}")).collect())
    );
    println!(
        "  machine steal / idle %: {}",
        join(
            machine
                .iter()
                .map(|(steal, idle)| format!("{steal:.1}/{idle:.1}"))
                .collect()
        )
    );
    println!(
        "  last / first slice: {:.3} (goal ≥ 0.95); CPU per request last / first {:.3}; \
         RSS {rss0:.1} MiB at start, {rss1:.1} MiB at end",
        last / first,
        costs[costs.len() - 1] / costs[0]
    );
    Ok(())
}

/// The machine's CPU time so far, from the first line of `/proc/stat`.
struct MachineTime {
    total: u64,
    idle: u64,
    steal: u64,
}

impl MachineTime {
    fn now() -> MachineTime {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait irq softirq steal ...
        let f: Vec<u64> = stat
            .lines()
            .next()
            .unwrap_or("")
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|v| v.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| f.get(i).copied().unwrap_or(0);
        MachineTime {
            total: f.iter().sum(),
            idle: at(3) + at(4),
            steal: at(7),
        }
    }

    /// Steal and idle time since `before`, in % of all CPU time.
    fn shares_since(&self, before: &MachineTime) -> (f64, f64) {
        let total = self.total.saturating_sub(before.total).max(1) as f64;
        let pct = |now: u64, then: u64| now.saturating_sub(then) as f64 * 100.0 / total;
        (pct(self.steal, before.steal), pct(self.idle, before.idle))
    }
}

/// RSS of moat with `--idle-streams` streams open (the upstream sends a chunk every 50 s).
fn idle_streams(args: &Args, moat: &Daemon, key: &str) -> Result<()> {
    let rss0 = rss_mib(moat.pid());
    let body = chat_body_for("slow", true);
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {key}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut conns = Vec::new();
    for _ in 0..args.idle_streams {
        let mut c = TcpStream::connect(moat.addr())?;
        c.write_all(req.as_bytes())?;
        conns.push(c);
    }
    // Count the streams whose head arrived (a 200), within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut open = 0;
    for c in &mut conns {
        let left = deadline.saturating_duration_since(Instant::now());
        c.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        let mut buf = [0u8; 12];
        if c.read_exact(&mut buf).is_ok() && buf.starts_with(b"HTTP/1.1 200") {
            open += 1;
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = rss_mib(moat.pid());
    println!(
        "\nidle streams: {open} of {} open; moat RSS {rss0:.1} MiB → {rss1:.1} MiB \
         ({:.1} KiB per stream)",
        args.idle_streams,
        (rss1 - rss0) * 1024.0 / open.max(1) as f64
    );
    Ok(())
}

/// RSS of moat holding `--keepalive` idle keep-alive connections, each after one request.
fn keepalive(args: &Args, moat: &Daemon) -> Result<()> {
    let rss0 = rss_mib(moat.pid());
    let req = b"GET /healthz HTTP/1.1\r\nHost: moat\r\n\r\n";
    let mut conns = Vec::new();
    let mut ok = 0;
    for _ in 0..args.keepalive {
        let Ok(mut c) = TcpStream::connect(moat.addr()) else {
            break;
        };
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 12];
        if c.write_all(req).is_ok()
            && c.read_exact(&mut buf).is_ok()
            && buf.starts_with(b"HTTP/1.1 200")
        {
            ok += 1;
        }
        conns.push(c);
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss1 = rss_mib(moat.pid());
    println!(
        "keep-alive connections: {ok} of {} answered and held; moat RSS {rss0:.1} MiB → \
         {rss1:.1} MiB ({:.1} KiB per connection)",
        args.keepalive,
        (rss1 - rss0) * 1024.0 / ok.max(1) as f64
    );
    Ok(())
}

/// The policy case: the same daemon serves one key on one model, then `policy_keys` keys
/// (10 tenants, 10 users each, 50 roles, 20 models, keys narrowed to two roles) with every
/// request on another key and model. Authorization, tenancy and quota accounting per request
/// must not make the big policy slower: the ratio should stay at or above 0.95.
async fn policy(args: &Args, sim: &Sim, tmp: &Path) -> Result<()> {
    const MODELS: usize = 20;
    const ROLES: usize = 50;
    let mut config = format!("[pools.gpu]\nhosts = [\"{}\"]\n\n", sim.addr);
    for m in 0..MODELS {
        config += &format!(
            "[models.m{m}]\npool = \"gpu\"\nupstream_model = \"bench\"\nmax_tokens = 64\n"
        );
    }
    for r in 0..ROLES {
        config += &format!(
            "[roles.r{r}]\npermissions = [\"model:m{}\", \"model:m{}\", \"inference:local\"]\n",
            r % MODELS,
            (r + 7) % MODELS
        );
    }
    // Generous quotas, so every request is counted but none refused.
    config += "[quotas.tenant]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n\
               [quotas.key]\nrequests_per_minute = 100000000\nconcurrent_requests = 10000\n";
    let moat = Daemon::gateway("", &config, &[]);
    moat.wait_pools_ready().await;
    let cfg = moat::config::Config::load(&moat.dir().join("moat.toml"))?;
    let store = moat::store::sqlite::SqliteStore::open_in(&cfg.data_dir)?;
    let pepper = moat::auth::secrets::Pepper::load_or_create(&cfg.data_dir)?;
    let admin = moat::auth::admin::Admin {
        store: &store,
        pepper: &pepper,
        caller: None,
    };
    // (key, a model its roles allow)
    let mut keys: Vec<(String, usize)> = Vec::new();
    let per_user = args.policy_keys.div_ceil(100) as usize;
    'outer: for t in 0..10 {
        admin.add_tenant(&format!("t{t}"))?;
        for u in 0..10 {
            let name = format!("u{t}-{u}");
            let roles: Vec<String> = (0..5)
                .map(|i| format!("r{}", (t * 10 + u + i * 11) % ROLES))
                .collect();
            admin.add_user(&name, &format!("t{t}"), &roles, None)?;
            for k in 0..per_user {
                if keys.len() == args.policy_keys as usize {
                    break 'outer;
                }
                let narrowed = vec![roles[k % 5].clone(), roles[(k + 2) % 5].clone()];
                let r: usize = narrowed[0][1..].parse()?;
                let model = if k % 2 == 0 {
                    r % MODELS
                } else {
                    (r + 7) % MODELS
                };
                let created = admin.create_key(&name, "", Some(&narrowed), None)?;
                keys.push((created.plaintext.to_string(), model));
            }
        }
    }
    let url = moat.url("/v1/chat/completions");
    let single = policy_wrk(tmp, &url, &[(moat.key().to_owned(), 0)], args)?;
    let many = policy_wrk(tmp, &url, &keys, args)?;
    println!(
        "\npolicy: {ROLES} roles, {MODELS} models, {} keys in 10 tenants; json c=32, wrk -t2, {} s",
        keys.len(),
        args.duration
    );
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>10}",
        "case", "req/s", "p50 ms", "p99 ms", "non-2xx"
    );
    for (name, l) in [
        ("one key, one model", &single),
        ("every request another", &many),
    ] {
        println!(
            "{name:<22} {:>10.0} {:>9.2} {:>9.2} {:>10}",
            l.rps, l.p50_ms, l.p99_ms, l.errors
        );
    }
    println!("ratio {:.3} (goal: at least 0.95)", many.rps / single.rps);
    Ok(())
}

/// wrk over `keys`, each request with the next key and a model it may use.
fn policy_wrk(dir: &Path, url: &str, keys: &[(String, usize)], args: &Args) -> Result<Load> {
    let list: Vec<String> = keys
        .iter()
        .map(|(k, m)| {
            let body =
                chat_body(false).replace("\"model\":\"bench\"", &format!("\"model\":\"m{m}\""));
            format!("{{\"Bearer {k}\", [==[{body}]==]}}")
        })
        .collect();
    let script = format!(
        "local keys = {{{}}}\n\
         local i = 0\n\
         request = function()\n\
           i = i % #keys + 1\n\
           return wrk.format(\"POST\", nil, {{[\"Content-Type\"] = \"application/json\", \
             [\"Authorization\"] = keys[i][1]}}, keys[i][2])\n\
         end\n\
         done = function(summary, latency, requests)\n\
           io.write(string.format(\"NON2XX %d\\n\", summary.errors.status))\n\
         end\n",
        list.join(",\n")
    );
    let path = dir.join("policy.lua");
    std::fs::write(&path, script)?;
    run_wrk(&path, url, 32, args.duration)
}

/// The guardrails case: the same load through moat with guardrails off and on (shipped rules,
/// every secret class redacted), then the filter's costs measured in process: per stream
/// chunk, the rule scan of a 1 MB prompt, the output scan of 1 MB of answer.
///
/// Each daemon gets its warm-up before each measured cell, and each case is measured twice in
/// mirrored order (off, on, then on, off: a drift of the machine during the run weighs on
/// both alike); a figure is over both rounds. With `--moat-before`, the older binary's pair of
/// daemons is measured in the same rounds.
async fn guardrails(args: &Args, sim: &Sim, tmp: &Path) -> Result<()> {
    let base = format!(
        "[pools.gpu]\nhosts = [\"{}\"]\n\n[models.bench]\npool = \"gpu\"\nmax_tokens = 64\n",
        sim.addr
    );
    let on_config =
        format!("{base}[guardrails]\nenabled = true\n[guardrails.policy]\nsecrets = \"redact\"\n");
    let mut daemons = vec![
        ("off", Daemon::gateway("", &base, &[])),
        ("on", Daemon::gateway("", &on_config, &[])),
    ];
    if let Some(bin) = &args.moat_before {
        for (label, rest) in [("before off", &base), ("before on", &on_config)] {
            let rest = format!(
                "[roles.tester]\npermissions = [\"model:*\", \"inference:*\", \"logprobs\"]\n{rest}"
            );
            let mut d = Daemon::off("", &rest);
            d.create_tester_key();
            d.start_binary(bin);
            daemons.push((label, d));
        }
    }
    for (_, d) in &daemons {
        d.wait_pools_ready().await;
    }
    println!(
        "\nguardrails: the same moat, guardrails off and on (shipped rules {}, secrets redacted); \
         wrk -t2 c=32, {} s warm-up + {} s per cell, two rounds in mirrored order",
        moat::guardrails::rules::VERSION,
        args.warmup,
        args.duration
    );
    println!(
        "{:<24} {:<11} {:>5} {:>9} {:>8} {:>8} {:>11}",
        "case", "guardrails", "round", "req/s", "p50 ms", "p99 ms", "CPU µs/req"
    );
    let sim_pid = sim.proc.pid();
    for (name, body) in [
        ("json c=32 (1 KB prompt)", chat_body(false)),
        // The screen keeps its verdict per text (`guardrails::memo`): here no text repeats.
        (
            "json c=32 (new 1 KB)",
            chat_body(false).replacen("Please answer", &format!("{EACH_REQUEST} Please answer"), 1),
        ),
        ("stream c=32 (20 chunks)", chat_body(true)),
    ] {
        // Per daemon: requests, seconds, its CPU seconds, the simulator's CPU seconds.
        let mut sums = vec![(0u64, 0.0f64, 0.0f64, 0.0f64); daemons.len()];
        for round in 0..2 {
            let mut order: Vec<usize> = (0..daemons.len()).collect();
            if round == 1 {
                order.reverse();
            }
            for i in order {
                let (label, d) = &daemons[i];
                let url = d.url("/v1/chat/completions");
                if args.warmup > 0 {
                    wrk(tmp, &url, Some(d.key()), &body, 32, args.warmup)?;
                }
                let (cpu0, sim0) = (cpu_secs(d.pid()), sim_pid.map_or(0.0, cpu_secs));
                let l = wrk(tmp, &url, Some(d.key()), &body, 32, args.duration)?;
                let cpu = cpu_secs(d.pid()) - cpu0;
                let sim_cpu = sim_pid.map_or(0.0, cpu_secs) - sim0;
                let s = &mut sums[i];
                s.0 += l.requests;
                s.1 += args.duration as f64;
                s.2 += cpu;
                s.3 += sim_cpu;
                println!(
                    "{:<24} {:<11} {:>5} {:>9.0} {:>8.2} {:>8.2} {:>11.1}",
                    name,
                    label,
                    round + 1,
                    l.rps,
                    l.p50_ms,
                    l.p99_ms,
                    cpu * 1e6 / l.requests.max(1) as f64
                );
            }
        }
        for pair in sums.chunks(2).zip(daemons.chunks(2)) {
            let ([off, on], [(_, _), (label, _)]) = pair else {
                continue;
            };
            let rps = |s: &(u64, f64, f64, f64)| s.0 as f64 / s.1;
            let per = |secs: f64, s: &(u64, f64, f64, f64)| secs * 1e6 / s.0.max(1) as f64;
            println!(
                "{name}, {label}: on/off throughput {:.0} / {:.0} req/s = {:.3}; moat CPU per \
                 request {:.1} / {:.1} µs (+{:.1}); simulator {:.1} / {:.1} µs",
                rps(on),
                rps(off),
                rps(on) / rps(off),
                per(on.2, on),
                per(off.2, off),
                per(on.2, on) - per(off.2, off),
                per(on.3, on),
                per(off.3, off),
            );
        }
    }
    println!("goal: json ratio at least 0.9");
    let body = chat_body(true);
    let mut firsts = Vec::new();
    for (label, d) in &daemons {
        let url = d.url("/v1/chat/completions");
        let (first, total) = stream_timing(&url, Some(d.key()), &body, args.sequential).await;
        println!(
            "sequential stream, guardrails {label:<10}: first chunk {first:.3} ms, total {total:.3} ms"
        );
        firsts.push(first);
    }
    for (i, pair) in firsts.chunks(2).enumerate() {
        if let [off, on] = pair {
            println!(
                "hold-back window's added time to first token ({}): {:.3} ms (the answer, 20 \
                 short tokens, fits in the 256-byte window: its first text leaves with the last)",
                if i == 0 { "this build" } else { "before" },
                on - off
            );
        }
    }
    drop(daemons);
    filter_costs();
    Ok(())
}

/// In-process costs of the filter (no network): per stream chunk, per MB scanned.
fn filter_costs() {
    use moat::{
        config::GuardrailsConfig,
        guardrails::{EventScreen, Guard, Guardrails, Policy, output::TextFilter},
    };
    let g = Guardrails::build(&GuardrailsConfig {
        enabled: true,
        ..GuardrailsConfig::default()
    })
    .expect("default guardrails build");
    let policy = Policy::default();
    let guard = Guard {
        flagged: vec![],
        output: policy.output.clone(),
        canary: Some("moat-canary-0011223344556677".into()),
        hold_back: 256,
        generation: true,
        tenant: "bench".into(),
        user_id: "bench".into(),
    };
    // 2000 chunks of a few words each, as a model streams them.
    let words = "the quick brown fox jumps over the lazy dog and then ";
    let events: Vec<String> = (0..2000)
        .map(|i| {
            let w = &words[(i * 4) % 40..(i * 4) % 40 + 5];
            format!(
                "data: {}\n\n",
                json!({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": w}, "logprobs": null,
                    "finish_reason": null}]})
            )
        })
        .collect();
    // Each figure over several rounds (the machine may be shared): the median, and the best.
    let rounds = |n: usize, mut f: Box<dyn FnMut() -> f64 + '_>| {
        let mut v: Vec<f64> = (0..n).map(|_| f()).collect();
        v.sort_by(f64::total_cmp);
        (v[n / 2], v[0])
    };
    let mut out = 0;
    let (per_chunk, best) = rounds(
        7,
        Box::new(|| {
            let mut screen = EventScreen::new(guard.clone());
            let start = Instant::now();
            out = 0;
            for e in &events {
                out += screen.feed(e.as_bytes()).len();
            }
            start.elapsed().as_secs_f64() * 1e6 / events.len() as f64
        }),
    );
    println!(
        "output filter per stream chunk (parse, scan, re-emit): {per_chunk:.2} µs, best {best:.2} \
         (median of 7 rounds of {} chunks; goal < 5 µs; {out} B out)",
        events.len()
    );

    let mb = {
        let base = "Please summarise the following support ticket and suggest next steps. \
                    The customer reports that the export fails with error 500 since Monday. ";
        base.repeat((1 << 20) / base.len() + 1)[..1 << 20].to_owned()
    };
    let mut hits = 0;
    let (secs, best) = rounds(
        5,
        Box::new(|| {
            let start = Instant::now();
            hits = g.rules_hit(&mb).len();
            start.elapsed().as_secs_f64()
        }),
    );
    println!(
        "input scan of a 1 MB prompt (normalise + rules): {:.1} MB/s, best {:.1} (median of 5; \
         {hits} rules hit)",
        1.0 / secs,
        1.0 / best
    );
    // The two messages of the ~1 KB chat body of the load cells.
    let prompt = [
        "Please answer carefully and concisely. ".repeat(22),
        "What is the capital of France?".to_owned(),
    ];
    let n = 2000;
    let start = Instant::now();
    for _ in 0..n {
        for t in &prompt {
            std::hint::black_box(g.rules_hit(t));
        }
    }
    println!(
        "input scan of the ~1 KB prompt's two messages: {:.2} µs",
        start.elapsed().as_secs_f64() * 1e6 / n as f64
    );
    let mut redacted = 0;
    let (secs, best) = rounds(
        5,
        Box::new(|| {
            let start = Instant::now();
            let step = TextFilter::new(256).push(&mb, true, &policy.output, None);
            redacted = step.redacted.len();
            start.elapsed().as_secs_f64()
        }),
    );
    println!(
        "output scan of a 1 MB answer (every secret class): {:.1} MB/s, best {:.1} (median of 5; \
         {redacted} redacted)",
        1.0 / secs,
        1.0 / best
    );
}

/// `--store postgres --quotas redis`: moat with the embedded default (SQLite, quotas in memory)
/// and moat on the shared backends, in front of one static nginx upstream in one run, each
/// warmed up (its credential and policy caches filled) before it is measured; then the time a
/// revocation through replica A takes to be refused by replica B, over `--revocations` keys.
fn shared_store(args: &Args) -> Result<()> {
    use moat_tests::servers::{Pg, Redis};

    let tmp = tempfile::tempdir()?;
    let port = free_port();
    let text = json_answer("m");
    let upstream = nginx(
        tmp.path(),
        "upstream",
        &format!(
            "    server {{ listen 127.0.0.1:{port} reuseport; access_log off;\n        \
             location / {{ default_type application/json; return 200 {}; }} }}\n",
            nginx_text(&text)
        ),
        &[port],
    )?;
    let pg = (args.store == "postgres").then(Pg::start);
    let redis = (args.quotas == "redis").then(Redis::start);
    // Every request is counted (generous quotas, none refused) on both.
    let common = |quotas: &str| {
        format!(
            "[pools.local]\nhosts = [\"127.0.0.1:{port}\"]\n[models.m]\npool = \"local\"\n\
             [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [quotas]\n{quotas}\n\
             [quotas.tenant]\nrequests_per_minute = 100000000\ntokens_per_minute = 100000000000\n\
             [quotas.key]\nrequests_per_minute = 100000000\nconcurrent_requests = 10000\n"
        )
    };
    let mut embedded = Daemon::off("", &common(""));
    embedded.create_tester_key();
    embedded.start();
    let shared_quotas = match &redis {
        Some(r) => format!("backend = \"redis\"\nredis_url = \"{}\"", r.url()),
        None => String::new(),
    };
    let db_url = pg.as_ref().map(|pg| pg.create_database());
    let store = match (&pg, &db_url) {
        (Some(pg), Some(url)) => pg.store_toml(url, "pgpass"),
        _ => String::new(),
    };
    // Calls the backends served, to see what a request costs them: the quota script calls
    // (Redis `INFO commandstats`) and the transactions on moat's database (PostgreSQL's
    // statistics, flushed by each connection at most once a second, so a run's last second may
    // be missed).
    let redis_calls = || -> f64 {
        let Some(r) = &redis else { return 0.0 };
        let out = Command::new("redis-cli")
            .args(["-p", &r.port.to_string(), "INFO", "commandstats"])
            .output();
        out.ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout).lines().find_map(|l| {
                    l.strip_prefix("cmdstat_evalsha:calls=")
                        .and_then(|v| v.split(',').next()?.parse().ok())
                })
            })
            .unwrap_or(0.0)
    };
    let pg_xacts = || -> f64 {
        let (Some(pg), Some(url)) = (&pg, &db_url) else {
            return 0.0;
        };
        let db = url.rsplit('/').next().unwrap_or_default();
        pg.psql(
            "postgres",
            &format!(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '{db}'"
            ),
        )
        .trim()
        .parse()
        .unwrap_or(0.0)
    };
    let replica = || {
        let d = Daemon::off("", &format!("{}\n{store}", common(&shared_quotas)));
        if let Some(pg) = &pg {
            d.write_file("pgpass", pg.password());
        }
        d
    };
    let mut a = replica();
    let mut b = replica();
    let key = a.create_tester_key();
    // B reads A's pepper from its own file.
    b.cli_ok(&["tenants", "list"], None);
    std::fs::copy(
        a.data_dir().join("secrets/pepper"),
        b.data_dir().join("secrets/pepper"),
    )?;
    // `--moat-before`: a third replica on the same store and Redis, run by the older binary.
    let before = match &args.moat_before {
        Some(bin) => {
            let mut c = replica();
            c.cli_ok(&["tenants", "list"], None);
            std::fs::copy(
                a.data_dir().join("secrets/pepper"),
                c.data_dir().join("secrets/pepper"),
            )?;
            c.start_binary(bin);
            Some(c)
        }
        None => None,
    };
    a.start();
    b.start();
    let embedded_key = embedded.key().to_owned();

    println!(
        "shared-store benchmark: wrk -t2 keep-alive, {} s warm-up + {} s per cell; upstream \
         nginx `return 200`; embedded = SQLite + quotas in memory, shared = store {} + quotas {} \
         (replica A measured)",
        args.warmup, args.duration, args.store, args.quotas
    );
    let loadavg = || {
        std::fs::read_to_string("/proc/loadavg")
            .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default()
    };
    println!("load average at start: {}", loadavg());
    println!(
        "CPU columns: CPU time per request of the measured moat (supervisor and worker), and of \
         the PostgreSQL and Redis servers over the same run"
    );
    println!(
        "Redis and PostgreSQL columns: script calls (EVALSHA) and database transactions per \
         1,000 requests"
    );
    println!(
        "\n{:<10} {:<9} {:>9} {:>8} {:>8} {:>7} {:>10} {:>8} {:>11} {:>11} {:>9} {:>9}",
        "case",
        "target",
        "req/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "p99 added",
        "non-2xx",
        "moat µs/req",
        "pg+redis µs",
        "redis/1k",
        "pg tx/1k"
    );
    let body = chat_body_for("m", false);
    let path = "/v1/chat/completions";
    let backends: Vec<u32> = pg
        .iter()
        .filter_map(|p| p.pid())
        .chain(redis.iter().filter_map(|r| r.pid()))
        .collect();
    for conc in &args.concurrency {
        let mut base: Option<Load> = None;
        let mut targets = vec![
            (
                "embedded",
                embedded.url(path),
                embedded_key.as_str(),
                embedded.pid(),
                &[][..],
            ),
            ("shared", a.url(path), key.as_str(), a.pid(), &backends[..]),
        ];
        if let Some(c) = &before {
            targets.push(("before", c.url(path), key.as_str(), c.pid(), &backends[..]));
        }
        for (name, url, bearer, pid, others) in targets {
            // The warm-up also fills the credential cache: the measured run is warm.
            wrk(
                tmp.path(),
                &url,
                Some(bearer),
                &body,
                *conc,
                args.warmup.max(1),
            )?;
            let others_cpu = || others.iter().map(|p| cpu_secs(*p)).sum::<f64>();
            let (cpu0, others0) = (cpu_secs(pid), others_cpu());
            let (calls0, xacts0) = (redis_calls(), pg_xacts());
            let l = wrk(tmp.path(), &url, Some(bearer), &body, *conc, args.duration)?;
            let (calls, xacts) = (redis_calls() - calls0, pg_xacts() - xacts0);
            let per_1k = |n: f64| {
                if others.is_empty() {
                    0.0
                } else {
                    n * 1000.0 / (l.requests.max(1) as f64)
                }
            };
            let per_req = |secs: f64| secs * 1e6 / (l.requests.max(1) as f64);
            let (cpu, others_cpu) = (
                per_req(cpu_secs(pid) - cpu0),
                per_req(others_cpu() - others0),
            );
            let (ratio, added) = match &base {
                None => (1.0, 0.0),
                Some(b) => (l.rps / b.rps, l.p99_ms - b.p99_ms),
            };
            println!(
                "{:<10} {:<9} {:>9.0} {:>8.2} {:>8.2} {:>6.2}x {:>10.2} {:>8} {:>11.1} {:>11.1} \
                 {:>9.1} {:>9.1}",
                format!("json c={conc}"),
                name,
                l.rps,
                l.p50_ms,
                l.p99_ms,
                ratio,
                added,
                l.errors,
                cpu,
                others_cpu,
                per_1k(calls),
                per_1k(xacts)
            );
            base.get_or_insert(l);
        }
    }
    drop(embedded);
    println!("load average after the load: {}", loadavg());

    if pg.is_some() && args.revocations > 0 {
        let status = |d: &Daemon, key: &str| -> Result<u16> {
            let mut s = TcpStream::connect(d.addr())?;
            write!(
                s,
                "GET /v1/models HTTP/1.1\r\nHost: moat\r\nAuthorization: Bearer {key}\r\n\
                 Connection: close\r\n\r\n"
            )?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head)?;
            Ok(std::str::from_utf8(&head[9..12])?.parse()?)
        };
        let mut times = Vec::new();
        for _ in 0..args.revocations {
            let out = a.cli_ok(&["keys", "create", "--user", "tester", "--json"], None);
            let v: serde_json::Value = serde_json::from_str(out.trim())?;
            let (k, id) = (v["key"].as_str().unwrap(), v["key_id"].as_str().unwrap());
            // B has verified and cached the key.
            if status(&b, k)? != 200 {
                bail!("replica B refused a fresh key");
            }
            a.cli_ok(&["keys", "revoke", id], None);
            // Timed from the CLI's exit (the revocation committed) to B's first refusal.
            let t = Instant::now();
            loop {
                match status(&b, k)? {
                    401 => break,
                    200 => {}
                    other => bail!("replica B answered {other} during a revocation"),
                }
                if t.elapsed() > Duration::from_secs(10) {
                    bail!("replica B never refused a revoked key");
                }
            }
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        println!(
            "\nrevocation A -> B, {} keys: median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms, \
             {} over 100 ms (goal: max under 100 ms); load average {}",
            times.len(),
            times[times.len() / 2],
            at(0.9),
            at(0.99),
            times[times.len() - 1],
            times.iter().filter(|t| **t > 100.0).count(),
            loadavg()
        );
    }
    drop((a, b, before, upstream));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fixed answers are valid JSON, with `model` ahead of `choices` as upstreams send it.
    #[test]
    fn fixed_answers_are_json_in_the_upstreams_key_order() {
        let check = |text: &str| {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert!(v["choices"].is_array(), "{text}");
            assert!(text.find("\"model\"").unwrap() < text.find("\"choices\"").unwrap());
            v
        };
        let answer = json_answer("m");
        assert!(answer.len() >= 600);
        assert_eq!(check(&answer)["model"], "m");
        let stream = sse_answer("s");
        let events: Vec<&str> = stream
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap())
            .collect();
        assert_eq!(events.len(), 24);
        assert_eq!(events[23], "[DONE]");
        for e in &events[..23] {
            assert_eq!(check(e)["model"], "s");
        }
        assert_eq!(check(events[22])["usage"]["completion_tokens"], 20);
    }
}
