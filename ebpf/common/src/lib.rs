//! The `#[repr(C)]` types and constants that moat's eBPF programs and the daemon share.
//!
//! Everything a map holds is defined here once, so the kernel side and the userspace side can
//! never disagree on a layout. With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Bumped whenever a map layout or a program's contract changes. Pins live under
/// `<pin root>/v<SCHEMA_VERSION>/`, so a daemon never adopts maps it cannot read.
pub const SCHEMA_VERSION: u32 = 1;

/// Capacity of each protected-destination trie (per address family, per policy slot).
pub const MAX_DESTINATIONS: u32 = 65_536;

/// Ring buffer size for deny events (bytes, a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// The names of the gateway side's maps and programs in the eBPF object, which are also the file
/// names of their pins. aya-ebpf's `#[map(name = ...)]` takes only a literal, so
/// `ebpf/programs/src/main.rs` spells each name again; a unit test of the daemon
/// (`segment::object`) checks the built object holds exactly these names.
pub mod names {
    pub const MAP_ACTIVE: &str = "MOAT_ACTIVE";
    pub const MAP_SLOTS: &str = "MOAT_SLOTS";
    pub const MAP_DEST4: [&str; 2] = ["MOAT_DEST4_0", "MOAT_DEST4_1"];
    pub const MAP_DEST6: [&str; 2] = ["MOAT_DEST6_0", "MOAT_DEST6_1"];
    pub const MAP_COUNTERS: &str = "MOAT_COUNTERS";
    pub const MAP_EVENTS: &str = "MOAT_EVENTS";

    /// Every map of the gateway side.
    pub const MAPS: [&str; 8] = [
        MAP_ACTIVE,
        MAP_SLOTS,
        MAP_DEST4[0],
        MAP_DEST4[1],
        MAP_DEST6[0],
        MAP_DEST6[1],
        MAP_COUNTERS,
        MAP_EVENTS,
    ];

    pub const PROG_CONNECT4: &str = "connect4";
    pub const PROG_CONNECT6: &str = "connect6";
    pub const PROG_SENDMSG4: &str = "sendmsg4";
    pub const PROG_SENDMSG6: &str = "sendmsg6";
    /// The `cgroup_skb/egress` program that judges packets after NAT.
    pub const PROG_EGRESS: &str = "cgroup_egress";
}

/// Flags stored as the value of a destination trie entry.
pub mod dest {
    /// Only the gateway cgroup (and its descendants) may reach this destination.
    pub const PROTECTED: u32 = 1 << 0;
    /// The gateway cgroup may reach this destination (pools and `egress_allow`).
    pub const GATEWAY_EGRESS: u32 = 1 << 1;
}

/// Key of the IPv4 destination tries: the port is matched exactly (first 16 bits of the prefix),
/// the address by longest prefix. Both are in network byte order, as the kernel hands them over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest4 {
    pub port: [u8; 2],
    pub addr: [u8; 4],
}

/// Key of the IPv6 destination tries; see [`Dest4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dest6 {
    pub port: [u8; 2],
    pub addr: [u8; 16],
}

/// Bits of a trie key taken by the port, which is always matched exactly.
pub const PORT_PREFIX_BITS: u32 = 16;

/// The identity and switches of one policy slot. The maps hold two slots; the daemon writes the
/// idle one completely and then flips [`ACTIVE_SLOT`](self) so every program run sees one whole
/// policy, never half of each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotConfig {
    /// cgroup id (cgroupfs inode) of the gateway cgroup; 0 means "no gateway": all protected
    /// destinations are refused to everyone.
    pub gateway_cgroup_id: u64,
    /// Depth of the gateway cgroup below the cgroup2 root (root = 0).
    pub gateway_level: u32,
    /// [`slot_flags`] bits.
    pub flags: u32,
}

pub mod slot_flags {
    /// Refuse the gateway cgroup every destination without [`super::dest::GATEWAY_EGRESS`].
    pub const EGRESS_LOCKDOWN: u32 = 1 << 0;
}

/// Which hook produced a counter or an event.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hook {
    Connect4 = 0,
    Connect6 = 1,
    Sendmsg4 = 2,
    Sendmsg6 = 3,
    /// `cgroup_skb/egress`: TCP SYNs and UDP datagrams judged by their destination after NAT
    /// (netfilter's OUTPUT and POSTROUTING hooks, socket-level load balancers).
    Egress = 4,
}

impl Hook {
    pub const ALL: [Hook; 5] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
        Hook::Egress,
    ];

    /// The `cgroup_sock_addr` hooks, which judge the address a process passes.
    pub const SOCK_ADDR: [Hook; 4] = [
        Hook::Connect4,
        Hook::Connect6,
        Hook::Sendmsg4,
        Hook::Sendmsg6,
    ];

    pub fn from_u8(v: u8) -> Option<Hook> {
        Self::ALL.get(v as usize).copied()
    }

    /// The name of the program (and of its pinned link) in the eBPF object.
    pub fn program_name(self) -> &'static str {
        match self {
            Hook::Connect4 => names::PROG_CONNECT4,
            Hook::Connect6 => names::PROG_CONNECT6,
            Hook::Sendmsg4 => names::PROG_SENDMSG4,
            Hook::Sendmsg6 => names::PROG_SENDMSG6,
            Hook::Egress => names::PROG_EGRESS,
        }
    }
}

/// Why a hook refused a connection.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// A caller outside the gateway cgroup targeted a protected destination.
    NotGateway = 0,
    /// The gateway cgroup targeted a destination outside its pools and `egress_allow`.
    GatewayEgress = 1,
}

impl DenyReason {
    pub fn from_u8(v: u8) -> Option<DenyReason> {
        match v {
            0 => Some(DenyReason::NotGateway),
            1 => Some(DenyReason::GatewayEgress),
            _ => None,
        }
    }
}

/// Per-CPU counter slots: `hook * 2 + verdict` (verdict 0 = allowed, 1 = denied), then one
/// slot counting deny events lost because the ring buffer was full. (Before the egress hook
/// the array had 9 slots; a daemon that finds such a pinned array replaces it.)
pub const COUNTERS: u32 = 11;
pub const EVENTS_LOST_COUNTER: u32 = 10;

pub fn counter_index(hook: Hook, denied: bool) -> u32 {
    hook as u32 * 2 + denied as u32
}

/// One refused connection, sent through the events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DenyEvent {
    pub cgroup_id: u64,
    /// 0 from the egress hook: a packet hook does not know the sending process (it may run
    /// in softirq context), only the socket's cgroup.
    pub pid: u32,
    /// Destination port, host byte order.
    pub port: u16,
    /// [`Hook`] as u8.
    pub hook: u8,
    /// [`DenyReason`] as u8.
    pub reason: u8,
    /// IP protocol (6 TCP, 17 UDP) as the socket (connect hooks) or the packet (egress)
    /// reports it.
    pub protocol: u32,
    /// 4 (IPv4, address in the first 4 bytes) or 6.
    pub family: u32,
    /// Destination address, network byte order.
    pub addr: [u8; 16],
}

/// Inference host: the ingress guard's shared types. The guard drops packets to a model port
/// unless their source lies in an allowed gateway prefix for that port.
pub mod guard {
    /// The names of the guard's maps and programs in the eBPF object (and of their pins); see
    /// [`crate::names`] for why `ebpf/programs/src/guard.rs` spells them again.
    pub mod names {
        pub const MAP_ACTIVE: &str = "MOAT_IN_ACTIVE";
        pub const MAP_PORTS: [&str; 2] = ["MOAT_IN_PORTS_0", "MOAT_IN_PORTS_1"];
        pub const MAP_SRC4: [&str; 2] = ["MOAT_IN_SRC4_0", "MOAT_IN_SRC4_1"];
        pub const MAP_SRC6: [&str; 2] = ["MOAT_IN_SRC6_0", "MOAT_IN_SRC6_1"];
        pub const MAP_COUNTERS: &str = "MOAT_IN_COUNTERS";
        pub const MAP_EVENTS: &str = "MOAT_IN_EVENTS";

        /// Every map of the guard.
        pub const MAPS: [&str; 9] = [
            MAP_ACTIVE,
            MAP_PORTS[0],
            MAP_PORTS[1],
            MAP_SRC4[0],
            MAP_SRC4[1],
            MAP_SRC6[0],
            MAP_SRC6[1],
            MAP_COUNTERS,
            MAP_EVENTS,
        ];

        pub const PROG_CGROUP_SKB: &str = "guard_cgroup_skb";
        pub const PROG_TC: &str = "guard_tc";
    }

    /// Capacity of each guarded-port map (per policy slot).
    pub const MAX_PORTS: u32 = 1024;
    /// Capacity of each allowed-source trie (per address family, per policy slot).
    pub const MAX_SOURCES: u32 = 65_536;
    /// Ring buffer size for ingress deny events.
    pub const EVENTS_BYTES: u32 = 256 * 1024;

    /// Value of a guarded-port entry: the port is guarded.
    pub const PORT_GUARDED: u32 = 1;
    /// Key 0 (never a model port) marks a slot that guards at least one port, with this value;
    /// the TC hook refuses packets it cannot fully parse only then.
    pub const ANY_PORT_GUARDED: u32 = 2;

    /// Key of the IPv4 allowed-source tries: the model port (destination, matched exactly as
    /// the first 16 bits of the prefix) and the source prefix, both in network byte order.
    /// Keying by port keeps one installation's verdicts to its own ports.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Source4 {
        pub port: [u8; 2],
        pub addr: [u8; 4],
    }

    /// Key of the IPv6 allowed-source tries; see [`Source4`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Source6 {
        pub port: [u8; 2],
        pub addr: [u8; 16],
    }

    /// Which ingress hook judged a packet.
    #[repr(u8)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum IngressHook {
        /// `cgroup_skb/ingress` at the cgroup2 root: every socket of the machine, loopback too.
        CgroupSkb = 0,
        /// TC (tcx) ingress on one interface.
        Tc = 1,
    }

    impl IngressHook {
        pub const ALL: [IngressHook; 2] = [IngressHook::CgroupSkb, IngressHook::Tc];

        pub fn from_u8(v: u8) -> Option<IngressHook> {
            Self::ALL.get(v as usize).copied()
        }

        /// The name of the program in the eBPF object.
        pub fn program_name(self) -> &'static str {
            match self {
                IngressHook::CgroupSkb => names::PROG_CGROUP_SKB,
                IngressHook::Tc => names::PROG_TC,
            }
        }

        pub fn label(self) -> &'static str {
            match self {
                IngressHook::CgroupSkb => "cgroup_skb",
                IngressHook::Tc => "tc",
            }
        }
    }

    /// Per-CPU counter slots: `hook * 2 + verdict` (0 allowed, 1 dropped) for packets to a
    /// guarded port, then one slot counting deny events lost to a full ring buffer.
    pub const COUNTERS: u32 = 5;
    pub const EVENTS_LOST_COUNTER: u32 = 4;

    pub fn counter_index(hook: IngressHook, denied: bool) -> u32 {
        hook as u32 * 2 + denied as u32
    }

    /// One dropped packet, sent through the guard's ring buffer.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct IngressDenyEvent {
        /// Interface the packet arrived on.
        pub ifindex: u32,
        /// Source and destination ports, host byte order (source 0 when not parsed).
        pub src_port: u16,
        pub dst_port: u16,
        /// [`IngressHook`] as u8.
        pub hook: u8,
        /// IP protocol from the packet (6 TCP, 17 UDP, other values as found).
        pub protocol: u8,
        /// 4 (addresses in the first 4 bytes) or 6.
        pub family: u8,
        pub _pad: u8,
        /// Source and destination addresses, network byte order.
        pub src: [u8; 16],
        pub dst: [u8; 16],
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding-dependent invariants.
    unsafe impl aya::Pod for super::Dest4 {}
    unsafe impl aya::Pod for super::Dest6 {}
    unsafe impl aya::Pod for super::SlotConfig {}
    unsafe impl aya::Pod for super::DenyEvent {}
    unsafe impl aya::Pod for super::guard::Source4 {}
    unsafe impl aya::Pod for super::guard::Source6 {}
    unsafe impl aya::Pod for super::guard::IngressDenyEvent {}
}
