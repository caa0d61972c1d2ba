//! `cargo xtask bench segment`: what moat's gateway-host hooks add to connect()+close().
//!
//! Cases, interleaved in every round and measured in one run:
//! - **no hooks**: moat's programs not attached (this run's pin root uninstalled);
//! - **allowed, 10 entries**: a caller in the gateway cgroup connecting to a protected
//!   destination — the full path: trie lookup plus the cgroup ancestor check;
//! - **allowed, 10,000 entries**: the same with a protected set of 10,000 destinations;
//! - **bystander, 10,000 entries**: a caller outside the gateway cgroup (the process's own
//!   cgroup) to an unprotected port, the path every other connect on the machine takes.
//!
//! Round-trip rates on a shared VM move by 5–20 % between runs; the connect4 program's own
//! run time (kernel BPF statistics) is the stable figure, also printed as a share of a round
//! trip.
//!
//! Then the `cgroup_egress` program, which every packet of the machine passes: a bulk TCP
//! transfer over loopback by a process outside the gateway cgroup (the unrelated process every
//! other workload is), with moat's hooks and without, as bytes per CPU-second of the process
//! (sender and receiver), interleaved per round; and the program's own cost per packet.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use anyhow::{Context, Result};
use moat::{
    cgroup::Cgroup,
    config::DestinationRule,
    segment::{Enforcer, GatewayIdentity, Policy},
};
use moat_common::dest;

use super::median;
use crate::kernel::{TestCgroup, TestPins, require_root, unique};

/// Quiet time after a policy change before a measurement.
const SETTLE: Duration = Duration::from_millis(500);

pub fn run(connects: u32, rounds: u32) -> Result<()> {
    require_root();
    let protected = accept_forever()?;
    let bystander = accept_forever()?;
    let base = TestCgroup::new(unique("moat-bench"));
    let gateway = base.child("gateway");
    let outside = Cgroup::of_pid(std::process::id())?;
    let pins = TestPins::new();
    let identity = gateway.gateway_identity();
    let small = policy(identity, protected.port(), 10);
    let large = policy(identity, protected.port(), 10_000);

    let mut samples: [Vec<f64>; 4] = Default::default();
    // The connect4 program's own cost (kernel run-time statistics, on for this run only):
    // stable where wall and CPU rates are noisy. (run time, runs) per hooked case.
    let mut prog_cost = [(Duration::ZERO, 0u64); 3];
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("cannot enable BPF run-time statistics")?;
    for round in 0..rounds {
        // No hooks; the caller already in the gateway cgroup, so the hooks are the only
        // difference to the next case.
        moat::segment::uninstall(&pins.pins)?;
        gateway.cgroup.add_pid(std::process::id())?;
        samples[0].push(rate(protected, connects)?);
        // Hooks, 10 entries.
        let mut enforcer = Enforcer::install_or_adopt(&pins.pins, &small)?;
        std::thread::sleep(SETTLE);
        samples[1].push(costed(&pins, &mut prog_cost[0], || {
            rate(protected, connects)
        })?);
        // 10,000 entries. Writing them (and clearing the idle slot) leaves RCU callbacks that
        // run in softirq context and would be charged to whatever thread runs next: let them
        // finish before measuring, so the lookups are measured, not the update.
        enforcer.apply(&large)?;
        std::thread::sleep(SETTLE);
        samples[2].push(costed(&pins, &mut prog_cost[1], || {
            rate(protected, connects)
        })?);
        outside.add_pid(std::process::id())?;
        samples[3].push(costed(&pins, &mut prog_cost[2], || {
            rate(bystander, connects)
        })?);
        eprintln!("round {}/{rounds} done", round + 1);
    }
    // Bulk transfer by an unrelated process, with and without the hooks (10,000 entries).
    let sink = sink_forever()?;
    let mut bulk_samples: [Vec<f64>; 2] = Default::default();
    let mut egress_cost = (Duration::ZERO, 0u64);
    outside.add_pid(std::process::id())?;
    for round in 0..rounds {
        moat::segment::uninstall(&pins.pins)?;
        std::thread::sleep(SETTLE);
        bulk_samples[0].push(bulk(sink)?);
        Enforcer::install_or_adopt(&pins.pins, &large)?;
        std::thread::sleep(SETTLE);
        let before = program_stats(&pins, "cgroup_egress")?;
        bulk_samples[1].push(bulk(sink)?);
        let after = program_stats(&pins, "cgroup_egress")?;
        egress_cost.0 += after.0.saturating_sub(before.0);
        egress_cost.1 += after.1 - before.1;
        eprintln!("bulk round {}/{rounds} done", round + 1);
    }
    moat::segment::uninstall(&pins.pins)?;

    let [none, small, large, by]: [f64; 4] = samples.map(median);
    println!(
        "segment: connect()+close() round trips per CPU-second of the caller (median of {rounds} rounds × {connects})"
    );
    println!("  no hooks                         {none:>10.0}/s");
    println!(
        "  allowed caller, 10 entries       {small:>10.0}/s   ratio to no hooks {:.3}",
        small / none
    );
    println!(
        "  allowed caller, 10,000 entries   {large:>10.0}/s   ratio to no hooks {:.3}",
        large / none
    );
    println!(
        "  bystander,      10,000 entries   {by:>10.0}/s   ratio to no hooks {:.3}",
        by / none
    );
    println!(
        "  10,000 vs 10 entries (allowed caller): {:.3}",
        large / small
    );
    println!(
        "  added cost per allowed connect: {:.1} µs ({:.1} %)",
        (1e6 / small) - (1e6 / none),
        (none / small - 1.0) * 100.0
    );
    let per_run = |(t, n): (Duration, u64)| t.as_nanos() as f64 / n.max(1) as f64;
    let [p_small, p_large, p_by] = prog_cost.map(per_run);
    println!(
        "  connect4 program, per run: {p_small:.0} ns (10 entries), {p_large:.0} ns (10,000 entries), {p_by:.0} ns (bystander)"
    );
    println!(
        "  10,000 vs 10 entries, program cost: {:.3}",
        p_large / p_small
    );
    // The stable figure: what the hook adds, as a share of one round trip without hooks.
    let round_trip_ns = 1e9 / none;
    println!(
        "  hook cost per allowed connect()+close(): {:.2} % (10 entries), {:.2} % (10,000 entries) of a {:.1} µs round trip",
        100.0 * p_small / round_trip_ns,
        100.0 * p_large / round_trip_ns,
        round_trip_ns / 1e3
    );
    let [bulk_none, bulk_hooked] = bulk_samples.map(median);
    println!(
        "segment: bulk TCP over loopback by an unrelated process, {} MiB per sample (median of {rounds} rounds)",
        BULK_BYTES >> 20
    );
    println!(
        "  no hooks                         {:>10.0} MiB per CPU-second",
        bulk_none / (1 << 20) as f64
    );
    println!(
        "  hooks (10,000 entries)           {:>10.0} MiB per CPU-second   ratio to no hooks {:.3} (goal >= 0.97)",
        bulk_hooked / (1 << 20) as f64,
        bulk_hooked / bulk_none
    );
    println!(
        "  cgroup_egress program, per packet: {:.0} ns ({} packets judged, {:.0} per MiB: GSO \
         super-packets and ACKs)",
        per_run(egress_cost),
        egress_cost.1,
        egress_cost.1 as f64 / (rounds as f64 * (BULK_BYTES >> 20) as f64)
    );
    Ok(())
}

/// Bytes sent per sample of the bulk transfer.
const BULK_BYTES: usize = 512 << 20;

/// Sends [`BULK_BYTES`] to `sink` on a new connection and waits until the sink read them all;
/// bytes per CPU-second of this process (sender, and the sink's thread; loopback delivery runs
/// in their contexts).
fn bulk(sink: SocketAddr) -> Result<f64> {
    use std::io::{Read, Write};
    let buf = vec![0x5au8; 256 << 10];
    let start = process_cpu_time();
    let mut s = TcpStream::connect(sink).with_context(|| format!("connect {sink}"))?;
    let mut left = BULK_BYTES;
    while left > 0 {
        let n = left.min(buf.len());
        s.write_all(&buf[..n])?;
        left -= n;
    }
    s.shutdown(std::net::Shutdown::Write)?;
    // The sink closes once it read everything.
    let mut rest = [0u8; 1];
    let _ = s.read(&mut rest)?;
    Ok(BULK_BYTES as f64 / (process_cpu_time() - start))
}

/// A loopback listener that reads every connection to its end, then closes it.
fn sink_forever() -> Result<SocketAddr> {
    use std::io::Read;
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 << 10];
        for mut c in l.incoming().flatten() {
            while matches!(c.read(&mut buf), Ok(n) if n > 0) {}
        }
    });
    Ok(addr)
}

/// Seconds of CPU time this process has used (user + system, every thread).
fn process_cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Runs `measure` and adds the connect4 program's run time and run count meanwhile to `cost`.
fn costed(
    pins: &TestPins,
    cost: &mut (Duration, u64),
    measure: impl FnOnce() -> Result<f64>,
) -> Result<f64> {
    let before = connect4_stats(pins)?;
    let rate = measure()?;
    let after = connect4_stats(pins)?;
    cost.0 += after.0.saturating_sub(before.0);
    cost.1 += after.1 - before.1;
    Ok(rate)
}

/// (run time, runs) of the connect4 program behind this run's pinned link.
fn connect4_stats(pins: &TestPins) -> Result<(Duration, u64)> {
    program_stats(pins, "connect4")
}

/// (run time, runs) of the program behind this run's pinned link of `hook`.
fn program_stats(pins: &TestPins, hook: &str) -> Result<(Duration, u64)> {
    let status = moat::segment::status(&pins.pins)?;
    let id = status
        .gateway
        .links
        .iter()
        .find(|l| l.hook == hook)
        .and_then(|l| l.program_id)
        .with_context(|| format!("{hook} is not attached"))?;
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time(), info.run_count()));
        }
    }
    anyhow::bail!("program {id} is not loaded")
}

/// A loopback listener that accepts and closes connections for the rest of the process.
fn accept_forever() -> Result<SocketAddr> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            drop(c);
        }
    });
    Ok(addr)
}

/// `entries` protected destinations, one of them `port` on loopback.
fn policy(gateway: GatewayIdentity, port: u16, entries: u32) -> Policy {
    let mut p = Policy {
        gateway: Some(gateway),
        egress_lockdown: true,
        ..Default::default()
    };
    let both = dest::PROTECTED | dest::GATEWAY_EGRESS;
    p.insert(
        DestinationRule {
            net: "127.0.0.0/8".parse().unwrap(),
            port,
        },
        both,
    );
    for i in 1..entries {
        let ip = Ipv4Addr::from(0x0a00_0000 + i);
        let net = format!("{ip}/32").parse().unwrap();
        p.insert(
            DestinationRule {
                net,
                port: 8000 + (i % 16) as u16,
            },
            both,
        );
    }
    p
}

/// connect()+close() per second of this thread's CPU time. The hooks run in the caller's
/// context, so their cost shows up there; CPU time, unlike wall time, does not count the
/// moments another process holds the (shared, 2-core) CPU. SO_LINGER 0 closes with a reset,
/// so no TIME_WAIT piles up and the ephemeral port range never runs out.
fn rate(target: SocketAddr, n: u32) -> Result<f64> {
    let start = thread_cpu_time();
    for _ in 0..n {
        let s = TcpStream::connect(target).with_context(|| format!("connect {target}"))?;
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid fd and a correctly sized option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                (&linger as *const libc::linger).cast(),
                size_of::<libc::linger>() as libc::socklen_t,
            )
        };
    }
    Ok(n as f64 / (thread_cpu_time() - start))
}

/// Seconds of CPU time this thread has used (user + system).
fn thread_cpu_time() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid clock id and out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
