//! `cargo xtask bench segment`: what moat's gateway-host hooks add to connect()+close().
//!
//! Cases, interleaved in every round and measured in one run:
//! - **no hooks**: moat's programs not attached (this run's pin root uninstalled);
//! - **allowed, 10 entries**: a caller in the gateway cgroup connecting to a protected
//!   destination — the full path: trie lookup plus the cgroup ancestor check;
//! - **allowed, 10,000 entries**: the same with a protected set of 10,000 destinations;
//! - **bystander, 10,000 entries**: a caller outside the gateway cgroup to an unprotected port,
//!   the path every other connect on the machine takes.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
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

pub fn run(connects: u32, rounds: u32) -> Result<()> {
    require_root();
    let protected = accept_forever()?;
    let bystander = accept_forever()?;
    let base = TestCgroup::new(unique("moat-bench"));
    let gateway = base.child("gateway");
    let outside = Cgroup::of_pid(std::process::id())?;
    let pins = TestPins::new();
    let identity = GatewayIdentity {
        cgroup_id: gateway.cgroup.id,
        level: gateway.cgroup.level,
    };
    let small = policy(identity, protected.port(), 10);
    let large = policy(identity, protected.port(), 10_000);

    let mut samples: [Vec<f64>; 4] = Default::default();
    for round in 0..rounds {
        // No hooks.
        moat::segment::uninstall(&pins.pins)?;
        samples[0].push(rate(protected, connects)?);
        // Hooks, 10 entries, caller in the gateway cgroup.
        let mut enforcer = Enforcer::install_or_adopt(&pins.pins, &small)?;
        gateway.cgroup.add_pid(std::process::id())?;
        samples[1].push(rate(protected, connects)?);
        // 10,000 entries.
        enforcer.apply(&large)?;
        samples[2].push(rate(protected, connects)?);
        outside.add_pid(std::process::id())?;
        samples[3].push(rate(bystander, connects)?);
        eprintln!("round {}/{rounds} done", round + 1);
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
    Ok(())
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
