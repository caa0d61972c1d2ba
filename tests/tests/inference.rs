//! The inference-host guard in the real kernel (root required; never skipped), across three
//! network namespaces each test builds for itself: gateway, inference host and rogue host.
//!
//! Scoping: a `cgroup_skb` guard at the cgroup2 root sees the sockets of every namespace on the
//! machine, so each test guards only a port it reserved in the main namespace (TCP and UDP) and
//! its allowlist is keyed by that port; a TC guard sits on the test's own veth ends inside its
//! inference namespace. Each test has its own pin root, removed on drop.

use std::{
    io::{Read, Write},
    net::SocketAddr,
    net::TcpStream,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use moat::{
    config::{Config, InferenceGuard},
    segment::{
        DenyRecord,
        inference::{Guard, GuardPins, IngressDeny},
        tc::TcMode,
    },
};
use moat_tests::{
    daemon::Daemon,
    kernel::{TestPins, require_root},
    netns::{Echo, Lab, Outcome, PortReservation, sa, tcp_echo, udp_echo},
};
use nix::sys::signal::SIGHUP;

/// How long a client waits before calling a flow dropped.
const DROP_WAIT: Duration = Duration::from_millis(800);
/// How long an allowed flow may take: an upper bound on waiting, so it stretches on a slow
/// machine ([`moat_tests::patience`]).
fn ok_wait() -> Duration {
    moat_tests::patience(Duration::from_secs(3))
}
/// Gateway round trips and rogue datagrams that must fall between the first and the last
/// policy change of a test under traffic, for its "never failed" to mean anything.
const MIN_DURING: u64 = 20;

fn guard_toml(port: u16, allowed: &[&str], attach: &str, interfaces: &[&str]) -> String {
    let list = |v: &[&str]| {
        v.iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut t = format!(
        "[segmentation.inference]\nmodel_ports = [{port}]\nallowed_gateways = [{}]\n\
         attach = \"{attach}\"\n",
        list(allowed)
    );
    if !interfaces.is_empty() {
        t.push_str(&format!("interfaces = [{}]\n", list(interfaces)));
    }
    t
}

fn guard_config(port: u16, allowed: &[&str], attach: &str, interfaces: &[&str]) -> InferenceGuard {
    Config::from_str(
        Path::new("/test/moat.toml"),
        &guard_toml(port, allowed, attach, interfaces),
    )
    .expect("test config")
    .inference
    .expect("guard configured")
}

fn drain(guard: &Guard) -> Vec<IngressDeny> {
    let mut ring = guard.open_events().unwrap();
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        events.extend(IngressDeny::decode(&item));
    }
    events
}

/// The start of most tests here (root required): a model port reserved in the main namespace,
/// the three-host lab and an echo server on that port inside the inference host.
fn lab_with_model() -> (PortReservation, Lab, Echo) {
    require_root();
    let model = PortReservation::new();
    let lab = Lab::new();
    let echo = Echo::start(&lab.inference, model.port);
    (model, lab, echo)
}

fn host(addr: &str, len: u8) -> String {
    format!("{addr}/{len}")
}

/// The guard admits the rogue host and not the gateway (an allowlist switched to the rogue
/// host, and whatever must leave it so): the rogue host's TCP is echoed, the gateway's SYN is
/// dropped (its connect times out).
fn assert_rogue_in_gateway_out(lab: &Lab, rogue_to: SocketAddr, gw_to: SocketAddr, what: &str) {
    assert_eq!(
        tcp_echo(&lab.rogue, rogue_to, ok_wait()).0,
        Outcome::Echoed,
        "{what}: the rogue host is admitted"
    );
    assert_eq!(
        tcp_echo(&lab.gateway, gw_to, DROP_WAIT).0,
        Outcome::TimedOut,
        "{what}: the gateway is dropped"
    );
}

#[test]
fn cgroup_skb_guard_admits_only_the_gateway() {
    let (model, lab, echo) = lab_with_model();
    let port = model.port;
    let unguarded = PortReservation::new();
    let _open = Echo::start(&lab.inference, unguarded.port);
    let pins = TestPins::new();
    let gateways = [host(Lab::GW4, 32), host(Lab::GW6, 128)];
    let gw: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let mut guard =
        Guard::install_or_adopt(&pins.pins, &guard_config(port, &gw, "cgroup_skb", &[])).unwrap();
    assert!(!guard.adopted());

    for to in [sa(Lab::INF_GW4, port), sa(Lab::INF_GW6, port)] {
        assert_eq!(
            tcp_echo(&lab.gateway, to, ok_wait()).0,
            Outcome::Echoed,
            "gateway TCP {to}"
        );
        assert_eq!(
            udp_echo(&lab.gateway, to, ok_wait()).0,
            Outcome::Echoed,
            "gateway UDP {to}"
        );
    }
    // IPv4 through a dual-stack AF_INET6 client socket (`::ffff:a.b.c.d`) is IPv4 on the wire.
    let mapped = sa(&format!("::ffff:{}", Lab::INF_GW4), port);
    assert_eq!(tcp_echo(&lab.gateway, mapped, ok_wait()).0, Outcome::Echoed);

    let mut rogue_udp_ports = Vec::new();
    for to in [sa(Lab::INF_ROGUE4, port), sa(Lab::INF_ROGUE6, port)] {
        assert_eq!(
            tcp_echo(&lab.rogue, to, DROP_WAIT).0,
            Outcome::TimedOut,
            "rogue TCP {to}"
        );
        let (udp, src_port) = udp_echo(&lab.rogue, to, DROP_WAIT);
        assert_eq!(udp, Outcome::TimedOut, "rogue UDP {to}");
        rogue_udp_ports.push(src_port);
    }
    let arrived = echo.udp_sources();
    assert!(
        arrived.contains(&Lab::GW4.parse().unwrap())
            && arrived.contains(&Lab::GW6.parse().unwrap()),
        "gateway datagrams arrived: {arrived:?}"
    );
    for rogue in [Lab::ROGUE4, Lab::ROGUE6] {
        assert!(
            !arrived.contains(&rogue.parse().unwrap()),
            "a rogue datagram reached the model server: {arrived:?}"
        );
    }
    // Another port of the same host is not the guard's business.
    let other = sa(Lab::INF_ROGUE4, unguarded.port);
    assert_eq!(tcp_echo(&lab.rogue, other, ok_wait()).0, Outcome::Echoed);

    // Loopback inside the inference host is a source like any other.
    for to in [sa("127.0.0.1", port), sa("::1", port)] {
        assert_eq!(
            tcp_echo(&lab.inference, to, DROP_WAIT).0,
            Outcome::TimedOut,
            "loopback TCP {to}"
        );
        assert_eq!(
            udp_echo(&lab.inference, to, DROP_WAIT).0,
            Outcome::TimedOut,
            "loopback UDP {to}"
        );
    }

    // Deny events: source address and port, destination port, protocol, hook.
    let events = drain(&guard);
    let udp4 = events
        .iter()
        .find(|e| e.protocol == "udp" && e.src_addr.to_string() == Lab::ROGUE4)
        .unwrap_or_else(|| panic!("no UDP deny event from the rogue host in {events:?}"));
    assert_eq!(udp4.src_port, rogue_udp_ports[0]);
    assert_eq!(udp4.dst_port, port);
    assert_eq!(udp4.dst_addr.to_string(), Lab::INF_ROGUE4);
    assert_eq!(udp4.hook, "cgroup_skb");
    let udp6 = events
        .iter()
        .find(|e| e.protocol == "udp" && e.src_addr.to_string() == Lab::ROGUE6)
        .expect("UDP deny event over IPv6");
    assert_eq!(udp6.src_port, rogue_udp_ports[1]);
    let tcp6 = events
        .iter()
        .find(|e| e.protocol == "tcp" && e.src_addr.to_string() == Lab::ROGUE6)
        .expect("TCP deny event over IPv6");
    assert_eq!(tcp6.dst_port, port);
    assert_ne!(tcp6.src_port, 0);
    assert!(
        events
            .iter()
            .any(|e| e.src_addr.to_string() == "127.0.0.1" && e.dst_port == port),
        "loopback deny event"
    );
    assert!(
        events.iter().all(|e| e.dst_port == port),
        "only the guarded port is judged: {events:?}"
    );
    let counters = guard.maps().counters().unwrap();
    assert!(
        counters[0] > 0 && counters[1] > 0,
        "cgroup_skb allowed/dropped: {counters:?}"
    );

    // Reload: the rogue host and IPv4 loopback become the allowed sources, the gateway not.
    let rogue_and_lo = [host(Lab::ROGUE4, 32), "127.0.0.0/8".to_owned()];
    let allowed: Vec<&str> = rogue_and_lo.iter().map(String::as_str).collect();
    guard
        .apply(&guard_config(port, &allowed, "cgroup_skb", &[]))
        .unwrap();
    assert_eq!(
        tcp_echo(&lab.rogue, sa(Lab::INF_ROGUE4, port), ok_wait()).0,
        Outcome::Echoed
    );
    assert_eq!(
        tcp_echo(&lab.inference, sa("127.0.0.1", port), ok_wait()).0,
        Outcome::Echoed
    );
    assert_eq!(
        tcp_echo(&lab.inference, sa("::1", port), DROP_WAIT).0,
        Outcome::TimedOut
    );
    assert_eq!(
        tcp_echo(&lab.gateway, sa(Lab::INF_GW4, port), DROP_WAIT).0,
        Outcome::TimedOut
    );

    // An empty allowlist denies everyone.
    guard
        .apply(&guard_config(port, &[], "cgroup_skb", &[]))
        .unwrap();
    assert_eq!(
        tcp_echo(&lab.rogue, sa(Lab::INF_ROGUE4, port), DROP_WAIT).0,
        Outcome::TimedOut
    );
    assert_eq!(guard.maps().read_active().unwrap().sources.len(), 0);
}

#[test]
fn tc_guard_covers_exactly_its_interfaces() {
    let (model, lab, echo) = lab_with_model();
    let port = model.port;
    let pins = TestPins::new();
    let gateways = [host(Lab::GW4, 32), host(Lab::GW6, 128)];
    let gw: Vec<&str> = gateways.iter().map(String::as_str).collect();
    let veths = [Lab::IF_FROM_GW, Lab::IF_FROM_ROGUE];
    let cfg = guard_config(port, &gw, "tc", &veths);
    // tcx links attach by interface name in the caller's namespace.
    let mut guard = lab
        .inference
        .run(|| Guard::install_or_adopt(&pins.pins, &cfg))
        .unwrap();
    let links =
        |g: &Guard| -> Vec<String> { g.pins().links().iter().map(|a| a.pin_name()).collect() };
    assert_eq!(links(&guard), ["tc-from-gw", "tc-from-rogue"]);
    for ifname in veths {
        assert_eq!(tc_ingress(&lab, ifname), 1, "one TC program on {ifname}");
    }

    for to in [sa(Lab::INF_GW4, port), sa(Lab::INF_GW6, port)] {
        assert_eq!(
            tcp_echo(&lab.gateway, to, ok_wait()).0,
            Outcome::Echoed,
            "gateway TCP {to}"
        );
        assert_eq!(
            udp_echo(&lab.gateway, to, ok_wait()).0,
            Outcome::Echoed,
            "gateway UDP {to}"
        );
    }
    assert_eq!(
        tcp_echo(&lab.rogue, sa(Lab::INF_ROGUE4, port), DROP_WAIT).0,
        Outcome::TimedOut
    );
    let (udp, src_port) = udp_echo(&lab.rogue, sa(Lab::INF_ROGUE6, port), DROP_WAIT);
    assert_eq!(udp, Outcome::TimedOut);
    assert!(!echo.udp_sources().contains(&Lab::ROGUE6.parse().unwrap()));
    // Loopback does not cross the listed interfaces.
    assert_eq!(
        tcp_echo(&lab.inference, sa("127.0.0.1", port), ok_wait()).0,
        Outcome::Echoed
    );

    let events = drain(&guard);
    let ev = events
        .iter()
        .find(|e| e.protocol == "udp" && e.src_addr.to_string() == Lab::ROGUE6)
        .unwrap_or_else(|| panic!("no UDP deny event from the rogue host in {events:?}"));
    assert_eq!(ev.hook, "tc");
    assert_eq!(ev.ifindex, lab.inference.ifindex(Lab::IF_FROM_ROGUE));
    assert_eq!(ev.src_port, src_port);
    assert_eq!(ev.dst_port, port);
    assert_eq!(ev.dst_addr.to_string(), Lab::INF_ROGUE6);
    assert!(
        events
            .iter()
            .any(|e| e.protocol == "tcp" && e.src_addr.to_string() == Lab::ROGUE4)
    );

    // IPv6 extension headers do not hide the port: a destination-options or hop-by-hop header
    // in front of UDP is walked over, for the gateway (passes) and the rogue host (dropped).
    for (name, opt) in [
        ("destination options", libc::IPV6_DSTOPTS),
        ("hop-by-hop", libc::IPV6_HOPOPTS),
    ] {
        assert_eq!(
            udp_echo_with_ext(&lab.gateway, sa(Lab::INF_GW6, port), opt),
            Outcome::Echoed,
            "gateway UDP with a {name} header"
        );
        let before = guard.maps().counters().unwrap()[3];
        assert_eq!(
            udp_echo_with_ext(&lab.rogue, sa(Lab::INF_ROGUE6, port), opt),
            Outcome::TimedOut,
            "rogue UDP with a {name} header"
        );
        assert!(
            guard.maps().counters().unwrap()[3] > before,
            "the tc hook dropped it"
        );
    }
    assert!(!echo.udp_sources().contains(&Lab::ROGUE6.parse().unwrap()));

    // Listing `lo` too brings loopback under the guard.
    let with_lo = guard_config(
        port,
        &gw,
        "tc",
        &[Lab::IF_FROM_GW, Lab::IF_FROM_ROGUE, "lo"],
    );
    lab.inference.run(|| guard.apply(&with_lo)).unwrap();
    assert_eq!(links(&guard), ["tc-from-gw", "tc-from-rogue", "tc-lo"]);
    assert_eq!(
        tcp_echo(&lab.inference, sa("127.0.0.1", port), DROP_WAIT).0,
        Outcome::TimedOut
    );

    // Switching to cgroup_skb attaches the new hook before the old links go.
    let cgroup = guard_config(port, &gw, "cgroup_skb", &[]);
    lab.inference.run(|| guard.apply(&cgroup)).unwrap();
    assert_eq!(links(&guard), ["cgroup_skb"]);
    // The kernel releases an unpinned link from a work queue: wait until the tcx programs
    // are really gone, so the drop below is the cgroup_skb hook's own.
    let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(5));
    while ["lo", Lab::IF_FROM_GW, Lab::IF_FROM_ROGUE]
        .iter()
        .any(|i| tc_ingress(&lab, i) > 0)
    {
        assert!(Instant::now() < deadline, "TC programs still attached");
        std::thread::sleep(Duration::from_millis(20));
    }
    let dropped_before = guard.maps().counters().unwrap()[1];
    assert_eq!(
        tcp_echo(&lab.rogue, sa(Lab::INF_ROGUE4, port), DROP_WAIT).0,
        Outcome::TimedOut
    );
    assert!(
        guard.maps().counters().unwrap()[1] > dropped_before,
        "the cgroup_skb hook dropped the rogue SYN"
    );
    assert_eq!(
        tcp_echo(&lab.gateway, sa(Lab::INF_GW4, port), ok_wait()).0,
        Outcome::Echoed
    );
    let counters = guard.maps().counters().unwrap();
    assert!(
        counters[2] > 0 && counters[3] > 0,
        "tc allowed/dropped: {counters:?}"
    );
}

/// An interface that disappears (its namespace deleted) leaves a defunct tcx link behind the
/// pin; status still reads and `uninstall` still removes everything.
#[test]
fn tc_guard_uninstalls_after_its_interface_is_gone() {
    require_root();
    let model = PortReservation::new();
    let pins = TestPins::new();
    let lab = Lab::new();
    let gw = host(Lab::GW4, 32);
    let cfg = guard_config(model.port, &[&gw], "tc", &[Lab::IF_FROM_ROGUE]);
    let guard = lab
        .inference
        .run(|| Guard::install_or_adopt(&pins.pins, &cfg))
        .unwrap();
    assert_eq!(tc_ingress(&lab, Lab::IF_FROM_ROGUE), 1);
    drop(lab);
    let status = moat::segment::status(&pins.pins).unwrap();
    assert_eq!(
        status.inference.links.len(),
        1,
        "the pin outlives the interface"
    );
    let removed = moat::segment::uninstall(&pins.pins).unwrap();
    assert!(removed > 0);
    assert!(
        !guard.pins().dir().exists(),
        "uninstall removes the guard's pins"
    );
}

/// A UDP datagram behind five IPv6 destination-options headers — one more than the TC hook
/// walks — would hide its port from it. The hook refuses such chains while it guards a port
/// (the same datagram reaches the server when no guard is attached: the control).
#[test]
fn tc_guard_refuses_header_chains_it_cannot_walk() {
    let (model, lab, echo) = lab_with_model();
    let port = model.port;
    let pins = TestPins::new();
    let rogue6: std::net::Ipv6Addr = Lab::ROGUE6.parse().unwrap();
    let send = || {
        let packet = udp6_behind_dstopts(rogue6, Lab::INF_ROGUE6.parse().unwrap(), port, 5);
        lab.rogue
            .run(|| send_raw6(&packet, Lab::INF_ROGUE6.parse().unwrap()));
    };
    let arrived = || echo.udp_count_from(rogue6.into());
    let wait_for = |what: &str, cond: &dyn Fn() -> bool| {
        let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(5));
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    send();
    wait_for("control: without a guard the datagram arrives", &|| {
        arrived() == 1
    });

    let gw = host(Lab::GW6, 128);
    let cfg = guard_config(port, &[&gw], "tc", &[Lab::IF_FROM_ROGUE]);
    let guard = lab
        .inference
        .run(|| Guard::install_or_adopt(&pins.pins, &cfg))
        .unwrap();
    let dropped = guard.maps().counters().unwrap()[3];
    send();
    // Once the tc hook counted the drop, the datagram's fate is sealed: it cannot arrive later.
    wait_for("the tc hook to drop the datagram", &|| {
        guard.maps().counters().unwrap()[3] > dropped
    });
    assert_eq!(
        arrived(),
        1,
        "the guarded port is not reached behind a long header chain"
    );
    let events = drain(&guard);
    let ev = events
        .iter()
        .find(|e| e.src_addr == std::net::IpAddr::from(rogue6))
        .unwrap_or_else(|| panic!("no deny event in {events:?}"));
    assert_eq!((ev.hook, ev.protocol), ("tc", "other"));
}

/// An IPv6 packet from `src` to `dst`: `n` destination-options headers (8 bytes each, PadN),
/// then UDP to `port` with a correct checksum and the payload `ping`.
fn udp6_behind_dstopts(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    port: u16,
    n: usize,
) -> Vec<u8> {
    let payload = b"ping";
    let udp_len = 8 + payload.len();
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&((n * 8 + udp_len) as u16).to_be_bytes());
    p.push(if n == 0 { 17 } else { 60 });
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    for i in 0..n {
        p.extend_from_slice(&[if i + 1 == n { 17 } else { 60 }, 0, 1, 4, 0, 0, 0, 0]);
    }
    let mut udp = Vec::new();
    udp.extend_from_slice(&40001u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    // Checksum over the pseudo-header (addresses, length, next header) and the datagram.
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(udp_len as u32).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&udp);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    udp[6..8].copy_from_slice(&(if check == 0 { 0xffff } else { check }).to_be_bytes());
    p.extend_from_slice(&udp);
    p
}

/// Sends a complete IPv6 packet (header included) from the calling thread's namespace.
fn send_raw6(packet: &[u8], to: std::net::Ipv6Addr) {
    // SAFETY: plain socket calls with valid buffers; the fd is closed before returning.
    unsafe {
        let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let mut sa: libc::sockaddr_in6 = std::mem::zeroed();
        sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
        sa.sin6_addr.s6_addr = to.octets();
        let r = libc::sendto(
            fd,
            packet.as_ptr().cast(),
            packet.len(),
            0,
            (&sa as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        assert_eq!(r, packet.len() as isize, "sendto: {err}");
    }
}

/// Gateway TCP round trips and rogue UDP datagrams to the model port, in loops on threads
/// inside their namespaces, until [`Traffic::stop`].
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
    /// (start, end) of every gateway round trip, and when each rogue datagram was sent: what
    /// [`Traffic::between`] counts.
    round_trips: Arc<Mutex<Vec<(Instant, Instant)>>>,
    sends: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(lab: &Lab, port: u16) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let (ok, failed, sent) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let round_trips = Arc::new(Mutex::new(Vec::new()));
        let sends = Arc::new(Mutex::new(Vec::new()));
        let gateway = {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            let spans = round_trips.clone();
            let to = sa(Lab::INF_GW4, port);
            lab.gateway.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let round_trip =
                        TcpStream::connect_timeout(&to, ok_wait()).and_then(|mut s| {
                            s.set_read_timeout(Some(ok_wait()))?;
                            s.write_all(b"ping")?;
                            let mut buf = [0u8; 4];
                            s.read_exact(&mut buf)
                        });
                    match round_trip {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    spans.lock().unwrap().push((start, Instant::now()));
                }
            })
        };
        let rogue = {
            let (stop, sent, times) = (stop.clone(), sent.clone(), sends.clone());
            let to = sa(Lab::INF_ROGUE4, port);
            lab.rogue.spawn(move || {
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                while !stop.load(Ordering::Relaxed) {
                    if s.send_to(b"ping", to).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                        times.lock().unwrap().push(Instant::now());
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        Traffic {
            stop,
            ok,
            failed,
            sent,
            round_trips,
            sends,
            threads: vec![gateway, rogue],
        }
    }

    /// Gateway round trips that ran wholly between `t0` and `t1`, and rogue datagrams sent
    /// in between: the traffic that overlapped what the test did then.
    fn between(&self, t0: Instant, t1: Instant) -> (u64, u64) {
        let trips = self.round_trips.lock().unwrap();
        let sends = self.sends.lock().unwrap();
        (
            trips.iter().filter(|(s, e)| *s >= t0 && *e <= t1).count() as u64,
            sends.iter().filter(|t| **t >= t0 && **t <= t1).count() as u64,
        )
    }

    /// Whether both loops did [`MIN_DURING`] (plus one in flight) of their work since `t0`;
    /// panics after a minute (stretched on a slow machine), so a caller looping on it ends.
    fn enough_since(&self, t0: Instant) -> bool {
        let limit = moat_tests::patience(Duration::from_secs(60));
        assert!(t0.elapsed() < limit, "too little traffic in {limit:?}");
        let (trips, sends) = self.between(t0, Instant::now());
        trips > MIN_DURING && sends > MIN_DURING
    }

    /// Waits (up to 10 s) until both loops have completed a round, so what the test does next
    /// happens under traffic.
    fn wait_running(&self) {
        let deadline = Instant::now() + moat_tests::patience(Duration::from_secs(10));
        while self.round_trips.lock().unwrap().is_empty() || self.sends.lock().unwrap().is_empty() {
            assert!(Instant::now() < deadline, "the traffic loops did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the loops; returns (gateway round trips ok, failed, rogue datagrams sent).
    fn stop(mut self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            self.sent.load(Ordering::Relaxed),
        )
    }
}

/// An upgrade adopts with no gap: at least 20 back-to-back install-or-adopt runs (each reuses
/// the pinned maps and switches the pinned link to a freshly loaded program) while the gateway
/// runs TCP round trips and the rogue host sends UDP: no gateway failure, no rogue datagram
/// through, the same link throughout.
#[test]
fn adopting_again_and_again_leaves_no_gap() {
    let (model, lab, echo) = lab_with_model();
    let port = model.port;
    let pins = TestPins::new();
    let gw = host(Lab::GW4, 32);
    let cfg = guard_config(port, &[&gw], "cgroup_skb", &[]);
    let first = Guard::install_or_adopt(&pins.pins, &cfg).unwrap();
    let link_of = || {
        let st = moat::segment::status(&pins.pins).unwrap();
        let l = &st.inference.links[0];
        (l.link_id.unwrap(), l.program_id.unwrap())
    };
    let (link, mut program) = link_of();
    drop(first);

    let traffic = Traffic::start(&lab, port);
    traffic.wait_running();
    // At least 20 adoptions, and on until enough traffic ran during them (a stall of a loaded
    // machine is outlasted, not hoped away).
    let first = Instant::now();
    let mut adoptions = 0;
    while adoptions < 20 || !traffic.enough_since(first) {
        adoptions += 1;
        let g = Guard::install_or_adopt(&pins.pins, &cfg).unwrap();
        assert!(g.adopted());
        let (l, p) = link_of();
        assert_eq!(l, link, "the same link");
        assert_ne!(p, program, "switched to the new program");
        program = p;
    }
    let (trips, datagrams) = traffic.between(first, Instant::now());
    let (ok, failed, sent) = traffic.stop();
    assert!(
        trips >= MIN_DURING && datagrams >= MIN_DURING,
        "too little traffic during {adoptions} adoptions: {trips} round trips, {datagrams} \
         datagrams (of {ok} and {sent})"
    );
    assert_eq!(
        failed, 0,
        "gateway round trips failed during adoption ({ok} ok)"
    );
    assert!(
        !echo.udp_sources().contains(&Lab::ROGUE4.parse().unwrap()),
        "a rogue datagram got through during adoption"
    );
}

/// 1,000 policy flips while the gateway runs TCP round trips and the rogue host sends UDP:
/// the gateway is allowed by both policies and must never fail; the rogue host is denied by
/// both and must never get a datagram through.
#[test]
fn guard_policy_flips_never_change_a_shared_verdict() {
    let (model, lab, echo) = lab_with_model();
    let port = model.port;
    let pins = TestPins::new();
    let gw = host(Lab::GW4, 32);
    let a = guard_config(port, &[&gw, "198.18.7.0/24"], "cgroup_skb", &[]);
    let b = guard_config(
        port,
        &[&gw, "198.18.8.0/24", "fd00:6d07::/64"],
        "cgroup_skb",
        &[],
    );
    let mut guard = Guard::install_or_adopt(&pins.pins, &a).unwrap();

    let traffic = Traffic::start(&lab, port);
    traffic.wait_running();
    // At least 1,000 flips, an even number, and on until enough traffic ran during them (a
    // stall of a loaded machine is outlasted, not hoped away).
    let started = Instant::now();
    let mut flips = 0;
    loop {
        guard.apply(if flips % 2 == 0 { &b } else { &a }).unwrap();
        flips += 1;
        if flips >= 1000 && flips % 64 == 0 && traffic.enough_since(started) {
            break;
        }
    }
    let last_flip = Instant::now();
    let (trips, datagrams) = traffic.between(started, last_flip);
    let (ok, failed, sent) = traffic.stop();
    let flipping = last_flip - started;
    assert!(
        trips >= MIN_DURING,
        "only {trips} gateway round trips (of {ok}) ran between the first and the last of \
         {flips} flips ({flipping:?}); at least {MIN_DURING} must"
    );
    assert_eq!(
        failed, 0,
        "gateway round trips failed during flips ({ok} ok)"
    );
    assert!(
        datagrams >= MIN_DURING,
        "only {datagrams} rogue datagrams (of {sent}) were sent during the flips"
    );
    assert!(
        !echo.udp_sources().contains(&Lab::ROGUE4.parse().unwrap()),
        "a rogue datagram got through during the flips"
    );
    // An even number of flips leaves policy A active.
    let active = guard.maps().read_active().unwrap();
    assert!(active.allows("198.18.7.1".parse().unwrap(), port) == Some(true));
    assert!(active.allows("198.18.8.1".parse().unwrap(), port) == Some(false));
}

/// `moat serve` on an inference host (no pools): the guard alone, fail-static across SIGKILL,
/// adopted on restart, reloaded on SIGHUP, a bad file refused, deny events in the log, and
/// `moat segment uninstall` removing it.
#[test]
fn daemon_runs_the_guard_on_an_inference_host() {
    let (model, lab, _echo) = lab_with_model();
    let port = model.port;
    let mut daemon = Daemon::enforcing();
    let write_cfg = |daemon: &Daemon, guard: &str| {
        daemon.write_config(&format!(
            "[server]\ndata_dir = \"data\"\n\
             [segmentation]\npin_root = \"{}\"\n{guard}",
            daemon.pin_root().display()
        ));
    };
    let gw4 = host(Lab::GW4, 32);
    let gw6 = host(Lab::GW6, 128);
    let rogue4 = host(Lab::ROGUE4, 32);
    write_cfg(&daemon, &guard_toml(port, &[&gw4, &gw6], "cgroup_skb", &[]));
    let gw_to = sa(Lab::INF_GW4, port);
    let rogue_to = sa(Lab::INF_ROGUE4, port);

    daemon.start_in(&lab.inference);
    daemon.wait_log("inference guard active");
    daemon.wait_log("guard only, no data plane");
    let before = daemon.segment_status();
    assert_eq!(
        before["installed"], false,
        "no gateway side on an inference host"
    );
    let guard = &before["inference"];
    assert_eq!(guard["installed"], true);
    assert_eq!(guard["model_ports"], serde_json::json!([port]));
    assert_eq!(guard["links"][0]["attachment"], "cgroup_skb");
    assert_eq!(
        guard["allowed"][0]["sources"],
        serde_json::json!([Lab::GW4.to_owned() + "/32", Lab::GW6.to_owned() + "/128"])
    );

    assert_eq!(tcp_echo(&lab.gateway, gw_to, ok_wait()).0, Outcome::Echoed);
    let (udp, src_port) = udp_echo(&lab.rogue, rogue_to, DROP_WAIT);
    assert_eq!(udp, Outcome::TimedOut);
    // The deny event reaches the daemon's structured log with source, destination, protocol.
    let event = daemon.wait_log(&format!("\"src_port\":{src_port}"));
    assert_eq!(event["event"], "kernel_ingress_deny");
    assert_eq!(event["src_addr"], Lab::ROGUE4);
    assert_eq!(event["dst_port"], port);
    assert_eq!(event["protocol"], "udp");
    assert_eq!(event["hook"], "cgroup_skb");

    // SIGHUP with a new allowlist: the rogue host in, the gateway out.
    write_cfg(&daemon, &guard_toml(port, &[&rogue4], "cgroup_skb", &[]));
    daemon.signal(SIGHUP);
    daemon.wait_log("inference guard reloaded");
    assert_rogue_in_gateway_out(&lab, rogue_to, gw_to, "the reloaded allowlist");

    // A bad file on SIGHUP is refused, names the key, and changes nothing.
    let good = daemon.read_config();
    write_cfg(
        &daemon,
        &guard_toml(port, &["not-an-address"], "cgroup_skb", &[]),
    );
    daemon.signal(SIGHUP);
    let refused = daemon.wait_log("config reload refused");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("segmentation.inference.allowed_gateways[0]"),
        "{refused}"
    );
    assert_rogue_in_gateway_out(&lab, rogue_to, gw_to, "a refused file changes nothing");
    // A valid file whose guard cannot attach (no such interface) changes nothing either:
    // not the allowlist it carries, not the links.
    let both_with_missing_if = guard_toml(port, &[&gw4], "both", &["nosuchif0"]);
    write_cfg(&daemon, &both_with_missing_if);
    daemon.signal(SIGHUP);
    let failed = daemon.wait_log("the inference guard does not apply");
    assert!(
        failed["error"].as_str().unwrap().contains("nosuchif0"),
        "{failed}"
    );
    assert_rogue_in_gateway_out(
        &lab,
        rogue_to,
        gw_to,
        "a guard that cannot attach changes nothing",
    );
    assert_eq!(
        daemon.segment_status()["inference"]["links"],
        before["inference"]["links"]
    );
    daemon.write_config(&good);

    // SIGKILL: nothing is cleaned up, the last policy holds.
    daemon.kill();
    assert_rogue_in_gateway_out(&lab, rogue_to, gw_to, "fail-static");

    // A restart adopts the pinned guard instead of stacking a second one.
    daemon.start_in(&lab.inference);
    daemon.wait_log("adopted the pinned inference guard");
    daemon.wait_log("inference guard active");
    // The same link, switched in place to the restarted binary's program.
    let after = daemon.segment_status();
    let (link_before, link_after) = (&before["inference"]["links"], &after["inference"]["links"]);
    assert_eq!(
        link_after.as_array().unwrap().len(),
        1,
        "no second link: {link_after}"
    );
    assert_eq!(link_after[0]["attachment"], "cgroup_skb");
    assert_eq!(
        link_after[0]["link_id"], link_before[0]["link_id"],
        "same link after restart"
    );
    assert_ne!(
        link_after[0]["program_id"], link_before[0]["program_id"],
        "program updated in place"
    );
    assert_eq!(
        tcp_echo(&lab.gateway, gw_to, DROP_WAIT).0,
        Outcome::TimedOut
    );
    daemon.kill();

    daemon.cli_ok(&["segment", "uninstall"], None);
    assert_eq!(
        tcp_echo(&lab.gateway, gw_to, ok_wait()).0,
        Outcome::Echoed,
        "open after uninstall"
    );
    assert_eq!(daemon.segment_status()["inference"]["installed"], false);
    assert!(
        !GuardPins::new(daemon.pins()).dir().exists(),
        "uninstall removes the pins"
    );
}

/// One UDP datagram over IPv6 carrying an extension header (`IPV6_DSTOPTS` or
/// `IPV6_HOPOPTS`: 8 bytes, one PadN option), waiting for the echo.
fn udp_echo_with_ext(ns: &moat_tests::netns::Netns, to: std::net::SocketAddr, opt: i32) -> Outcome {
    use std::os::fd::AsRawFd;
    ns.run(|| {
        let s = std::net::UdpSocket::bind("[::]:0").unwrap();
        // next header (set by the kernel), length 0 (= 8 bytes), PadN with 4 bytes of padding.
        let ext: [u8; 8] = [0, 0, 1, 4, 0, 0, 0, 0];
        // SAFETY: a valid socket and option buffer.
        let r = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::IPPROTO_IPV6,
                opt,
                ext.as_ptr().cast(),
                ext.len() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0, "setsockopt: {}", std::io::Error::last_os_error());
        s.set_read_timeout(Some(DROP_WAIT)).unwrap();
        s.send_to(b"ping", to).unwrap();
        let mut buf = [0u8; 16];
        match s.recv_from(&mut buf) {
            Ok((4, _)) if &buf[..4] == b"ping" => Outcome::Echoed,
            Ok(_) => Outcome::Error(-1),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Outcome::TimedOut
            }
            Err(e) => Outcome::Error(e.raw_os_error().unwrap_or(-1)),
        }
    })
}

/// How many tcx ingress programs are attached to `ifname` in the lab's inference namespace.
fn tc_ingress(lab: &Lab, ifname: &str) -> usize {
    lab.inference.run(|| match TcMode::of_kernel() {
        TcMode::Tcx => {
            aya::programs::SchedClassifier::query_tcx(ifname, aya::programs::TcAttachType::Ingress)
                .map(|(_, progs)| progs.len())
                .unwrap_or_else(|e| panic!("query tcx on {ifname}: {e}"))
        }
        // Before Linux 6.6: cls_bpf filters on the clsact qdisc, as `tc` lists them.
        TcMode::Netlink => {
            let out = std::process::Command::new("tc")
                .args(["filter", "show", "dev", ifname, "ingress"])
                .output()
                .expect("run tc");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.contains(" bpf ") && l.contains("direct-action"))
                .count()
        }
    })
}

/// A host that is both a gateway (pools, supervisor, worker) and an inference host: one
/// SIGHUP updates the pool set and the guard's allowlist together; a reload that would drop
/// the gateway side is refused and changes nothing.
#[test]
fn gateway_and_guard_on_one_host_reload_together() {
    let (model, lab, _echo) = lab_with_model();
    let port = model.port;
    let (pool1, pool2) = (PortReservation::new(), PortReservation::new());
    let mut daemon = Daemon::enforcing();
    let _gateway_cgroup = daemon.cgroup().child("gateway");
    let write_cfg = |daemon: &Daemon, pool: Option<u16>, guard: &str| {
        let pools = pool
            .map(|p| format!("[pools.gpu]\nhosts = [\"127.0.0.1:{p}\"]\n"))
            .unwrap_or_default();
        daemon.write_config(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n{pools}\
             [segmentation]\ngateway_cgroup = \"{}/gateway\"\npin_root = \"{}\"\n{guard}",
            daemon.cgroup().relative.display(),
            daemon.pin_root().display()
        ));
    };
    let (gw4, rogue4) = (host(Lab::GW4, 32), host(Lab::ROGUE4, 32));
    write_cfg(
        &daemon,
        Some(pool1.port),
        &guard_toml(port, &[&gw4], "cgroup_skb", &[]),
    );
    let (gw_to, rogue_to) = (sa(Lab::INF_GW4, port), sa(Lab::INF_ROGUE4, port));

    daemon.start_in(&lab.inference);
    daemon.wait_log("inference guard active");
    daemon.wait_log("worker started");
    let healthz = daemon.get("/healthz");
    let health = lab.inference.run(|| healthz.send()).unwrap();
    assert_eq!(
        health.status(),
        200,
        "the worker serves inside the inference host's namespace"
    );
    let st = daemon.segment_status();
    assert_eq!(st["installed"], true, "gateway side");
    assert_eq!(st["inference"]["installed"], true, "inference guard");
    assert_eq!(tcp_echo(&lab.gateway, gw_to, ok_wait()).0, Outcome::Echoed);
    assert_eq!(
        tcp_echo(&lab.rogue, rogue_to, DROP_WAIT).0,
        Outcome::TimedOut
    );

    // One SIGHUP: a new pool host and a new allowlist.
    write_cfg(
        &daemon,
        Some(pool2.port),
        &guard_toml(port, &[&rogue4], "cgroup_skb", &[]),
    );
    daemon.signal(SIGHUP);
    daemon.wait_log("config reloaded: routing and kernel policy");
    daemon.wait_log("inference guard reloaded");
    assert_rogue_in_gateway_out(&lab, rogue_to, gw_to, "the reloaded allowlist");
    let protected: Vec<String> = daemon.segment_status()["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["destination"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        protected
            .iter()
            .any(|d| d.ends_with(&format!(":{}", pool2.port)))
            && !protected
                .iter()
                .any(|d| d.ends_with(&format!(":{}", pool1.port))),
        "{protected:?}"
    );

    // Dropping the pools would turn this gateway into an inference host: refused.
    write_cfg(&daemon, None, &guard_toml(port, &[&gw4], "cgroup_skb", &[]));
    daemon.signal(SIGHUP);
    let refused = daemon.wait_log("config reload refused");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("removes the gateway side"),
        "{refused}"
    );
    assert_rogue_in_gateway_out(&lab, rogue_to, gw_to, "a refused reload changes nothing");
}

/// Fail closed: a guard the config asks for that cannot attach stops `moat serve` from
/// starting, with a message that names the cause, and leaves nothing pinned.
#[test]
fn daemon_refuses_to_start_when_the_guard_cannot_attach() {
    require_root();
    let model = PortReservation::new();
    let lab = Lab::new();
    let mut daemon = Daemon::enforcing();
    daemon.write_config(&format!(
        "[segmentation]\npin_root = \"{}\"\n{}",
        daemon.pin_root().display(),
        guard_toml(model.port, &[], "tc", &["nosuchif0"])
    ));
    let (status, text) = daemon.run_to_exit(Some(&lab.inference));
    assert!(
        !status.success(),
        "moat serve must refuse to start:\n{text}"
    );
    assert!(
        text.contains("the inference guard is required") && text.contains("nosuchif0"),
        "{text}"
    );
    assert!(
        !GuardPins::new(daemon.pins()).dir().exists(),
        "nothing half-installed is left behind"
    );
}
