//! `cargo xtask bench gateway`: what moat costs in front of an inference server, next to the
//! reference every proxy is measured against.
//!
//! One run, one machine, the same load (wrk, fixed concurrency, a ~1 KB chat body) sent to:
//! - `direct`: the upstream itself (`moat-sim`, answering at once);
//! - `nginx`: nginx as a plain reverse proxy with a bearer check (keep-alive upstream pool,
//!   buffering off, access log on as by default);
//! - `moat`: moat with authentication on (an API key made with the CLI), access log on.
//!
//! Printed per case: requests/s, p50, p99, and the ratios to direct. Then a streaming case
//! (20-chunk SSE answers): throughput under load, and sequential time to first chunk and
//! per-chunk overhead measured with our own client. Then the policy case, and the guardrails
//! case: moat with guardrails off and on under the same load, the hold-back window's added time
//! to first token, and in process the filter's cost per stream chunk and its MB/s on 1 MB.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::BodyExt;
use moat_tests::{Daemon, Sim, send};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per load run.
    #[arg(long, default_value_t = 8)]
    duration: u64,
    /// Concurrency levels for the JSON case.
    #[arg(long, default_value = "32,64", value_delimiter = ',')]
    concurrency: Vec<u32>,
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
}

struct Nginx {
    child: Child,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nginx(dir: &Path, upstream: std::net::SocketAddr, key: &str) -> Result<Nginx> {
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        r#"daemon off;
worker_processes auto;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log {d}/nginx-access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream inference {{ server {upstream}; keepalive 128; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            if ($http_authorization != "Bearer {key}") {{ return 401; }}
            proxy_pass http://inference;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_buffering off;
        }}
    }}
}}
"#
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .context("nginx not found (cargo xtask setup installs nginx-light)")?;
    let child = Command::new(nginx)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&path)
        .arg("-e")
        .arg(dir.join("nginx-error.log"))
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start nginx")?;
    let n = Nginx { child, port };
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(n);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nginx did not start on port {port}")
}

struct Load {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
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
    let script = format!(
        "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\n{auth}\
         wrk.body = [==[{body}]==]\n\
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
    Ok(Load {
        rps: field("Requests/sec:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0),
        p50_ms: field("50%").map_or(f64::NAN, |v| ms(&v)),
        p99_ms: field("99%").map_or(f64::NAN, |v| ms(&v)),
        errors,
    })
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

fn chat_body(stream: bool) -> String {
    // About 1 KB, like a short system prompt and a question.
    let filler = "Please answer carefully and concisely. ".repeat(22);
    json!({
        "model": "bench",
        "messages": [
            {"role": "system", "content": filler},
            {"role": "user", "content": "What is the capital of France?"},
        ],
        "max_tokens": 64,
        "stream": stream,
    })
    .to_string()
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.filter_costs_only {
        filter_costs();
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let sim = Sim::start(&["--chunks", "20", "--model", "bench"]);
    if args.guardrails_only {
        let tmp = tempfile::tempdir()?;
        return guardrails(&args, &sim, tmp.path()).await;
    }
    let config = format!(
        "[pools.gpu]\nhosts = [\"{}\"]\n\n[models.bench]\npool = \"gpu\"\nmax_tokens = 64\n",
        sim.addr
    );
    let moat = Daemon::gateway("", &config, &[]);
    moat.wait_pools_ready().await;
    let tmp = tempfile::tempdir()?;
    let nginx = nginx(tmp.path(), sim.addr, moat.key())?;

    let direct = sim.url("/v1/chat/completions");
    let via_nginx = format!("http://127.0.0.1:{}/v1/chat/completions", nginx.port);
    let via_moat = moat.url("/v1/chat/completions");
    let key = moat.key().to_owned();
    let targets: [(&str, &str, Option<&str>); 3] = [
        ("direct", &direct, None),
        ("nginx", &via_nginx, Some(&key)),
        ("moat", &via_moat, Some(&key)),
    ];

    println!(
        "gateway benchmark: wrk -t2, {} s per run, ~{} B chat body, upstream moat-sim (20 tokens)",
        args.duration,
        chat_body(false).len()
    );
    let mut cases: Vec<(String, String)> = args
        .concurrency
        .iter()
        .map(|c| (format!("json c={c}"), chat_body(false)))
        .collect();
    cases.push(("stream c=32 (20 chunks)".into(), chat_body(true)));
    println!(
        "\n{:<24} {:<7} {:>10} {:>9} {:>9} {:>8} {:>10} {:>10}",
        "case", "target", "req/s", "p50 ms", "p99 ms", "ratio", "p50 added", "non-2xx"
    );
    for (i, (name, body)) in cases.iter().enumerate() {
        let conc = args.concurrency.get(i).copied().unwrap_or(32);
        let mut base: Option<Load> = None;
        for (target, url, bearer) in &targets {
            let l = wrk(tmp.path(), url, *bearer, body, conc, args.duration)?;
            let (ratio, added) = match &base {
                None => (1.0, 0.0),
                Some(b) => (l.rps / b.rps, l.p50_ms - b.p50_ms),
            };
            println!(
                "{:<24} {:<7} {:>10.0} {:>9.2} {:>9.2} {:>7.2}x {:>10.2} {:>10}",
                name, target, l.rps, l.p50_ms, l.p99_ms, ratio, added, l.errors
            );
            if base.is_none() {
                base = Some(l);
            }
        }
    }

    println!(
        "\nstreaming, {} sequential requests (20 chunks each): mean ms",
        args.sequential
    );
    println!(
        "{:<7} {:>14} {:>10} {:>18}",
        "target", "first chunk", "total", "added per chunk"
    );
    let body = chat_body(true);
    let mut base_total = None;
    for (target, url, bearer) in &targets {
        let (first, total) = stream_timing(url, *bearer, &body, args.sequential).await;
        let added = base_total.map_or(0.0, |b: f64| (total - b) / 20.0);
        println!("{target:<7} {first:>14.3} {total:>10.3} {added:>18.4}");
        base_total.get_or_insert(total);
    }
    println!(
        "\nreference (issue 4): nginx keeps ~0.66x of direct for JSON and ~0.55x for 20-chunk \
         streams on a 2-core machine; the goal is moat at or above nginx's ratio, with p50 \
         added no more than nginx adds."
    );
    drop(nginx);
    drop(moat);
    if args.policy_keys > 0 {
        policy(&args, &sim, tmp.path()).await?;
    }
    if !args.no_guardrails {
        guardrails(&args, &sim, tmp.path()).await?;
    }
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
async fn guardrails(args: &Args, sim: &Sim, tmp: &Path) -> Result<()> {
    let base = format!(
        "[pools.gpu]\nhosts = [\"{}\"]\n\n[models.bench]\npool = \"gpu\"\nmax_tokens = 64\n",
        sim.addr
    );
    let off = Daemon::gateway("", &base, &[]);
    let on = Daemon::gateway(
        "",
        &format!("{base}[guardrails]\nenabled = true\n[guardrails.policy]\nsecrets = \"redact\"\n"),
        &[],
    );
    off.wait_pools_ready().await;
    on.wait_pools_ready().await;
    println!(
        "\nguardrails: the same moat, guardrails off and on (shipped rules {}, secrets redacted)",
        moat::guardrails::rules::VERSION
    );
    println!(
        "{:<24} {:<14} {:>10} {:>9} {:>9} {:>8}",
        "case", "guardrails", "req/s", "p50 ms", "p99 ms", "ratio"
    );
    for (name, body) in [
        ("json c=32 (1 KB prompt)", chat_body(false)),
        ("stream c=32 (20 chunks)", chat_body(true)),
    ] {
        let mut first: Option<Load> = None;
        for (label, d) in [("off", &off), ("on", &on)] {
            let url = d.url("/v1/chat/completions");
            let l = wrk(tmp, &url, Some(d.key()), &body, 32, args.duration)?;
            let ratio = first.as_ref().map_or(1.0, |b| l.rps / b.rps);
            println!(
                "{:<24} {:<14} {:>10.0} {:>9.2} {:>9.2} {:>7.2}x",
                name, label, l.rps, l.p50_ms, l.p99_ms, ratio
            );
            first.get_or_insert(l);
        }
    }
    println!("goal: json ratio at least 0.9");
    let body = chat_body(true);
    let mut firsts = Vec::new();
    for (label, d) in [("off", &off), ("on", &on)] {
        let url = d.url("/v1/chat/completions");
        let (first, total) = stream_timing(&url, Some(d.key()), &body, args.sequential).await;
        println!(
            "sequential stream, guardrails {label:<3}: first chunk {first:.3} ms, total {total:.3} ms"
        );
        firsts.push(first);
    }
    println!(
        "hold-back window's added time to first token: {:.3} ms (the answer, 20 short tokens, \
         fits in the 256-byte window: its first text leaves with the last)",
        firsts[1] - firsts[0]
    );
    drop((off, on));
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
    let mut screen = EventScreen::new(guard);
    let start = Instant::now();
    let mut out = 0;
    for e in &events {
        out += screen.feed(e.as_bytes()).len();
    }
    let per_chunk = start.elapsed().as_secs_f64() * 1e6 / events.len() as f64;
    println!(
        "output filter per stream chunk (parse, scan, re-emit): {per_chunk:.2} µs (goal < 5 µs; {out} B out)"
    );

    let mb = {
        let base = "Please summarise the following support ticket and suggest next steps. \
                    The customer reports that the export fails with error 500 since Monday. ";
        base.repeat((1 << 20) / base.len() + 1)[..1 << 20].to_owned()
    };
    let start = Instant::now();
    let hits = g.rules_hit(&mb);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "input scan of a 1 MB prompt (normalise + rules): {:.1} MB/s ({} rules hit)",
        1.0 / secs,
        hits.len()
    );
    let start = Instant::now();
    let step = TextFilter::new(256).push(&mb, true, &policy.output, None);
    let secs = start.elapsed().as_secs_f64();
    println!(
        "output scan of a 1 MB answer (every secret class): {:.1} MB/s ({} redacted)",
        1.0 / secs,
        step.redacted.len()
    );
}
