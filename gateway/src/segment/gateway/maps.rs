//! The gateway side's pinned policy maps: writing a policy (double-buffered) and reading back
//! what the kernel enforces.

use anyhow::{Context, Result};
use aya::maps::{Array, MapData};
use moat_common::{Dest4, Dest6, SlotConfig, names};

use super::{Gateway, GatewayIdentity, GatewayPins, policy::Policy};
use crate::{
    config::DestinationRule,
    segment::pinned_maps::{self, PortPrefixTries, SlotAndCounters},
};

pub struct PolicyMaps {
    pub(in crate::segment) common: SlotAndCounters<Gateway>,
    slots: Array<MapData, SlotConfig>,
    /// Per slot, destination (port, prefix) → [`moat_common::dest`] flags.
    dest: [PortPrefixTries<Dest4, Dest6>; 2],
}

impl PolicyMaps {
    pub fn open(pins: &GatewayPins) -> Result<PolicyMaps> {
        let dest = |slot: usize| {
            PortPrefixTries::open(pins, names::MAP_DEST4[slot], names::MAP_DEST6[slot])
        };
        Ok(PolicyMaps {
            common: SlotAndCounters::open(pins)?,
            slots: pinned_maps::open(pins, names::MAP_SLOTS)?,
            dest: [dest(0)?, dest(1)?],
        })
    }

    /// Writes `policy` into the idle slot, then makes it active with one 4-byte map write, so
    /// a program run sees the old policy or the new one, never a mix. If anything fails before
    /// the flip, the active policy is untouched.
    pub fn apply(&mut self, policy: &Policy) -> Result<()> {
        let idle = self.common.active.idle()?;
        self.dest[idle].clear()?;
        for (rule, flags) in &policy.destinations {
            self.dest[idle]
                .insert(rule.port, rule.net, *flags)
                .with_context(|| format!("cannot add {rule} to the policy"))?;
        }
        let gateway = policy.gateway.unwrap_or_default();
        let slot = SlotConfig {
            gateway_cgroup_id: gateway.cgroup_id,
            gateway_level: gateway.level,
            flags: policy.slot_flags(),
        };
        self.slots.set(idle as u32, slot, 0)?;
        self.common.active.flip_to(idle)
    }

    /// What the active slot holds, as a [`Policy`].
    pub fn read_active(&self) -> Result<Policy> {
        let slot = self.common.active.get()?;
        let cfg = self.slots.get(&slot, 0)?;
        let mut policy = Policy {
            gateway: (cfg.gateway_cgroup_id != 0).then_some(GatewayIdentity {
                cgroup_id: cfg.gateway_cgroup_id,
                level: cfg.gateway_level,
            }),
            egress_lockdown: cfg.flags & moat_common::slot_flags::EGRESS_LOCKDOWN != 0,
            destinations: Default::default(),
        };
        for (port, net, flags) in self.dest[slot as usize].entries()? {
            policy
                .destinations
                .insert(DestinationRule { net, port }, flags);
        }
        Ok(policy)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<u64>> {
        self.common.counters.sum()
    }
}
