//! The guard's part of `moat segment status`: links, the policy the kernel holds, counters.

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::{GuardMaps, GuardPins, GuardStatus};
use crate::segment::{
    link,
    status::{SideStatus, or_dash},
    tc,
};

/// The active policy, as `status` shows it.
#[derive(Debug, Default, Serialize)]
pub struct GuardPolicyStatus {
    pub model_ports: Vec<u16>,
    /// `port` → allowed source prefixes.
    pub allowed: Vec<AllowedStatus>,
}

#[derive(Debug, Serialize)]
pub struct GuardLinkStatus {
    /// `cgroup_skb` or `tc-<interface>`.
    pub attachment: String,
    /// What the kernel says of the pinned link: `attached` or `severed` (the daemon replaces
    /// it within seconds).
    pub state: &'static str,
    /// How: `link` (a bpf link: cgroup_skb, or tcx on Linux 6.6+) or `netlink` (a cls_bpf
    /// filter on the interface's clsact qdisc, on kernels without tcx).
    pub via: &'static str,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct AllowedStatus {
    pub port: u16,
    pub sources: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct GuardCounters {
    pub hook: String,
    pub allowed: u64,
    pub dropped: u64,
}

/// Reads the pinned state; never changes it.
pub fn status(pins: &GuardPins) -> Result<GuardStatus> {
    let links = pins
        .links()
        .into_iter()
        .map(|at| {
            let path = pins.link(&at);
            let (link_id, program_id) = link::pinned_ids(&path);
            let via = match tc::pinned_is_program(&path) {
                Some(true) => "netlink",
                _ => "link",
            };
            GuardLinkStatus {
                attachment: at.pin_name(),
                // A netlink filter's pin is its program: the interface's filter dump says
                // whether the filter is still there.
                state: super::attachment_state(pins, &at)
                    .map(|s| s.1)
                    .unwrap_or("unreadable"),
                via,
                link_id,
                program_id,
            }
        })
        .collect();
    let mut status = SideStatus::read(pins, links, policy_status, |c| GuardCounters {
        hook: c.hook,
        allowed: c.allowed,
        dropped: c.denied,
    })?;
    status.not_attached = status
        .links
        .iter()
        .filter(|l| l.state != "attached")
        .map(|l| format!("{} ({})", l.attachment, l.state))
        .collect();
    Ok(status)
}

fn policy_status(maps: &GuardMaps) -> Result<GuardPolicyStatus> {
    let policy = maps.read_active()?;
    Ok(GuardPolicyStatus {
        model_ports: policy.ports.iter().copied().collect(),
        allowed: policy
            .ports
            .iter()
            .map(|&port| AllowedStatus {
                port,
                sources: policy
                    .sources
                    .iter()
                    .filter(|(p, _)| *p == port)
                    .map(|(_, n)| n.to_string())
                    .collect(),
            })
            .collect(),
    })
}

impl fmt::Display for GuardStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "inference guard pins: {}", self.pin_dir)?;
        if !self.installed {
            return writeln!(
                f,
                "inference guard: {}",
                if self.links.is_empty() {
                    "not installed"
                } else {
                    "INCOMPLETE (restart the daemon or uninstall)"
                }
            );
        }
        writeln!(
            f,
            "inference guard: installed (active policy slot {})",
            self.active_slot.unwrap_or(0)
        )?;
        if self.links.is_empty() {
            writeln!(f, "  attached nowhere (no links pinned)")?;
        }
        for l in &self.links {
            writeln!(
                f,
                "  link {:<20} via {:<8} link {:>6}  program {:>6}  {}",
                l.attachment,
                l.via,
                or_dash(l.link_id),
                or_dash(l.program_id),
                l.state
            )?;
        }
        for a in &self.policy.allowed {
            let from = if a.sources.is_empty() {
                "nobody".to_owned()
            } else {
                a.sources.join(", ")
            };
            writeln!(f, "  model port {:<5} allowed from: {from}", a.port)?;
        }
        writeln!(f, "  counters (packets to model ports):")?;
        for c in &self.counters {
            writeln!(
                f,
                "    {:<10} allowed {:>10}  dropped {:>8}",
                c.hook, c.allowed, c.dropped
            )?;
        }
        writeln!(f, "  deny events lost: {}", self.events_lost)
    }
}
