//! `moat segment status`: what is attached, the protected set the kernel holds, the counters.

use std::fmt;

use anyhow::Result;
use aya::programs::links::PinnedLink;
use moat_common::{EVENTS_LOST_COUNTER, Hook, counter_index};
use serde::Serialize;

use super::{Pins, PolicyMaps, describe_flags};

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: String,
    /// Every link and map of this schema version is pinned.
    pub installed: bool,
    pub links: Vec<LinkStatus>,
    pub active_slot: Option<u32>,
    pub gateway_cgroup_id: Option<u64>,
    pub gateway_level: Option<u32>,
    pub egress_lockdown: Option<bool>,
    pub destinations: Vec<DestinationStatus>,
    pub counters: Vec<HookCounters>,
    pub events_lost: u64,
    /// The inference-host guard (installed or not).
    pub inference: super::inference::GuardStatus,
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

#[derive(Debug, Serialize)]
pub struct HookCounters {
    pub hook: &'static str,
    pub allowed: u64,
    pub denied: u64,
}

/// Reads the pinned state; never changes it.
pub fn status(pins: &Pins) -> Result<Status> {
    let links = Hook::ALL
        .iter()
        .map(|&hook| {
            let info = PinnedLink::from_pin(pins.link(hook)).ok().and_then(|l| {
                let fd: aya::programs::links::FdLink = l.into();
                fd.info().ok()
            });
            LinkStatus {
                hook: hook.program_name(),
                pinned: pins.link(hook).exists(),
                link_id: info.as_ref().map(|i| i.id()),
                program_id: info.as_ref().map(|i| i.program_id()),
            }
        })
        .collect();
    let mut status = Status {
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
        inference: super::inference::status(&super::inference::GuardPins::new(pins))?,
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
    let counters = maps.counters()?;
    status.counters = Hook::ALL
        .iter()
        .map(|&hook| HookCounters {
            hook: hook.program_name(),
            allowed: counters[counter_index(hook, false) as usize],
            denied: counters[counter_index(hook, true) as usize],
        })
        .collect();
    status.events_lost = counters[EVENTS_LOST_COUNTER as usize];
    Ok(status)
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_gateway(f)?;
        write!(f, "{}", self.inference)
    }
}

impl Status {
    fn fmt_gateway(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
                opt(l.link_id),
                opt(l.program_id)
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

fn opt(v: Option<u32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
