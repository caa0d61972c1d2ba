//! moat's kernel programs.
//!
//! Gateway host: four `cgroup_sock_addr` hooks (connect4, connect6, sendmsg4, sendmsg6) attached
//! at the cgroup2 root. Each looks the destination up in the active policy slot's trie and
//! refuses (`EPERM`) a protected destination to any caller outside the gateway cgroup, and —
//! under egress lockdown — any destination the gateway itself was not granted.
//!
//! The policy is double-buffered (two slots, one `ACTIVE` index): the daemon fills the idle
//! slot and flips the index with one 4-byte write, so a program run sees one whole policy.
//!
//! The `cgroup_skb/egress` hook in [`egress`] judges the same policy once more, on the packet's
//! destination after NAT.
//!
//! Inference host: the ingress guard in [`guard`] (cgroup_skb and TC), with maps of its own.
#![no_std]
#![no_main]

mod egress;
mod guard;
mod ip;

use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
    },
    macros::{cgroup_sock_addr, map},
    maps::{Array, LpmTrie, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::SockAddrContext,
};
use moat_common::{
    COUNTERS, DenyEvent, DenyReason, Dest4, Dest6, EVENTS_BYTES, Hook, MAX_DESTINATIONS,
    PORT_PREFIX_BITS, SlotConfig, counter_index, dest, slot_flags,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

// Map names and program fn names are the ones in `moat_common::names`: `#[map]` takes only a
// literal, so they are spelled again here, and the daemon's test of the built object
// (`segment::object`) fails if the two drift apart.
#[map(name = "MOAT_ACTIVE")]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

#[map(name = "MOAT_SLOTS")]
static SLOTS: Array<SlotConfig> = Array::with_max_entries(2, 0);

#[map(name = "MOAT_DEST4_0")]
static DEST4_0: LpmTrie<Dest4, u32> = LpmTrie::with_max_entries(MAX_DESTINATIONS, 0);
#[map(name = "MOAT_DEST4_1")]
static DEST4_1: LpmTrie<Dest4, u32> = LpmTrie::with_max_entries(MAX_DESTINATIONS, 0);
#[map(name = "MOAT_DEST6_0")]
static DEST6_0: LpmTrie<Dest6, u32> = LpmTrie::with_max_entries(MAX_DESTINATIONS, 0);
#[map(name = "MOAT_DEST6_1")]
static DEST6_1: LpmTrie<Dest6, u32> = LpmTrie::with_max_entries(MAX_DESTINATIONS, 0);

#[map(name = "MOAT_COUNTERS")]
static COUNTER: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS, 0);

#[map(name = "MOAT_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, Hook::Connect4)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    judge_v4(&ctx, Hook::Sendmsg4)
}

#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, Hook::Connect6)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    judge_v6(&ctx, Hook::Sendmsg6)
}

/// The destination as the kernel hands it over: port and addresses in network byte order.
pub(crate) struct Destination {
    port: [u8; 2],
    family: u32,
    addr: [u8; 16],
}

#[inline(always)]
fn judge_v4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&sa.user_ip4.to_ne_bytes());
    judge(
        sa,
        hook,
        Destination {
            port: port_bytes(sa),
            family: 4,
            addr,
        },
    )
}

#[inline(always)]
fn judge_v6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let words = sa.user_ip6;
    // `::ffff:a.b.c.d` reaches the IPv4 host a.b.c.d, so it is judged by the IPv4 policy.
    let v4_mapped =
        words[0] == 0 && words[1] == 0 && words[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    let mut addr = [0u8; 16];
    if v4_mapped {
        addr[..4].copy_from_slice(&words[3].to_ne_bytes());
        return judge(
            sa,
            hook,
            Destination {
                port: port_bytes(sa),
                family: 4,
                addr,
            },
        );
    }
    let mut i = 0;
    while i < 4 {
        addr[i * 4..i * 4 + 4].copy_from_slice(&words[i].to_ne_bytes());
        i += 1;
    }
    judge(
        sa,
        hook,
        Destination {
            port: port_bytes(sa),
            family: 6,
            addr,
        },
    )
}

/// `user_port` holds the port in network byte order in its low 16 bits.
#[inline(always)]
fn port_bytes(sa: &bpf_sock_addr) -> [u8; 2] {
    (sa.user_port as u16).to_ne_bytes()
}

#[inline(always)]
fn judge(sa: &bpf_sock_addr, hook: Hook, dst: Destination) -> i32 {
    let slot_index = match ACTIVE.get(0) {
        Some(i) => *i & 1,
        None => 0,
    };
    // No slot config means the maps were never filled: refuse nothing rather than everything,
    // because the daemon writes the policy before it attaches any program.
    let Some(slot) = SLOTS.get(slot_index) else {
        return ALLOW;
    };
    let flags = lookup(slot_index, &dst);
    let lockdown = slot.flags & slot_flags::EGRESS_LOCKDOWN != 0;
    if flags & dest::PROTECTED == 0 && !lockdown {
        return verdict(sa, hook, &dst, None);
    }
    let in_gateway = slot.gateway_cgroup_id != 0
        && unsafe { bpf_get_current_ancestor_cgroup_id(slot.gateway_level as i32) }
            == slot.gateway_cgroup_id;
    let denied = if in_gateway {
        (lockdown && flags & dest::GATEWAY_EGRESS == 0).then_some(DenyReason::GatewayEgress)
    } else {
        (flags & dest::PROTECTED != 0).then_some(DenyReason::NotGateway)
    };
    verdict(sa, hook, &dst, denied)
}

/// The destination's flags in the given slot, 0 when no entry covers it.
#[inline(always)]
fn lookup(slot: u32, dst: &Destination) -> u32 {
    let found = if dst.family == 4 {
        let mut addr = [0u8; 4];
        addr.copy_from_slice(&dst.addr[..4]);
        let key = Key::new(
            PORT_PREFIX_BITS + 32,
            Dest4 {
                port: dst.port,
                addr,
            },
        );
        if slot == 0 {
            DEST4_0.get(&key)
        } else {
            DEST4_1.get(&key)
        }
    } else {
        let key = Key::new(
            PORT_PREFIX_BITS + 128,
            Dest6 {
                port: dst.port,
                addr: dst.addr,
            },
        );
        if slot == 0 {
            DEST6_0.get(&key)
        } else {
            DEST6_1.get(&key)
        }
    };
    found.copied().unwrap_or(0)
}

#[inline(always)]
fn verdict(sa: &bpf_sock_addr, hook: Hook, dst: &Destination, denied: Option<DenyReason>) -> i32 {
    count(counter_index(hook, denied.is_some()));
    let Some(reason) = denied else {
        return ALLOW;
    };
    if let Some(mut entry) = EVENTS.reserve::<DenyEvent>(0) {
        let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
        entry.write(DenyEvent {
            cgroup_id,
            pid: (bpf_get_current_pid_tgid() >> 32) as u32,
            port: u16::from_be_bytes(dst.port),
            hook: hook as u8,
            reason: reason as u8,
            protocol: sa.protocol,
            family: dst.family,
            addr: dst.addr,
        });
        entry.submit(0);
    } else {
        count(moat_common::EVENTS_LOST_COUNTER);
    }
    DENY
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = COUNTER.get_ptr_mut(index) {
        // Per-CPU slot: no other CPU writes it, and a cgroup hook does not nest on one CPU.
        unsafe { *c += 1 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
