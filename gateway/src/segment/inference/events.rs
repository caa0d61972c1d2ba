//! The guard's deny events: what a dropped packet's record holds, and its log line.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use moat_common::guard::{IngressDenyEvent, IngressHook};
use serde::Serialize;

use crate::segment::events::{self, DenyRecord};

/// A decoded ingress deny event, as it goes to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IngressDeny {
    pub hook: &'static str,
    pub ifindex: u32,
    pub protocol: &'static str,
    pub src_addr: IpAddr,
    pub src_port: u16,
    pub dst_addr: IpAddr,
    pub dst_port: u16,
}

impl DenyRecord for IngressDeny {
    type Raw = IngressDenyEvent;
    const KIND: &'static str = "ingress deny-event";
    const SUPPRESSED_EVENT: &'static str = "kernel_ingress_deny_suppressed";
    const SIDE: &'static str = "inference";

    fn from_raw(ev: IngressDenyEvent) -> Option<IngressDeny> {
        let addr = |b: [u8; 16]| match ev.family {
            4 => Some(IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))),
            6 => Some(IpAddr::V6(Ipv6Addr::from(b))),
            // The cgroup_skb hook refuses packets it cannot parse; they carry no address.
            0 => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            _ => None,
        };
        Some(IngressDeny {
            hook: IngressHook::from_u8(ev.hook)?.label(),
            ifindex: ev.ifindex,
            protocol: events::protocol_name(i32::from(ev.protocol)),
            src_addr: addr(ev.src)?,
            src_port: ev.src_port,
            dst_addr: addr(ev.dst)?,
            dst_port: ev.dst_port,
        })
    }

    fn log(&self) {
        tracing::warn!(
            event = "kernel_ingress_deny",
            hook = self.hook,
            ifindex = self.ifindex,
            protocol = self.protocol,
            src_addr = %self.src_addr,
            src_port = self.src_port,
            dst_addr = %self.dst_addr,
            dst_port = self.dst_port,
            "packet to a model port dropped by the kernel"
        );
    }

    fn audit(&self) -> crate::audit::Event {
        crate::audit::Event::KernelDeny {
            side: Self::SIDE.into(),
            hook: self.hook.into(),
            detail: [
                ("ifindex", self.ifindex.to_string()),
                ("protocol", self.protocol.into()),
                ("src_addr", self.src_addr.to_string()),
                ("src_port", self.src_port.to_string()),
                ("dst_addr", self.dst_addr.to_string()),
                ("dst_port", self.dst_port.to_string()),
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

    fn record(protocol: u8, family: u8) -> Vec<u8> {
        let ev = IngressDenyEvent {
            ifindex: 7,
            src_port: 40000,
            dst_port: 8000,
            hook: IngressHook::Tc as u8,
            protocol,
            family,
            _pad: 0,
            src: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        events::raw_bytes(&ev)
    }

    #[test]
    fn decodes_a_record() {
        let d = IngressDeny::decode(&record(17, 4)).unwrap();
        assert_eq!(d.hook, "tc");
        assert_eq!(d.protocol, "udp");
        assert_eq!(d.src_addr.to_string(), "192.0.2.1");
        assert_eq!((d.src_port, d.dst_port, d.ifindex), (40000, 8000, 7));
        assert!(
            IngressDeny::decode(&record(6, 9)).is_none(),
            "unknown family"
        );
        assert!(
            IngressDeny::decode(&record(6, 4)[..10]).is_none(),
            "short record"
        );
    }
}
