//! The IP header walk both packet hooks share: the gateway host's `cgroup_egress` (which judges
//! the destination after NAT) and the inference host's guard (which judges the source). One
//! walk, so both read fragments and IPv6 extension headers by the same rules.
//!
//! Each `bpf_skb_load_bytes` is a helper call, so the fixed header is read in as few of them
//! as possible (one for IPv4, two for IPv6).

use aya_ebpf::programs::sk_buff::SkBuff;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;

/// IPv6 extension headers the walk steps over (hop-by-hop, routing, destination options) and
/// the fragment header, which it reads.
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST_OPTIONS: u8 = 60;
/// At most this many extension headers are walked (a bounded loop for the verifier);
/// legitimate traffic does not stack more.
const MAX_EXTENSION_HEADERS: usize = 4;

/// Where the transport header is, as far as the walk could tell.
#[derive(Clone, Copy)]
pub enum Transport {
    /// At this offset of the packet.
    At(usize),
    /// A non-first fragment: it carries no transport header (its first fragment did).
    LaterFragment,
    /// An IPv6 extension header chain longer than the walk follows: the transport header,
    /// and so the port, cannot be found.
    Opaque,
}

/// The IP header's fields the hooks judge by. Addresses in network byte order, an IPv4
/// address in the first four bytes.
#[derive(Clone, Copy)]
pub struct IpHeader {
    /// 4 or 6.
    pub family: u8,
    /// The transport protocol: for IPv6 the next header after the walked extension headers
    /// (the last one seen when the chain is opaque).
    pub protocol: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub transport: Transport,
}

/// Reads the IP header at `off` (0 in a cgroup_skb program, after the link-layer header on
/// TC). `None` when it is neither IPv4 nor IPv6 or cannot be read.
#[inline(always)]
pub fn parse(skb: &SkBuff, off: usize) -> Option<IpHeader> {
    let h: [u8; 20] = skb.load(off).ok()?;
    let mut ip = IpHeader {
        family: 0,
        protocol: 0,
        src: [0; 16],
        dst: [0; 16],
        transport: Transport::Opaque,
    };
    match h[0] >> 4 {
        4 => {
            ip.family = 4;
            ip.protocol = h[9];
            ip.src[..4].copy_from_slice(&h[12..16]);
            ip.dst[..4].copy_from_slice(&h[16..20]);
            ip.transport = if u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0 {
                Transport::LaterFragment
            } else {
                Transport::At(off + ((h[0] & 0x0f) as usize) * 4)
            };
        }
        6 => {
            let rest: [u8; 20] = skb.load(off + 20).ok()?;
            ip.family = 6;
            ip.src[..12].copy_from_slice(&h[8..20]);
            ip.src[12..].copy_from_slice(&rest[..4]);
            ip.dst.copy_from_slice(&rest[4..20]);
            let mut next = h[6];
            let mut at = off + 40;
            let mut i = 0;
            while i < MAX_EXTENSION_HEADERS {
                match next {
                    HOP_BY_HOP | ROUTING | DEST_OPTIONS => {
                        let e: [u8; 2] = skb.load(at).ok()?;
                        next = e[0];
                        at += (e[1] as usize + 1) * 8;
                    }
                    FRAGMENT => {
                        let e: [u8; 4] = skb.load(at).ok()?;
                        next = e[0];
                        if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                            ip.protocol = next;
                            ip.transport = Transport::LaterFragment;
                            return Some(ip);
                        }
                        at += 8;
                    }
                    _ => break,
                }
                i += 1;
            }
            ip.protocol = next;
            ip.transport = if matches!(next, HOP_BY_HOP | ROUTING | FRAGMENT | DEST_OPTIONS) {
                Transport::Opaque
            } else {
                Transport::At(at)
            };
        }
        _ => return None,
    }
    Some(ip)
}

/// `::ffff:a.b.c.d` is the IPv4 host a.b.c.d everywhere in moat (the config folds such
/// addresses to IPv4 too), so it is judged against the IPv4 tries: the IPv4 address in the
/// first four bytes, or `None` when `addr` is not IPv4-mapped.
#[inline(always)]
pub fn v4_mapped(addr: &[u8; 16]) -> Option<[u8; 16]> {
    if addr[..12] != [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff] {
        return None;
    }
    let mut v4 = [0u8; 16];
    v4[..4].copy_from_slice(&addr[12..16]);
    Some(v4)
}
