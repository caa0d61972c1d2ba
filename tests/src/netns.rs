//! Network-namespace fixtures for the inference-host tests: a three-host lab (gateway,
//! inference, rogue) joined by veth pairs, with addresses that exist only inside those
//! namespaces, echo servers on the inference host, clients on the others, and port
//! reservations so a guard attached at the cgroup2 root touches no port but the test's own.
//!
//! Everything is removed on drop, also when the test panics.

use std::{
    collections::BTreeSet,
    fs::File,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::{fd::AsRawFd, unix::process::CommandExt},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use crate::kernel::unique;

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip -n <ns> …`, which must succeed.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn file(&self) -> File {
        File::open(format!("/run/netns/{}", self.name)).expect("open netns file")
    }

    /// Runs `f` on a thread that has entered this namespace. Sockets it creates stay in the
    /// namespace wherever they are used later.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let file = self.file();
        std::thread::scope(|s| {
            s.spawn(move || {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .expect("setns into the test namespace");
                f()
            })
            .join()
            .expect("thread in namespace panicked")
        })
    }

    /// Spawns a thread that lives inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let file = self.file();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("setns into the test namespace");
            f()
        })
    }

    /// A command that starts inside this namespace. Only the network namespace changes (unlike
    /// `ip netns exec`, which remounts /sys and would hide the cgroup2 and bpf mounts).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let file = self.file();
        let mut cmd = Command::new(program);
        // SAFETY: only setns(2) runs between fork and exec, on an fd opened before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// The index of `ifname` inside this namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid C string.
        self.run(|| unsafe { libc::if_nametoindex(name.as_ptr()) })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        if let Ok(o) = out
            && !o.status.success()
        {
            eprintln!(
                "warning: cannot delete netns {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Three hosts: the gateway and the rogue host each have a point-to-point veth link to the
/// inference host. The addresses (198.18.0.0/15 benchmarking range and fd00::/8 ULA) exist only
/// inside these namespaces, so identical addresses in parallel tests never meet.
pub struct Lab {
    pub gateway: Netns,
    pub inference: Netns,
    pub rogue: Netns,
}

impl Lab {
    pub const GW4: &str = "198.18.0.1";
    pub const GW6: &str = "fd00:6d00::1";
    pub const INF_GW4: &str = "198.18.0.2";
    pub const INF_GW6: &str = "fd00:6d00::2";
    pub const ROGUE4: &str = "198.18.1.1";
    pub const ROGUE6: &str = "fd00:6d01::1";
    pub const INF_ROGUE4: &str = "198.18.1.2";
    pub const INF_ROGUE6: &str = "fd00:6d01::2";
    /// Interface names inside the inference namespace.
    pub const IF_FROM_GW: &str = "from-gw";
    pub const IF_FROM_ROGUE: &str = "from-rogue";

    pub fn new() -> Lab {
        let lab = Lab {
            gateway: Netns::new("moat-test-gw"),
            inference: Netns::new("moat-test-inf"),
            rogue: Netns::new("moat-test-rogue"),
        };
        let link = |peer: &Netns, local: (&str, &str), inf: (&str, &str, &str)| {
            peer.ip(&[
                "link",
                "add",
                "to-inf",
                "type",
                "veth",
                "peer",
                "name",
                inf.0,
                "netns",
                &lab.inference.name,
            ]);
            peer.ip(&["addr", "add", &format!("{}/24", local.0), "dev", "to-inf"]);
            peer.ip(&[
                "addr",
                "add",
                &format!("{}/64", local.1),
                "dev",
                "to-inf",
                "nodad",
            ]);
            peer.ip(&["link", "set", "to-inf", "up"]);
            lab.inference
                .ip(&["addr", "add", &format!("{}/24", inf.1), "dev", inf.0]);
            lab.inference.ip(&[
                "addr",
                "add",
                &format!("{}/64", inf.2),
                "dev",
                inf.0,
                "nodad",
            ]);
            lab.inference.ip(&["link", "set", inf.0, "up"]);
        };
        link(
            &lab.gateway,
            (Self::GW4, Self::GW6),
            (Self::IF_FROM_GW, Self::INF_GW4, Self::INF_GW6),
        );
        link(
            &lab.rogue,
            (Self::ROGUE4, Self::ROGUE6),
            (Self::IF_FROM_ROGUE, Self::INF_ROGUE4, Self::INF_ROGUE6),
        );
        lab
    }
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

/// A port number held open (TCP and UDP, dual-stack) in the test process's own namespace for
/// as long as the reservation lives, so no other socket of the machine's main namespace uses
/// it while a guard attached at the cgroup2 root watches it.
pub struct PortReservation {
    pub port: u16,
    _tcp: TcpListener,
    _udp: UdpSocket,
}

impl PortReservation {
    pub fn new() -> PortReservation {
        loop {
            let tcp = TcpListener::bind("[::]:0").expect("reserve a TCP port");
            let port = tcp.local_addr().unwrap().port();
            if let Ok(udp) = UdpSocket::bind(("::", port)) {
                return PortReservation {
                    port,
                    _tcp: tcp,
                    _udp: udp,
                };
            }
        }
    }
}

impl Default for PortReservation {
    fn default() -> Self {
        Self::new()
    }
}

/// A TCP and UDP echo server on `[::]:port` (dual-stack) inside a namespace. It records the
/// source address of every UDP datagram, so a test can prove a datagram never arrived.
pub struct Echo {
    pub port: u16,
    stop: Arc<AtomicBool>,
    udp_sources: Arc<Mutex<Vec<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Echo {
    pub fn start(ns: &Netns, port: u16) -> Echo {
        let (tcp, udp) = ns.run(|| {
            (
                TcpListener::bind(("::", port)).expect("bind echo TCP"),
                UdpSocket::bind(("::", port)).expect("bind echo UDP"),
            )
        });
        let stop = Arc::new(AtomicBool::new(false));
        let udp_sources = Arc::new(Mutex::new(Vec::new()));
        tcp.set_nonblocking(true).unwrap();
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let tcp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut conn, _)) => {
                            let _ = conn.set_nonblocking(false);
                            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                            std::thread::spawn(move || {
                                let mut buf = [0u8; 512];
                                while let Ok(n) = conn.read(&mut buf) {
                                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = stop.clone();
            let sources = udp_sources.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        sources.lock().unwrap().push(from);
                        let _ = udp.send_to(&buf[..n], from);
                    }
                }
            })
        };
        Echo {
            port,
            stop,
            udp_sources,
            threads: vec![tcp_thread, udp_thread],
        }
    }

    /// How many UDP datagrams came from `ip` so far.
    pub fn udp_count_from(&self, ip: IpAddr) -> usize {
        self.udp_sources
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.ip() == ip)
            .count()
    }

    /// Source addresses of every UDP datagram received so far (IPv4 sources as IPv4).
    pub fn udp_sources(&self) -> BTreeSet<IpAddr> {
        self.udp_sources
            .lock()
            .unwrap()
            .iter()
            .map(|s| match s.ip() {
                IpAddr::V6(v6) => v6
                    .to_ipv4_mapped()
                    .map(IpAddr::V4)
                    .unwrap_or(IpAddr::V6(v6)),
                v4 => v4,
            })
            .collect()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a client saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Connected and the echo came back (TCP), or the echo came back (UDP).
    Echoed,
    /// Nothing came back in time: the packets were dropped.
    TimedOut,
    /// Anything else (refused, unreachable, …), with the errno.
    Error(i32),
}

/// One TCP connect + echo from inside `ns`; returns what happened and the client's own
/// source port.
pub fn tcp_echo(ns: &Netns, to: SocketAddr, timeout: Duration) -> (Outcome, u16) {
    ns.run(|| match TcpStream::connect_timeout(&to, timeout) {
        Ok(mut s) => {
            let local = s.local_addr().unwrap().port();
            s.set_read_timeout(Some(timeout)).unwrap();
            let mut buf = [0u8; 4];
            let r = s.write_all(b"ping").and_then(|()| s.read_exact(&mut buf));
            match r {
                Ok(()) if &buf == b"ping" => (Outcome::Echoed, local),
                Ok(()) => (Outcome::Error(-1), local),
                Err(e) if is_timeout(&e) => (Outcome::TimedOut, local),
                Err(e) => (Outcome::Error(e.raw_os_error().unwrap_or(-1)), local),
            }
        }
        Err(e) if is_timeout(&e) => (Outcome::TimedOut, 0),
        Err(e) => (Outcome::Error(e.raw_os_error().unwrap_or(-1)), 0),
    })
}

/// One UDP datagram from inside `ns`, waiting `timeout` for the echo; returns what happened
/// and the client's source port.
pub fn udp_echo(ns: &Netns, to: SocketAddr, timeout: Duration) -> (Outcome, u16) {
    ns.run(|| {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = UdpSocket::bind(bind).unwrap();
        let local = s.local_addr().unwrap().port();
        s.set_read_timeout(Some(timeout)).unwrap();
        if let Err(e) = s.send_to(b"ping", to) {
            return (Outcome::Error(e.raw_os_error().unwrap_or(-1)), local);
        }
        let mut buf = [0u8; 16];
        match s.recv_from(&mut buf) {
            Ok((4, _)) if &buf[..4] == b"ping" => (Outcome::Echoed, local),
            Ok(_) => (Outcome::Error(-1), local),
            Err(e) if is_timeout(&e) => (Outcome::TimedOut, local),
            Err(e) => (Outcome::Error(e.raw_os_error().unwrap_or(-1)), local),
        }
    })
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock
    )
}

/// `addr:port` as a socket address.
pub fn sa(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}
