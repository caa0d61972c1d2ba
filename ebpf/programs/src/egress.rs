//! Gateway host: the `cgroup_skb/egress` hook, which judges connection attempts by their
//! destination **after NAT**.
//!
//! The connect hooks judge the address a process passes to `connect()`/`sendto()`. Whatever
//! rewrites it afterwards — an `iptables`/`nft` REDIRECT or DNAT in the OUTPUT chain (Docker
//! published ports without the userland proxy, kube-proxy service addresses), another
//! socket-level load balancer — would walk around them. This program runs in
//! `ip_finish_output`/`ip6_finish_output`, after netfilter's LOCAL_OUT (where OUTPUT nat
//! rewrites the destination) and POST_ROUTING hooks, so the IP header it reads holds the
//! destination the packet really goes to. It drops, for every cgroup but the gateway's, TCP
//! connection attempts (SYN without ACK) and UDP datagrams whose destination is protected,
//! against the same policy slot, counters and deny events as the connect hooks.
//!
//! Everything else (established TCP, other protocols) passes after reading the headers, so
//! bulk traffic pays two `bpf_skb_load_bytes` per packet (per GSO super-packet).

use aya_ebpf::{
    helpers::{bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id},
    macros::cgroup_skb,
    programs::{SkBuffContext, sk_buff::SkBuff},
};
use moat_common::{DenyEvent, DenyReason, Hook, counter_index, dest};

use crate::{
    ACTIVE, ALLOW, DENY, Destination, EVENTS, SLOTS, count,
    ip::{self, IPPROTO_TCP, IPPROTO_UDP, Transport},
    lookup,
};
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A packet whose destination is judged: its protocol and post-NAT destination.
struct Attempt {
    protocol: u8,
    dst: Destination,
}

/// What the parser found.
enum Parsed {
    /// Not a connection attempt (established TCP, other protocols, non-first fragments).
    Pass,
    /// A TCP SYN or a UDP datagram.
    Judge(Attempt),
    /// An IPv6 extension header chain longer than the program walks: the port cannot be
    /// found, so a caller outside the gateway cgroup is refused it (legitimate traffic does
    /// not stack that many).
    Opaque(Attempt),
}

#[cgroup_skb(egress)]
pub fn cgroup_egress(ctx: SkBuffContext) -> i32 {
    let skb = &ctx.skb;
    let attempt = match parse(skb) {
        Some(Parsed::Judge(a)) => a,
        Some(Parsed::Opaque(a)) => {
            return if in_gateway(skb) {
                ALLOW
            } else {
                deny(skb, &a)
            };
        }
        // Unreadable headers: nothing the connect hooks would judge either.
        Some(Parsed::Pass) | None => return ALLOW,
    };
    let slot_index = match ACTIVE.get(0) {
        Some(i) => *i & 1,
        None => 0,
    };
    let flags = lookup(slot_index, &attempt.dst);
    // The gateway's own reach (egress lockdown) is judged at connect(), where the address is
    // the one it asked for; here only protected destinations matter.
    if flags & dest::PROTECTED == 0 || in_gateway(skb) {
        count(counter_index(Hook::Egress, false));
        return ALLOW;
    }
    deny(skb, &attempt)
}

/// Whether the packet's socket belongs to the gateway cgroup or a cgroup below it.
#[inline(always)]
fn in_gateway(skb: &SkBuff) -> bool {
    let slot_index = match ACTIVE.get(0) {
        Some(i) => *i & 1,
        None => 0,
    };
    let Some(slot) = SLOTS.get(slot_index) else {
        // No policy written yet (see `judge` in main.rs): refuse nothing.
        return true;
    };
    // SAFETY: the kernel hands a valid __sk_buff; the helper reads the socket's cgroup.
    slot.gateway_cgroup_id != 0
        && unsafe { bpf_skb_ancestor_cgroup_id(skb.skb, slot.gateway_level as i32) }
            == slot.gateway_cgroup_id
}

#[inline(always)]
fn deny(skb: &SkBuff, attempt: &Attempt) -> i32 {
    count(counter_index(Hook::Egress, true));
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        // SAFETY: as in `in_gateway`.
        let cgroup_id = unsafe { bpf_skb_cgroup_id(skb.skb) };
        entry.write(DenyEvent {
            cgroup_id,
            pid: 0,
            port: u16::from_be_bytes(attempt.dst.port),
            hook: Hook::Egress as u8,
            reason: DenyReason::NotGateway as u8,
            protocol: attempt.protocol as u32,
            family: attempt.dst.family,
            addr: attempt.dst.addr,
        });
        entry.submit(0);
    } else {
        count(moat_common::EVENTS_LOST_COUNTER);
    }
    DENY
}

/// Reads the IP header (at offset 0 in a cgroup_skb program) and the TCP flags or UDP ports.
#[inline(always)]
fn parse(skb: &SkBuff) -> Option<Parsed> {
    let ip = ip::parse(skb, 0)?;
    let mut dst = Destination {
        port: [0; 2],
        family: ip.family as u32,
        addr: ip.dst,
    };
    if let Some(v4) = ip::v4_mapped(&ip.dst).filter(|_| ip.family == 6) {
        dst.family = 4;
        dst.addr = v4;
    }
    let l4 = match ip.transport {
        Transport::At(l4) => l4,
        // A non-first fragment carries no L4 header (and its first fragment was judged).
        Transport::LaterFragment => return Some(Parsed::Pass),
        Transport::Opaque => {
            return Some(Parsed::Opaque(Attempt {
                protocol: ip.protocol,
                dst,
            }));
        }
    };
    if ip.protocol == IPPROTO_TCP {
        // Ports (0..4) and flags (13).
        let t: [u8; 14] = skb.load(l4).ok()?;
        if t[13] & (TCP_SYN | TCP_ACK) != TCP_SYN {
            return Some(Parsed::Pass);
        }
        dst.port = [t[2], t[3]];
    } else if ip.protocol == IPPROTO_UDP {
        let u: [u8; 4] = skb.load(l4).ok()?;
        dst.port = [u[2], u[3]];
    } else {
        return Some(Parsed::Pass);
    }
    Some(Parsed::Judge(Attempt {
        protocol: ip.protocol,
        dst,
    }))
}
