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
//! - `tfo ADDR…`          one TCP Fast Open `sendto(MSG_FASTOPEN)` per address (a
//!   connect without `connect()`);
//! - `udpc ADDR…`         one connected UDP socket per address: `connect()`, then `send()`
//!   (the errno of whichever step failed);
//! - `loop ADDR…`         TCP connects round-robin until stdin closes; prints per-target counts
//!   of each errno seen. A stdin line `window T0 T1` (CLOCK_MONOTONIC nanoseconds) makes it also
//!   report, per target, `in_window`: how many attempts started at or after T0 and ended at or
//!   before T1 — so a test can prove its probes ran while something else happened. A stdin line
//!   `rounds` is answered at once with the number of finished rounds (one attempt per target),
//!   so the test can keep changing things until enough attempts overlapped the change.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::{IpAddr, SocketAddr, SocketAddrV6, TcpStream, UdpSocket},
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use clap::{Parser, Subcommand};
use moat_tests::kernel::monotonic_ns;
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
    Tfo { targets: Vec<SocketAddr> },
    Udpc { targets: Vec<SocketAddr> },
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

/// A connected UDP socket: `connect()` (where the connect hooks judge it), then a `send()`
/// without an address (which no sendmsg hook sees).
fn udpc(target: SocketAddr) -> i32 {
    let bind: SocketAddr = match target.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().unwrap(),
        IpAddr::V6(_) => "[::]:0".parse().unwrap(),
    };
    errno(UdpSocket::bind(bind).and_then(|s| {
        s.connect(target)?;
        s.send(b"probe").map(drop)
    }))
}

/// TCP Fast Open: `sendto(MSG_FASTOPEN)` on a fresh socket, which connects without `connect()`.
fn tfo(target: SocketAddr) -> i32 {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let (family, len) = match target {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { std::ptr::write((&mut sa as *mut libc::sockaddr_storage).cast(), sin) };
            (libc::AF_INET, size_of::<libc::sockaddr_in>())
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in6 and suitably aligned.
            unsafe { std::ptr::write((&mut sa as *mut libc::sockaddr_storage).cast(), sin6) };
            (libc::AF_INET6, size_of::<libc::sockaddr_in6>())
        }
    };
    // SAFETY: plain socket syscalls with valid pointers and sizes; the fd is closed below.
    unsafe {
        let fd = libc::socket(family, libc::SOCK_STREAM, 0);
        let r = libc::sendto(
            fd,
            b"x".as_ptr().cast(),
            1,
            libc::MSG_FASTOPEN,
            (&sa as *const libc::sockaddr_storage).cast(),
            len as libc::socklen_t,
        );
        let errno = if r < 0 {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        };
        libc::close(fd);
        errno
    }
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
        Action::Tfo { targets } => one_each(&targets, tfo),
        Action::Udpc { targets } => one_each(&targets, udpc),
        Action::Loop { targets } => {
            let stop = Arc::new(AtomicBool::new(false));
            let window = Arc::new(Mutex::new(None));
            let rounds = Arc::new(AtomicU64::new(0));
            let (flag, win, done) = (stop.clone(), window.clone(), rounds.clone());
            std::thread::spawn(move || {
                for line in io::stdin().lines() {
                    let Ok(line) = line else { break };
                    let mut words = line.split_whitespace();
                    let word = words.next();
                    if word == Some("rounds") {
                        println!("{}", done.load(Ordering::Relaxed));
                    } else if word == Some("window")
                        && let (Some(Ok(t0)), Some(Ok(t1))) = (
                            words.next().map(str::parse::<u64>),
                            words.next().map(str::parse::<u64>),
                        )
                    {
                        *win.lock().unwrap() = Some((t0, t1));
                    }
                }
                flag.store(true, Ordering::Relaxed);
            });
            // Tell the caller the loop runs (and from which cgroup) before it starts flipping.
            println!("ready");
            let mut counts: Vec<BTreeMap<i32, u64>> = vec![BTreeMap::new(); targets.len()];
            // (start, end) of every attempt, per target.
            let mut spans: Vec<Vec<(u64, u64)>> = vec![Vec::new(); targets.len()];
            while !stop.load(Ordering::Relaxed) {
                for (i, t) in targets.iter().enumerate() {
                    let start = monotonic_ns();
                    *counts[i].entry(tcp(*t)).or_default() += 1;
                    spans[i].push((start, monotonic_ns()));
                }
                rounds.fetch_add(1, Ordering::Relaxed);
            }
            let window = *window.lock().unwrap();
            targets
                .iter()
                .zip(counts)
                .zip(spans)
                .map(|((t, c), spans)| {
                    let in_window = window
                        .map(|(t0, t1)| spans.iter().filter(|(s, e)| *s >= t0 && *e <= t1).count());
                    json!({"target": t.to_string(), "counts": c, "in_window": in_window})
                })
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
