//! `cargo xtask bench segment`, inference-host case: what the ingress guard costs allowed
//! traffic to the model port, and how much rogue traffic it stops.
//!
//! A three-namespace lab (gateway, inference host, rogue host, veth pairs). Cases, interleaved
//! in every round and measured in one run:
//! - **no guard**, **cgroup_skb guard**, **tc guard** (tcx on both veth ends), and a
//!   **cgroup_skb guard on another port** (the attachment's own cost): a bulk TCP stream from
//!   the gateway to a sink on the model port (MB/s), ratio to no guard taken within each round;
//! - **rogue flood**: UDP datagrams from the rogue host to the model port under each guard:
//!   how many were sent, how many reached the model port's socket, how many the guard counted
//!   as dropped.
//!
//! Wall-clock rates on a shared 2-core machine are noisy: the median of the rounds is reported,
//! with the load average next to it. (Request/response round trips were tried and dropped: with
//! two threads handing off on a loaded 2-core machine they measure the scheduler, swinging
//! ±70 % between identical cases.) The guard's own cost is measured exactly as well: with the
//! kernel's BPF run-time statistics enabled for the run (`BPF_ENABLE_STATS`, off again when the
//! bench ends), the average nanoseconds per run of each guard program while the allowed traffic
//! flows.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use moat::{config::Config, segment::inference::Guard};
use moat_common::guard::IngressHook;

use super::median;
use crate::{
    kernel::{TestPins, require_root},
    netns::{Lab, PortReservation, sa},
};

const STREAM_BYTES: usize = 256 << 20;
const FLOOD: u64 = 50_000;
/// No guard; cgroup_skb guard; tc guard; cgroup_skb guarding another port (the attachment's
/// own cost, with the model port's traffic on the cheap not-guarded path).
const CASES: usize = 4;

pub fn run(rounds: u32) -> Result<()> {
    require_root();
    let model = PortReservation::new();
    let port = model.port;
    let lab = Lab::new();
    let received = start_servers(&lab, port)?;
    let pins = TestPins::new();
    let guard_toml = |attach: &str, interfaces: &str| {
        format!(
            "[segmentation.inference]\nmodel_ports = [{port}]\n\
             allowed_gateways = [\"{}/32\"]\nattach = \"{attach}\"\n{interfaces}",
            Lab::GW4
        )
    };
    let cgroup = guard_toml("cgroup_skb", "");
    let tc = guard_toml(
        "tc",
        &format!(
            "interfaces = [\"{}\", \"{}\"]\n",
            Lab::IF_FROM_GW,
            Lab::IF_FROM_ROGUE
        ),
    );
    let load = |t: &str| {
        Config::from_str(std::path::Path::new("/bench/moat.toml"), t)
            .map(|c| c.inference.expect("guard"))
            .context("bench config")
    };
    let (cgroup, tc) = (load(&cgroup)?, load(&tc)?);
    let mut cgroup_elsewhere = cgroup.clone();
    cgroup_elsewhere.model_ports = vec![port.wrapping_add(1).max(1)];
    let to = sa(Lab::INF_GW4, port);
    let rogue_to = sa(Lab::INF_ROGUE4, port);

    // [none, cgroup_skb, tc]
    let mut stream: [Vec<f64>; CASES] = Default::default();
    let mut flood_sent = [0u64; CASES];
    let mut flood_arrived = [0u64; CASES];
    let mut flood_dropped = [0u64; CASES];
    // (run time, runs) of the guard program during the allowed-traffic measurements.
    let mut prog_cost = [(Duration::ZERO, 0u64); CASES];
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;
    for round in 0..rounds {
        for case in 0..CASES {
            moat::segment::uninstall(&pins.pins)?;
            let guard = match case {
                0 => None,
                1 => Some(Guard::install_or_adopt(&pins.pins, &cgroup)?),
                3 => Some(Guard::install_or_adopt(&pins.pins, &cgroup_elsewhere)?),
                _ => Some(
                    lab.inference
                        .run(|| Guard::install_or_adopt(&pins.pins, &tc))?,
                ),
            };
            let before = program_stats(&guard, case)?;
            stream[case].push(lab.gateway.run(|| stream_mb_per_s(to))?);
            let after = program_stats(&guard, case)?;
            prog_cost[case].0 += after.0.saturating_sub(before.0);
            prog_cost[case].1 += after.1.saturating_sub(before.1);
            let before = received.load(Ordering::Relaxed);
            let dropped_before = dropped(&guard)?;
            flood_sent[case] += lab.rogue.run(|| flood(rogue_to))?;
            // Let the last datagrams land before counting.
            std::thread::sleep(Duration::from_millis(50));
            flood_arrived[case] += received.load(Ordering::Relaxed) - before;
            flood_dropped[case] += dropped(&guard)? - dropped_before;
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    moat::segment::uninstall(&pins.pins)?;

    // Ratios are taken within each round (the cases of one round run back to back, under the
    // same background load), then the median over rounds.
    let ratio = |xs: &[Vec<f64>; CASES], case: usize| {
        median(xs[case].iter().zip(&xs[0]).map(|(a, b)| a / b).collect())
    };
    let stream_ratio: Vec<f64> = (0..CASES).map(|c| ratio(&stream, c)).collect();
    let stream = stream.map(median);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "segment, inference host: allowed gateway → model port over veth (median of {rounds} rounds; load average {})",
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let names = [
        "no guard",
        "cgroup_skb guard",
        "tc guard",
        "cgroup_skb, other port",
    ];
    for case in 0..CASES {
        println!(
            "  {:<22} stream {:>6.0} MB/s   ratio to no guard {:.3}",
            names[case], stream[case], stream_ratio[case]
        );
    }
    for (case, name) in [(1, "cgroup_skb"), (2, "tc"), (3, "cgroup_skb (other port)")] {
        let (time, runs) = prog_cost[case];
        println!(
            "  {name} guard program: {:.0} ns per run on average ({runs} runs during the allowed traffic)",
            time.as_nanos() as f64 / runs.max(1) as f64
        );
    }
    println!("  rogue UDP flood to the model port ({FLOOD} datagrams per round):");
    for case in 0..CASES {
        let sent = flood_sent[case];
        let arrived = flood_arrived[case];
        println!(
            "  {:<22} sent {:>7}  reached the socket {:>7}  dropped by the guard {:>7}  drop rate {:.4}",
            names[case],
            sent,
            arrived,
            flood_dropped[case],
            1.0 - arrived as f64 / sent.max(1) as f64
        );
    }
    Ok(())
}

/// A sink (reads to EOF, answers one byte) and a 1 KiB echo on TCP, and a counting UDP socket,
/// all on the model port inside the inference namespace. Returns the UDP arrival counter.
fn start_servers(lab: &Lab, port: u16) -> Result<Arc<AtomicU64>> {
    let (tcp, udp) = lab.inference.run(|| -> Result<_> {
        Ok((
            TcpListener::bind(("::", port))?,
            UdpSocket::bind(("::", port))?,
        ))
    })?;
    std::thread::spawn(move || {
        for conn in tcp.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while udp.recv_from(&mut buf).is_ok() {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(received)
}

/// A sink: after the first byte (`s`), reads to EOF, then answers one byte.
fn serve(mut conn: TcpStream) {
    let mut kind = [0u8; 1];
    if conn.read_exact(&mut kind).is_err() {
        return;
    }
    let mut buf = vec![0u8; 64 << 10];
    while let Ok(n) = conn.read(&mut buf) {
        if n == 0 {
            break;
        }
    }
    let _ = conn.write_all(b"k");
}

fn stream_mb_per_s(to: SocketAddr) -> Result<f64> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
        .with_context(|| format!("connect {to}"))?;
    let chunk = vec![0x5au8; 64 << 10];
    let start = Instant::now();
    s.write_all(b"s")?;
    let mut sent = 0;
    while sent < STREAM_BYTES {
        s.write_all(&chunk)?;
        sent += chunk.len();
    }
    s.shutdown(std::net::Shutdown::Write)?;
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(sent as f64 / 1e6 / start.elapsed().as_secs_f64())
}

/// Sends [`FLOOD`] datagrams as fast as the socket takes them; returns how many were sent.
fn flood(to: SocketAddr) -> Result<u64> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    let mut sent = 0;
    while sent < FLOOD {
        if s.send_to(&[0u8; 64], to).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

/// Accumulated run time and run count of the guard program for `case` (1 cgroup_skb, 2 tc).
fn program_stats(guard: &Option<Guard>, case: usize) -> Result<(Duration, u64)> {
    let Some(g) = guard else {
        return Ok((Duration::ZERO, 0));
    };
    let hook = if case != 2 {
        IngressHook::CgroupSkb
    } else {
        IngressHook::Tc
    };
    let info = aya::programs::ProgramInfo::from_pin(g.pins().program(hook))?;
    Ok((info.run_time(), info.run_count()))
}

fn dropped(guard: &Option<Guard>) -> Result<u64> {
    Ok(match guard {
        Some(g) => {
            let c = g.maps().counters()?;
            c[1] + c[3]
        }
        None => 0,
    })
}
