//! The guard's pinned maps: writing a policy (double-buffered) and reading back what the kernel
//! enforces.

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData};
use moat_common::guard::{ANY_PORT_GUARDED, PORT_GUARDED, Source4, Source6, names};

use super::{GuardPins, GuardPolicy, Inference};
use crate::segment::pinned_maps::{self, PortPrefixTries, SlotAndCounters};

/// The value of an allowed-source entry (the programs only look for a match).
const SOURCE_ALLOWED: u32 = 1;

pub struct GuardMaps {
    pub(in crate::segment) common: SlotAndCounters<Inference>,
    /// Per slot, guarded port → flags.
    ports: [HashMap<MapData, u16, u32>; 2],
    /// Per slot, (model port, allowed source prefix).
    sources: [PortPrefixTries<Source4, Source6>; 2],
}

impl GuardMaps {
    pub fn open(pins: &GuardPins) -> Result<GuardMaps> {
        let sources =
            |slot: usize| PortPrefixTries::open(pins, names::MAP_SRC4[slot], names::MAP_SRC6[slot]);
        Ok(GuardMaps {
            common: SlotAndCounters::open(pins)?,
            ports: [
                pinned_maps::open(pins, names::MAP_PORTS[0])?,
                pinned_maps::open(pins, names::MAP_PORTS[1])?,
            ],
            sources: [sources(0)?, sources(1)?],
        })
    }

    /// Writes `policy` into the idle slot, then makes it active with one 4-byte map write, so
    /// a packet is judged by the old policy or the new one, never a mix. If anything fails
    /// before the flip, the active policy is untouched.
    pub fn apply(&mut self, policy: &GuardPolicy) -> Result<()> {
        let idle = self.common.active.idle()?;
        let old_ports: Vec<u16> = self.ports[idle].keys().collect::<Result<_, _>>()?;
        for p in old_ports {
            self.ports[idle].remove(&p)?;
        }
        self.sources[idle].clear()?;
        for &port in &policy.ports {
            self.ports[idle]
                .insert(port, PORT_GUARDED, 0)
                .with_context(|| format!("cannot guard port {port}"))?;
        }
        if !policy.ports.is_empty() {
            self.ports[idle].insert(0, ANY_PORT_GUARDED, 0)?;
        }
        for &(port, net) in &policy.sources {
            self.sources[idle]
                .insert(port, net, SOURCE_ALLOWED)
                .with_context(|| format!("cannot allow {net} to port {port}"))?;
        }
        self.common.active.flip_to(idle)
    }

    /// What the active slot holds.
    pub fn read_active(&self) -> Result<GuardPolicy> {
        let slot = self.common.active.get()? as usize;
        let mut policy = GuardPolicy::default();
        for port in self.ports[slot].keys() {
            let port = port?;
            // Key 0 is the "guards something" marker, not a port.
            if port != 0 {
                policy.ports.insert(port);
            }
        }
        for (port, net, _) in self.sources[slot].entries()? {
            policy.sources.insert((port, net));
        }
        Ok(policy)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        self.common.counters.sum()
    }
}
