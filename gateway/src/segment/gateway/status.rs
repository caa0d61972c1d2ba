//! The gateway side's part of `moat segment status`: links, the policy the kernel holds, the
//! counters.

use std::fmt;

use anyhow::Result;
use moat_common::Hook;
use serde::Serialize;

use super::{GatewayPins, GatewayStatus, PolicyMaps, describe_flags};
use crate::segment::{
    link,
    status::{SideStatus, or_dash},
};

/// The active policy, as `status` shows it.
#[derive(Debug, Default, Serialize)]
pub struct PolicyStatus {
    pub gateway_cgroup_id: Option<u64>,
    pub gateway_level: Option<u32>,
    pub egress_lockdown: Option<bool>,
    pub destinations: Vec<DestinationStatus>,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub hook: &'static str,
    pub pinned: bool,
    /// What the kernel says of the pinned link: `attached`, `severed` (detached behind moat's
    /// back; the daemon replaces it within seconds) or `missing`.
    pub state: &'static str,
    pub link_id: Option<u32>,
    pub program_id: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct DestinationStatus {
    pub destination: String,
    pub flags: String,
}

/// Reads the pinned state; never changes it.
pub fn status(pins: &GatewayPins) -> Result<GatewayStatus> {
    let links = Hook::ALL
        .iter()
        .map(|hook| {
            let path = pins.link(hook);
            let (link_id, program_id) = link::pinned_ids(&path);
            let state = link::cgroup_link_state(&path)
                .map(|s| s.label())
                .unwrap_or("unreadable");
            LinkStatus {
                hook: hook.program_name(),
                pinned: path.exists(),
                state,
                link_id,
                program_id,
            }
        })
        .collect();
    let mut status = SideStatus::read(pins, links, policy_status, |c| c)?;
    // Installed means enforced: every hook's link attached, as the kernel reports it.
    status.not_attached = status
        .links
        .iter()
        .filter(|l| l.state != "attached")
        .map(|l| format!("{} ({})", l.hook, l.state))
        .collect();
    status.installed &= status.not_attached.is_empty();
    Ok(status)
}

fn policy_status(maps: &PolicyMaps) -> Result<PolicyStatus> {
    let policy = maps.read_active()?;
    Ok(PolicyStatus {
        gateway_cgroup_id: policy.gateway.map(|g| g.cgroup_id),
        gateway_level: policy.gateway.map(|g| g.level),
        egress_lockdown: Some(policy.egress_lockdown),
        destinations: policy
            .destinations
            .iter()
            .map(|(rule, flags)| DestinationStatus {
                destination: rule.to_string(),
                flags: describe_flags(*flags),
            })
            .collect(),
    })
}

impl fmt::Display for GatewayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pins: {}", self.pin_dir)?;
        if !self.installed {
            let partial = self.links.iter().any(|l| l.pinned);
            if partial && !self.not_attached.is_empty() {
                return writeln!(
                    f,
                    "gateway enforcement: DEGRADED, not attached: {} (a running daemon restores \
                     them within seconds; otherwise restart it)",
                    self.not_attached.join(", ")
                );
            }
            return writeln!(
                f,
                "gateway enforcement: {}",
                if partial {
                    "INCOMPLETE (restart the daemon or uninstall)"
                } else {
                    "not installed"
                }
            );
        }
        writeln!(
            f,
            "gateway enforcement: installed (active policy slot {})",
            self.active_slot.unwrap_or(0)
        )?;
        for l in &self.links {
            writeln!(
                f,
                "  hook {:<13} link {:>6}  program {:>6}  {}",
                l.hook,
                or_dash(l.link_id),
                or_dash(l.program_id),
                l.state
            )?;
        }
        match self.policy.gateway_cgroup_id {
            Some(id) => writeln!(
                f,
                "gateway cgroup id: {id} (level {})",
                self.policy.gateway_level.unwrap_or(0)
            )?,
            None => writeln!(f, "gateway cgroup: none")?,
        }
        writeln!(
            f,
            "egress lockdown: {}",
            if self.policy.egress_lockdown == Some(true) {
                "on"
            } else {
                "off"
            }
        )?;
        writeln!(f, "destinations ({}):", self.policy.destinations.len())?;
        for d in &self.policy.destinations {
            writeln!(f, "  {:<32} {}", d.destination, d.flags)?;
        }
        writeln!(f, "counters:")?;
        for c in &self.counters {
            writeln!(
                f,
                "  {:<13} allowed {:>10}  denied {:>8}",
                c.hook, c.allowed, c.denied
            )?;
        }
        writeln!(f, "deny events lost: {}", self.events_lost)
    }
}
