//! Deny events from the kernel: decoding the ring buffer records and logging them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_common::{DenyEvent, DenyReason, Hook};
use serde::Serialize;

/// A decoded deny event, as it goes to the log (and later the audit trail).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deny {
    pub pid: u32,
    pub cgroup_id: u64,
    pub hook: &'static str,
    pub reason: &'static str,
    pub protocol: &'static str,
    pub addr: IpAddr,
    pub port: u16,
}

impl Deny {
    /// Decodes one ring buffer record; `None` for a record of the wrong size or with unknown
    /// enum values (a newer program than this daemon).
    pub fn decode(bytes: &[u8]) -> Option<Deny> {
        if bytes.len() < size_of::<DenyEvent>() {
            return None;
        }
        // SAFETY: the length is checked and DenyEvent is plain old data; the record may be
        // unaligned, hence read_unaligned.
        let ev: DenyEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        let addr = match ev.family {
            4 => IpAddr::V4(Ipv4Addr::new(
                ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3],
            )),
            6 => IpAddr::V6(Ipv6Addr::from(ev.addr)),
            _ => return None,
        };
        Some(Deny {
            pid: ev.pid,
            cgroup_id: ev.cgroup_id,
            hook: Hook::from_u8(ev.hook)?.program_name(),
            reason: match DenyReason::from_u8(ev.reason)? {
                DenyReason::NotGateway => "not_gateway",
                DenyReason::GatewayEgress => "gateway_egress",
            },
            protocol: match ev.protocol as i32 {
                libc::IPPROTO_TCP => "tcp",
                libc::IPPROTO_UDP => "udp",
                _ => "other",
            },
            addr,
            port: ev.port,
        })
    }

    pub fn log(&self) {
        tracing::warn!(
            event = "kernel_deny",
            pid = self.pid,
            cgroup_id = self.cgroup_id,
            hook = self.hook,
            reason = self.reason,
            protocol = self.protocol,
            dst_addr = %self.addr,
            dst_port = self.port,
            "connection refused by the kernel"
        );
    }
}
