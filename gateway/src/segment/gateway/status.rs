//! The gateway side's part of `moat segment status`: links, the policy the kernel holds, the
//! counters.

use std::fmt;

use anyhow::Result;
use moat_common::Hook;
use serde::Serialize;

use super::{Gateway, GatewayPins, PolicyMaps, describe_flags};
use crate::{
    metrics::HookCount,
    segment::{counters, link, status::or_dash},
};

#[derive(Debug, Serialize)]
pub struct GatewayStatus {
    pub pin_dir: String,
    /// Every link and map of this schema version is pinned.
    pub installed: bool,
    pub links: Vec<LinkStatus>,
    pub active_slot: Option<u32>,
    pub gateway_cgroup_id: Option<u64>,
    pub gateway_level: Option<u32>,
    pub egress_lockdown: Option<bool>,
    pub destinations: Vec<DestinationStatus>,
    pub counters: Vec<HookCount>,
    pub events_lost: u64,
}

#[derive(Debug, Serialize)]
pub struct LinkStatus {
    pub hook: &'static str,
    pub pinned: bool,
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
            LinkStatus {
                hook: hook.program_name(),
                pinned: path.exists(),
                link_id,
                program_id,
            }
        })
        .collect();
    let mut status = GatewayStatus {
        pin_dir: pins.dir().display().to_string(),
        installed: pins.complete(),
        links,
        active_slot: None,
        gateway_cgroup_id: None,
        gateway_level: None,
        egress_lockdown: None,
        destinations: Vec::new(),
        counters: Vec::new(),
        events_lost: 0,
    };
    if !status.installed {
        return Ok(status);
    }
    let maps = PolicyMaps::open(pins)?;
    let policy = maps.read_active()?;
    status.active_slot = Some(maps.active_slot()?);
    status.gateway_cgroup_id = policy.gateway.map(|g| g.cgroup_id);
    status.gateway_level = policy.gateway.map(|g| g.level);
    status.egress_lockdown = Some(policy.egress_lockdown);
    status.destinations = policy
        .destinations
        .iter()
        .map(|(rule, flags)| DestinationStatus {
            destination: rule.to_string(),
            flags: describe_flags(*flags),
        })
        .collect();
    (status.counters, status.events_lost) = counters::per_hook::<Gateway>(&maps.counters()?);
    Ok(status)
}

impl fmt::Display for GatewayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "pins: {}", self.pin_dir)?;
        if !self.installed {
            let partial = self.links.iter().any(|l| l.pinned);
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
                "  hook {:<9} link {:>6}  program {:>6}",
                l.hook,
                or_dash(l.link_id),
                or_dash(l.program_id)
            )?;
        }
        match self.gateway_cgroup_id {
            Some(id) => writeln!(
                f,
                "gateway cgroup id: {id} (level {})",
                self.gateway_level.unwrap_or(0)
            )?,
            None => writeln!(f, "gateway cgroup: none")?,
        }
        writeln!(
            f,
            "egress lockdown: {}",
            if self.egress_lockdown == Some(true) {
                "on"
            } else {
                "off"
            }
        )?;
        writeln!(f, "destinations ({}):", self.destinations.len())?;
        for d in &self.destinations {
            writeln!(f, "  {:<32} {}", d.destination, d.flags)?;
        }
        writeln!(f, "counters:")?;
        for c in &self.counters {
            writeln!(
                f,
                "  {:<9} allowed {:>10}  denied {:>8}",
                c.hook, c.allowed, c.denied
            )?;
        }
        writeln!(f, "deny events lost: {}", self.events_lost)
    }
}
