//! `moat-probe`: a process the kernel tests place in a cgroup of their choosing to try a
//! connection, because a cgroup holds processes, not threads.
//!
//! It moves itself into `--cgroup` (when given) and then runs one action, printing one JSON
//! line: `{"pid":…,"cgroup_id":…,"results":[{"target":…,"errno":0|n}…]}` where errno 0 means
//! the kernel let the call through (ECONNREFUSED also means it was let through).
//!
//! Actions:
//! - `tcp ADDR…`          one TCP connect per address;
//! - `tcp6 ADDR…`         the same from an AF_INET6 socket (v4 addresses as `::ffff:a.b.c.d`);
//! - `udp ADDR…`          one unconnected UDP `sendto` per address;
//! - `loop ADDR…`         TCP connects round-robin until stdin closes; prints per-target counts
//!   of each errno seen.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{IpAddr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// cgroup directory to join before acting.
    #[arg(long)]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    Tcp { targets: Vec<SocketAddr> },
    Tcp6 { targets: Vec<SocketAddr> },
    Udp { targets: Vec<SocketAddr> },
    Loop { targets: Vec<SocketAddr> },
}

fn errno(r: io::Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

fn tcp(target: SocketAddr) -> i32 {
    errno(TcpStream::connect_timeout(&target, Duration::from_secs(2)).map(drop))
}

/// A v4 target through an AF_INET6 socket, as a dual-stack client would reach it.
fn tcp6(target: SocketAddr) -> i32 {
    let v6 = match target {
        SocketAddr::V4(v4) => {
            SocketAddr::V6(SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0))
        }
        v6 => v6,
    };
    tcp(v6)
}

fn udp(target: SocketAddr) -> i32 {
    let bind: SocketAddr = match target.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    errno(
        UdpSocket::bind(bind)
            .and_then(|s| s.send_to(b"probe", target))
            .map(drop),
    )
}

fn main() -> io::Result<()> {
    let cli = Cli::parse();
    let pid = std::process::id();
    let mut cgroup_id = 0;
    if let Some(dir) = &cli.cgroup {
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        cgroup_id = std::fs::metadata(dir)?.ino();
    }
    let results = match cli.action {
        Action::Tcp { targets } => one_each(&targets, tcp),
        Action::Tcp6 { targets } => one_each(&targets, tcp6),
        Action::Udp { targets } => one_each(&targets, udp),
        Action::Loop { targets } => {
            let stop = Arc::new(AtomicBool::new(false));
            let flag = stop.clone();
            std::thread::spawn(move || {
                let _ = io::copy(&mut io::stdin(), &mut io::sink());
                flag.store(true, Ordering::Relaxed);
            });
            // Tell the caller the loop runs (and from which cgroup) before it starts flipping.
            println!("ready");
            let mut counts: Vec<BTreeMap<i32, u64>> = vec![BTreeMap::new(); targets.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, t) in targets.iter().enumerate() {
                    *counts[i].entry(tcp(*t)).or_default() += 1;
                }
            }
            targets
                .iter()
                .zip(counts)
                .map(|(t, c)| json!({"target": t.to_string(), "counts": c}))
                .collect()
        }
    };
    let line = json!({"pid": pid, "cgroup_id": cgroup_id, "results": results});
    writeln!(io::stdout(), "{line}")
}

fn one_each(targets: &[SocketAddr], f: fn(SocketAddr) -> i32) -> Vec<serde_json::Value> {
    targets
        .iter()
        .map(|t| json!({"target": t.to_string(), "errno": f(*t)}))
        .collect()
}
