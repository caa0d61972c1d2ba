//! `cargo xtask bench auth`: what authentication costs on the data plane, and whether a flood
//! of password logins starves it.
//!
//! One release `moat` (segmentation off), loaded with `wrk` over keep-alive connections; every
//! case is measured in every round, interleaved, and the medians are compared:
//! - **no auth**: `GET /healthz`, the same router and server without the bearer check (moat has
//!   no anonymous mode, so no `/v1` route can be served without one);
//! - **API key**: `GET /v1/models` with an API key (the cached path: checksum, cache hit,
//!   HMAC-SHA256 and a constant-time compare per request);
//! - **access token**: `GET /v1/models` with an EdDSA access token (signature check per
//!   request, session from the cache);
//! - **API key under a password flood**: the API-key case again while other clients hammer
//!   `POST /v1/auth/token` with `grant_type=password` (argon2id on the bounded hashing pool).
//!   The goal: the `/v1` p99 stays in the same range as without the flood.

use std::{
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::median;
use crate::{daemon::Daemon, http::Client};

const PASSWORD: &str = "benchmark password 1";

/// One wrk measurement.
#[derive(Debug, Clone, Copy)]
struct Sample {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

pub fn run(secs: u32, rounds: u32, connections: u32, flooders: u32) -> Result<()> {
    if Command::new("wrk").arg("--version").output().is_err() {
        bail!("wrk is not installed (`cargo xtask setup` installs it)");
    }
    // The benchmark runs the `moat` next to itself (`target/release`): `crate::bin`.
    let mut moat = Daemon::no_upstream("[auth]\naccess_token_ttl_secs = 900\n");
    moat.start();
    moat.cli_ok(&["tenants", "add", "bench"], None);
    moat.cli_ok(
        &[
            "users",
            "add",
            "bench",
            "--tenant",
            "bench",
            "--role",
            "user",
            "--password",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    let key = moat
        .cli_ok(&["keys", "create", "--user", "bench"], None)
        .trim()
        .to_owned();
    let v: Value = moat
        .post("/v1/auth/token")
        .json(&json!({"grant_type": "api_key", "api_key": key}))
        .send()?
        .json()?;
    let token = v["access_token"]
        .as_str()
        .context("no access token")?
        .to_owned();

    let health = moat.url("/healthz");
    let models = moat.url("/v1/models");
    let mut samples: [Vec<Sample>; 4] = Default::default();
    let mut grants_per_sec = Vec::new();
    for round in 0..rounds {
        samples[0].push(wrk(&health, None, secs, connections)?);
        samples[1].push(wrk(&models, Some(&key), secs, connections)?);
        samples[2].push(wrk(&models, Some(&token), secs, connections)?);
        let (s, grants) = with_flood(&moat.url("/v1/auth/token"), flooders, secs, || {
            wrk(&models, Some(&key), secs, connections)
        })?;
        samples[3].push(s);
        grants_per_sec.push(grants);
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let m = |i: usize| Sample {
        rps: median(samples[i].iter().map(|s| s.rps).collect()),
        p50_ms: median(samples[i].iter().map(|s| s.p50_ms).collect()),
        p99_ms: median(samples[i].iter().map(|s| s.p99_ms).collect()),
    };
    let (none, key_s, tok, flood) = (m(0), m(1), m(2), m(3));
    println!(
        "auth benchmark: wrk, {connections} connections, {secs} s per case, median of {rounds} interleaved rounds"
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9}",
        "case", "req/s", "p50 ms", "p99 ms", "vs none"
    );
    for (name, s) in [
        ("no auth (GET /healthz)", none),
        ("API key (GET /v1/models)", key_s),
        ("access token (GET /v1/models)", tok),
        ("API key, password flood", flood),
    ] {
        println!(
            "{name:<34} {:>10.0} {:>9.2} {:>9.2} {:>8.2}x",
            s.rps,
            s.p50_ms,
            s.p99_ms,
            s.rps / none.rps
        );
    }
    println!(
        "password flood: {flooders} clients, {:.1} successful grants/s; /v1 p99 {:.2} ms with the flood vs {:.2} ms without ({:.2}x)",
        median(grants_per_sec),
        flood.p99_ms,
        key_s.p99_ms,
        flood.p99_ms / key_s.p99_ms
    );
    Ok(())
}

/// Runs `measure` while `flooders` threads send correct-password grants; returns its result
/// and the grants per second achieved.
fn with_flood(
    url: &str,
    flooders: u32,
    secs: u32,
    measure: impl FnOnce() -> Result<Sample>,
) -> Result<(Sample, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..flooders)
        .map(|_| {
            let (stop, ok, url) = (stop.clone(), ok.clone(), url.to_owned());
            std::thread::spawn(move || {
                let c = Client::new();
                let body =
                    json!({"grant_type": "password", "username": "bench", "password": PASSWORD});
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(r) = c.post(&url).json(&body).send()
                        && r.status().is_success()
                    {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    // Let the flood reach steady state before measuring.
    std::thread::sleep(Duration::from_millis(500));
    let before = ok.load(Ordering::Relaxed);
    let result = measure();
    let grants = (ok.load(Ordering::Relaxed) - before) as f64 / f64::from(secs);
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok((result?, grants))
}

fn wrk(url: &str, bearer: Option<&str>, secs: u32, connections: u32) -> Result<Sample> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "--latency"])
        .arg(format!("-c{connections}"))
        .arg(format!("-d{secs}s"));
    if let Some(b) = bearer {
        cmd.arg("-H").arg(format!("Authorization: Bearer {b}"));
    }
    let out = cmd.arg(url).output().context("run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}");
    }
    parse_wrk(&text).with_context(|| format!("cannot read wrk's output:\n{text}"))
}

fn parse_wrk(text: &str) -> Option<Sample> {
    if text.contains("Non-2xx or 3xx responses") {
        return None;
    }
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))?
        .trim()
        .parse()
        .ok()?;
    let pct = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .and_then(duration_ms)
    };
    Some(Sample {
        rps,
        p50_ms: pct("50%")?,
        p99_ms: pct("99%")?,
    })
}

/// wrk durations: `635.00us`, `2.34ms`, `1.02s`.
fn duration_ms(s: &str) -> Option<f64> {
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let out = "  Latency Distribution\n     50%  635.00us\n     75%    1.00ms\n     90%    1.50ms\n     99%    2.34ms\n  1000 requests in 1.00s\nRequests/sec:   12345.67\nTransfer/sec:      1.00MB\n";
        let s = parse_wrk(out).unwrap();
        assert_eq!(s.rps, 12345.67);
        assert!((s.p50_ms - 0.635).abs() < 1e-9);
        assert!((s.p99_ms - 2.34).abs() < 1e-9);
        assert!(parse_wrk(&format!("{out}  Non-2xx or 3xx responses: 5\n")).is_none());
        assert_eq!(duration_ms("1.50s"), Some(1500.0));
    }
}
