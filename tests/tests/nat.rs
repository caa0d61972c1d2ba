//! No way around the connect hooks through NAT (root required; never skipped).
//!
//! The connect hooks judge the address a process passes to `connect()`; an nftables REDIRECT
//! or DNAT in the OUTPUT chain rewrites it afterwards. These tests write such rules (a table
//! of their own, loopback addresses and reserved ports only, deleted even when the test
//! fails), prove first that the rules really lead to the protected server, then that with
//! moat's hooks attached a process outside the gateway cgroup no longer gets through — the
//! `cgroup_egress` program judges the destination after NAT — while the gateway still reaches
//! its pools, also through a DNAT'd service address listed in its pools.
//!
//! A dropped SYN is not an error `connect()` reports: the kernel retransmits it until the
//! client gives up, so an outsider's TCP attempt ends in the probe's 2 s timeout (errno -1),
//! while a UDP `sendto()` fails with `EPERM`.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{Arc, Mutex},
    time::Duration,
};

use moat::segment::{Deny, DenyRecord, Enforcer};
use moat_tests::{
    kernel::{
        self, EPERM, NftTable, TestCgroup, TestPins, policy_for, require_root, try_from, unique,
    },
    netns::PortReservation,
};

/// What `moat-probe tcp` reports when its 2 s connect timeout ran out.
const TIMED_OUT: i32 = -1;

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// A UDP server on `[::]:port` (dual-stack) that records every datagram's source port.
fn udp_server(port: u16) -> Arc<Mutex<Vec<SocketAddr>>> {
    let sock = UdpSocket::bind(("::", port)).expect("bind the UDP server");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = sock.recv_from(&mut buf) {
            record.lock().unwrap().push(from);
        }
    });
    seen
}

/// REDIRECT and DNAT, IPv4 and IPv6, TCP and UDP, to a protected pool: refused to a process
/// outside the gateway cgroup once moat's hooks are attached (they all went through before);
/// the gateway reaches the pool directly and through the DNAT'd service addresses its pool
/// lists. Each refusal is a `cgroup_egress` deny event naming the post-NAT destination.
#[test]
fn nat_to_a_protected_pool_is_refused_outside_the_gateway() {
    require_root();
    // The protected inference server: TCP and UDP on one dual-stack port.
    let server = kernel::listener("[::]:0");
    let p = server.port();
    let received = udp_server(p);
    // Ports for the NAT'd addresses, held so nothing else on the machine uses them.
    let [redirect4, dnat4, dnat6, redirect6, svc4, svc6] =
        std::array::from_fn(|_| PortReservation::new());
    let nat = NftTable::new(&format!(
        "chain out {{
            type nat hook output priority -100;
            ip daddr 127.0.0.5 tcp dport {r4} redirect to :{p}
            ip daddr 127.0.0.6 meta l4proto {{ tcp, udp }} th dport {d4} dnat ip to 127.0.0.1:{p}
            ip6 daddr ::1 meta l4proto {{ tcp, udp }} th dport {d6} dnat ip6 to [::1]:{p}
            ip6 daddr ::1 tcp dport {r6} redirect to :{p}
            ip daddr 127.0.0.7 tcp dport {s4} dnat ip to 127.0.0.1:{p}
            ip6 daddr ::1 tcp dport {s6} dnat ip6 to [::1]:{p}
        }}",
        r4 = redirect4.port,
        d4 = dnat4.port,
        d6 = dnat6.port,
        r6 = redirect6.port,
        s4 = svc4.port,
        s6 = svc6.port,
    ));
    // The reserved ports' own sockets would answer nothing useful; the rules send every
    // attempt on to the server, which is what the controls below show.
    let around_tcp = [
        addr(&format!("127.0.0.5:{}", redirect4.port)),
        addr(&format!("127.0.0.6:{}", dnat4.port)),
        addr(&format!("[::1]:{}", dnat6.port)),
        addr(&format!("[::1]:{}", redirect6.port)),
    ];
    let around_udp = [
        addr(&format!("127.0.0.6:{}", dnat4.port)),
        addr(&format!("[::1]:{}", dnat6.port)),
    ];
    // Service addresses (as kube-proxy or Docker would have them) listed in the pool.
    let services = [
        addr(&format!("127.0.0.7:{}", svc4.port)),
        addr(&format!("[::1]:{}", svc6.port)),
    ];
    let direct = [addr(&format!("127.0.0.1:{p}")), addr(&format!("[::1]:{p}"))];

    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let (out, gw) = (Some(outsider.path()), Some(gateway.path()));

    // Control: without moat the rules lead an outsider to the server (so a refusal below is
    // moat's doing, and the rules do what they say).
    assert_eq!(
        try_from(out, "tcp", &around_tcp),
        [0; 4],
        "NAT'd TCP, unhooked"
    );
    assert_eq!(
        try_from(out, "udp", &around_udp),
        [0, 0],
        "NAT'd UDP, unhooked"
    );
    kernel::wait_until("the NAT'd datagrams at the server", || {
        received.lock().unwrap().len() >= 2
    });
    received.lock().unwrap().clear();

    let toml = format!(
        "[pools.gpu]\nhosts = [\"127.0.0.1:{p}\", \"[::1]:{p}\", \"{}\", \"{}\"]\n",
        services[0], services[1]
    );
    let pins = TestPins::new();
    let enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_for(&toml, &gateway)).unwrap();
    let mut events = enforcer.open_events().unwrap();
    while events.next().is_some() {}

    // The outsider: refused at connect() when it names the pool, and after NAT when it
    // names an address that is rewritten to the pool.
    assert_eq!(try_from(out, "tcp", &direct), [EPERM, EPERM], "direct");
    assert_eq!(
        try_from(out, "tcp", &around_tcp),
        [TIMED_OUT; 4],
        "REDIRECT/DNAT v4/v6 from outside the gateway cgroup: the SYN is dropped"
    );
    assert_eq!(
        try_from(out, "udp", &around_udp),
        [EPERM, EPERM],
        "DNAT'd UDP from outside the gateway cgroup"
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        received.lock().unwrap().is_empty(),
        "no datagram reached the server: {:?}",
        received.lock().unwrap()
    );

    // Each refusal after NAT is a deny event with the post-NAT destination and the
    // outsider's cgroup.
    let mut denies = Vec::new();
    while let Some(item) = events.next() {
        denies.push(Deny::decode(&item).expect("a decodable deny event"));
    }
    let egress: Vec<&Deny> = denies
        .iter()
        .filter(|d| d.hook == "cgroup_egress")
        .collect();
    for (ip, proto) in [
        ("127.0.0.1", "tcp"),
        ("::1", "tcp"),
        ("127.0.0.1", "udp"),
        ("::1", "udp"),
    ] {
        assert!(
            egress.iter().any(|d| d.addr.to_string() == ip
                && d.port == p
                && d.protocol == proto
                && d.reason == "not_gateway"
                && d.cgroup_id == outsider.cgroup.id),
            "a cgroup_egress deny for {proto} to {ip}:{p} from the outsider: {denies:#?}"
        );
    }
    let (hooks, _) = enforcer.hook_counts().unwrap();
    let counted = hooks.iter().find(|h| h.hook == "cgroup_egress").unwrap();
    assert!(counted.denied >= 6, "egress denies counted: {counted:?}");

    // The gateway: its pool directly, and through the DNAT'd service addresses its pool
    // lists (the egress program sees the protected server behind them, and lets the
    // gateway's cgroup through).
    assert_eq!(try_from(gw, "tcp", &direct), [0, 0], "gateway, direct");
    assert_eq!(
        try_from(gw, "tcp", &services),
        [0, 0],
        "gateway, DNAT'd pool"
    );
    let (hooks, _) = enforcer.hook_counts().unwrap();
    let after = hooks.iter().find(|h| h.hook == "cgroup_egress").unwrap();
    assert!(
        after.allowed >= counted.allowed + 4,
        "the gateway's SYNs were judged and allowed: {after:?}"
    );
    // The outsider cannot use the service addresses either: they are pool hosts.
    assert_eq!(
        try_from(out, "tcp", &services),
        [EPERM, EPERM],
        "service addresses"
    );
    drop(nat);
}
