//! Inference host: the ingress guard.
//!
//! Two hooks share one policy: `guard_cgroup_skb` (cgroup_skb ingress at the cgroup2 root —
//! every socket of the machine, loopback included) and `guard_tc` (TC/tcx ingress on the
//! interfaces the operator lists). A packet to a guarded model port passes only when its source
//! lies in an allowed gateway prefix for that port; with no prefix for a port, nothing reaches
//! it. Packets to other ports are not looked at beyond the port — except, on TC, an IPv6
//! header chain longer than the guard walks, which could hide a guarded port and is refused.
//!
//! The policy is double-buffered like the gateway side's: per slot a port map and two
//! allowed-source tries; the daemon fills the idle slot and flips `MOAT_IN_ACTIVE`.

use crate::ip::{self, IPPROTO_TCP, IPPROTO_UDP, Transport};
use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{cgroup_skb, classifier, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{SkBuffContext, TcContext, sk_buff::SkBuff},
};
use moat_common::{
    PORT_PREFIX_BITS,
    guard::{
        ANY_PORT_GUARDED, COUNTERS, EVENTS_BYTES, EVENTS_LOST_COUNTER, IngressDenyEvent,
        IngressHook, MAX_PORTS, MAX_SOURCES, PORT_GUARDED, Source4, Source6, counter_index,
    },
};

// Map names and program fn names are the ones in `moat_common::guard::names`; see the note in
// `main.rs`.
#[map(name = "MOAT_IN_ACTIVE")]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Guarded ports (host byte order) → flags, per slot.
#[map(name = "MOAT_IN_PORTS_0")]
static PORTS_0: HashMap<u16, u32> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map(name = "MOAT_IN_PORTS_1")]
static PORTS_1: HashMap<u16, u32> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map(name = "MOAT_IN_SRC4_0")]
static SRC4_0: LpmTrie<Source4, u32> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map(name = "MOAT_IN_SRC4_1")]
static SRC4_1: LpmTrie<Source4, u32> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map(name = "MOAT_IN_SRC6_0")]
static SRC6_0: LpmTrie<Source6, u32> = LpmTrie::with_max_entries(MAX_SOURCES, 0);
#[map(name = "MOAT_IN_SRC6_1")]
static SRC6_1: LpmTrie<Source6, u32> = LpmTrie::with_max_entries(MAX_SOURCES, 0);

#[map(name = "MOAT_IN_COUNTERS")]
static COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[map(name = "MOAT_IN_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
const ETH_HLEN: usize = 14;

/// cgroup_skb ingress: runs for every packet delivered to a socket, in any network namespace.
/// The guarded port is the receiving socket's own port (`local_port`, host byte order), so
/// no header trick (IPv6 extension headers, fragments) can hide it; the source comes from the
/// IP header, which starts at offset 0 here.
#[cgroup_skb(ingress)]
pub fn guard_cgroup_skb(ctx: SkBuffContext) -> i32 {
    let skb = &ctx.skb;
    // SAFETY: the kernel hands a valid __sk_buff; local_port and ifindex are readable fields
    // for cgroup_skb programs (skb->sk is the full receiving socket here).
    let (port, ifindex) = unsafe { ((*skb.skb).local_port as u16, (*skb.skb).ifindex) };
    let slot = active_slot();
    if !guarded(slot, port) {
        return 1;
    }
    // A packet whose source cannot be read is refused: the port is guarded.
    let pkt = parse_ip(skb, 0).unwrap_or(Packet::unknown());
    let pkt = Packet {
        dst_port: port,
        ..pkt
    };
    if pkt.family != 0 && allowed(slot, &pkt) {
        count(counter_index(IngressHook::CgroupSkb, false));
        return 1;
    }
    deny(IngressHook::CgroupSkb, ifindex, &pkt);
    0
}

/// TC ingress on an Ethernet-like interface: the headers are parsed from the frame. Packets
/// whose L4 ports cannot be found (not TCP/UDP, a non-first fragment — which cannot be
/// reassembled without its dropped first fragment) are left alone. "Allowed" is
/// `TC_ACT_UNSPEC` so later tcx programs on the interface still run.
#[classifier]
pub fn guard_tc(ctx: TcContext) -> i32 {
    let skb = &ctx.skb;
    let ifindex = unsafe { (*skb.skb).ifindex };
    let Some(pkt) = parse_frame(skb) else {
        return TC_ACT_UNSPEC;
    };
    let slot = active_slot();
    // An IPv6 header chain longer than the guard walks could hide a model port behind it:
    // refused while any port is guarded (legitimate traffic does not stack that many).
    if pkt.opaque && any_guarded(slot) {
        deny(IngressHook::Tc, ifindex, &pkt);
        return TC_ACT_SHOT as i32;
    }
    if pkt.dst_port == 0 {
        return TC_ACT_UNSPEC;
    }
    if !guarded(slot, pkt.dst_port) {
        return TC_ACT_UNSPEC;
    }
    if allowed(slot, &pkt) {
        count(counter_index(IngressHook::Tc, false));
        return TC_ACT_UNSPEC;
    }
    deny(IngressHook::Tc, ifindex, &pkt);
    TC_ACT_SHOT as i32
}

/// What the guard reads from a packet. Addresses in network byte order, ports in host order
/// (0 when not found), family 0 when the IP header could not be read; `opaque` when the IPv6
/// extension headers go on past the ones the guard walks.
#[derive(Clone, Copy)]
struct Packet {
    opaque: bool,
    family: u8,
    protocol: u8,
    src_port: u16,
    dst_port: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

impl Packet {
    const fn unknown() -> Packet {
        Packet {
            opaque: false,
            family: 0,
            protocol: 0,
            src_port: 0,
            dst_port: 0,
            src: [0; 16],
            dst: [0; 16],
        }
    }
}

#[inline(always)]
fn parse_frame(skb: &SkBuff) -> Option<Packet> {
    let mut proto = u16::from_be_bytes(skb.load::<[u8; 2]>(12).ok()?);
    let mut l3 = ETH_HLEN;
    // One VLAN tag (when the NIC did not strip it into the skb's metadata).
    if proto == ETH_P_8021Q || proto == ETH_P_8021AD {
        proto = u16::from_be_bytes(skb.load::<[u8; 2]>(16).ok()?);
        l3 += 4;
    }
    if proto != ETH_P_IP && proto != ETH_P_IPV6 {
        return None;
    }
    parse_ip(skb, l3)
}

/// Parses the IP header at `off` and, for TCP/UDP, the ports.
#[inline(always)]
fn parse_ip(skb: &SkBuff, off: usize) -> Option<Packet> {
    let ip = ip::parse(skb, off)?;
    let mut pkt = Packet {
        opaque: false,
        family: ip.family,
        protocol: ip.protocol,
        src_port: 0,
        dst_port: 0,
        src: ip.src,
        dst: ip.dst,
    };
    let l4 = match ip.transport {
        Transport::At(l4) => l4,
        Transport::LaterFragment => return Some(pkt),
        Transport::Opaque => {
            pkt.opaque = true;
            return Some(pkt);
        }
    };
    // The source is judged by the IPv4 allowlist when it is IPv4-mapped.
    if let Some(v4) = ip::v4_mapped(&pkt.src).filter(|_| pkt.family == 6) {
        pkt.family = 4;
        pkt.src = v4;
    }
    if pkt.protocol == IPPROTO_TCP || pkt.protocol == IPPROTO_UDP {
        let ports: [u8; 4] = skb.load(l4).ok()?;
        pkt.src_port = u16::from_be_bytes([ports[0], ports[1]]);
        pkt.dst_port = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Some(pkt)
}

#[inline(always)]
fn active_slot() -> u32 {
    match ACTIVE.get(0) {
        Some(i) => *i & 1,
        None => 0,
    }
}

/// The flags of `port` in the slot's port map (0: not there).
#[inline(always)]
fn port_flags(slot: u32, port: u16) -> u32 {
    // SAFETY: the value is only read, and map values stay valid during the program run.
    let v = unsafe {
        if slot == 0 {
            PORTS_0.get(&port)
        } else {
            PORTS_1.get(&port)
        }
    };
    v.copied().unwrap_or(0)
}

#[inline(always)]
fn guarded(slot: u32, port: u16) -> bool {
    port_flags(slot, port) == PORT_GUARDED
}

/// Whether the slot guards any port at all (key 0 is the daemon's marker).
#[inline(always)]
fn any_guarded(slot: u32) -> bool {
    port_flags(slot, 0) == ANY_PORT_GUARDED
}

#[inline(always)]
fn allowed(slot: u32, pkt: &Packet) -> bool {
    let port = pkt.dst_port.to_be_bytes();
    if pkt.family == 4 {
        let key = Key::new(
            PORT_PREFIX_BITS + 32,
            Source4 {
                port,
                addr: [pkt.src[0], pkt.src[1], pkt.src[2], pkt.src[3]],
            },
        );
        if slot == 0 {
            SRC4_0.get(&key).is_some()
        } else {
            SRC4_1.get(&key).is_some()
        }
    } else {
        let key = Key::new(
            PORT_PREFIX_BITS + 128,
            Source6 {
                port,
                addr: pkt.src,
            },
        );
        if slot == 0 {
            SRC6_0.get(&key).is_some()
        } else {
            SRC6_1.get(&key).is_some()
        }
    }
}

#[inline(always)]
fn deny(hook: IngressHook, ifindex: u32, pkt: &Packet) {
    count(counter_index(hook, true));
    if let Some(mut entry) = EVENTS.reserve::<IngressDenyEvent>(0) {
        entry.write(IngressDenyEvent {
            ifindex,
            src_port: pkt.src_port,
            dst_port: pkt.dst_port,
            hook: hook as u8,
            protocol: pkt.protocol,
            family: pkt.family,
            _pad: 0,
            src: pkt.src,
            dst: pkt.dst,
        });
        entry.submit(0);
    } else {
        count(EVENTS_LOST_COUNTER);
    }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTER.get_ptr_mut(index) {
        // Per-CPU slot; a packet hook does not nest with itself on one CPU.
        unsafe { *c += 1 };
    }
}
