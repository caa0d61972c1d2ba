//! The gateway side's deny events: what a refused connection's record holds, and its log line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_common::{DenyEvent, DenyReason, Hook};
use serde::Serialize;

use crate::segment::events::{self, DenyRecord};

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

impl DenyRecord for Deny {
    type Raw = DenyEvent;
    const KIND: &'static str = "deny-event";
    const SUPPRESSED_EVENT: &'static str = "kernel_deny_suppressed";
    const SIDE: &'static str = "gateway";

    fn from_raw(ev: DenyEvent) -> Option<Deny> {
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
            protocol: events::protocol_name(ev.protocol as i32),
            addr,
            port: ev.port,
        })
    }

    fn log(&self) {
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

    fn audit(&self) -> crate::audit::Event {
        crate::audit::Event::KernelDeny {
            side: Self::SIDE.into(),
            hook: self.hook.into(),
            detail: [
                ("pid", self.pid.to_string()),
                ("cgroup_id", self.cgroup_id.to_string()),
                ("reason", self.reason.into()),
                ("protocol", self.protocol.into()),
                ("dst_addr", self.addr.to_string()),
                ("dst_port", self.port.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(ev: DenyEvent) -> Vec<u8> {
        events::raw_bytes(&ev)
    }

    #[test]
    fn decodes_ipv4_and_ipv6_records() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[10, 0, 0, 7]);
        let ev = DenyEvent {
            cgroup_id: 42,
            pid: 7,
            port: 8000,
            hook: 2,
            reason: 1,
            protocol: 17,
            family: 4,
            addr,
        };
        let d = Deny::decode(&raw(ev)).unwrap();
        assert_eq!((d.pid, d.cgroup_id, d.port), (7, 42, 8000));
        assert_eq!(
            (d.hook, d.reason, d.protocol),
            ("sendmsg4", "gateway_egress", "udp")
        );
        assert_eq!(d.addr.to_string(), "10.0.0.7");

        let ev = DenyEvent {
            family: 6,
            addr: std::net::Ipv6Addr::LOCALHOST.octets(),
            hook: 1,
            reason: 0,
            protocol: 6,
            ..ev
        };
        let d = Deny::decode(&raw(ev)).unwrap();
        assert_eq!(
            (d.hook, d.reason, d.protocol),
            ("connect6", "not_gateway", "tcp")
        );
        assert_eq!(d.addr.to_string(), "::1");
    }

    #[test]
    fn refuses_short_or_unknown_records() {
        let ev = DenyEvent {
            cgroup_id: 1,
            pid: 1,
            port: 1,
            hook: 9,
            reason: 0,
            protocol: 6,
            family: 4,
            addr: [0; 16],
        };
        assert_eq!(Deny::decode(&raw(ev)), None, "unknown hook");
        assert_eq!(Deny::decode(&raw(ev)[..10]), None, "short record");
    }
}
