//! The pinned policy maps, opened from the bpffs: writing a policy (double-buffered) and
//! reading back what the kernel enforces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::maps::{Array, LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key};
use ipnet::IpNet;
use moat_common::{COUNTERS, Dest4, Dest6, PORT_PREFIX_BITS, SlotConfig};

use super::{
    pins::{self, Pins},
    policy::Policy,
};
use crate::config::DestinationRule;

pub struct PolicyMaps {
    active: Array<MapData, u32>,
    slots: Array<MapData, SlotConfig>,
    dest4: [LpmTrie<MapData, Dest4, u32>; 2],
    dest6: [LpmTrie<MapData, Dest6, u32>; 2],
    counters: PerCpuArray<MapData, u64>,
}

pub(super) fn open_map(pins: &Pins, name: &str) -> Result<Map> {
    super::pinned::open_map(&pins.map(name))
}

impl PolicyMaps {
    pub fn open(pins: &Pins) -> Result<PolicyMaps> {
        let trie4 = |n: &str| -> Result<LpmTrie<MapData, Dest4, u32>> {
            Ok(LpmTrie::try_from(open_map(pins, n)?)?)
        };
        let trie6 = |n: &str| -> Result<LpmTrie<MapData, Dest6, u32>> {
            Ok(LpmTrie::try_from(open_map(pins, n)?)?)
        };
        Ok(PolicyMaps {
            active: Array::try_from(open_map(pins, pins::MAP_ACTIVE)?)?,
            slots: Array::try_from(open_map(pins, pins::MAP_SLOTS)?)?,
            dest4: [trie4(pins::MAP_DEST4[0])?, trie4(pins::MAP_DEST4[1])?],
            dest6: [trie6(pins::MAP_DEST6[0])?, trie6(pins::MAP_DEST6[1])?],
            counters: PerCpuArray::try_from(open_map(pins, pins::MAP_COUNTERS)?)?,
        })
    }

    pub fn active_slot(&self) -> Result<u32> {
        Ok(self.active.get(&0, 0)? & 1)
    }

    /// Writes `policy` into the idle slot, then makes it active with one 4-byte map write, so
    /// a program run sees the old policy or the new one, never a mix. If anything fails before
    /// the flip, the active policy is untouched.
    pub fn apply(&mut self, policy: &Policy) -> Result<()> {
        let idle = (self.active_slot()? ^ 1) as usize;
        crate::segment::pinned::clear_trie(&mut self.dest4[idle])?;
        crate::segment::pinned::clear_trie(&mut self.dest6[idle])?;
        for (rule, flags) in &policy.destinations {
            let port = rule.port.to_be_bytes();
            let prefix = PORT_PREFIX_BITS + u32::from(rule.net.prefix_len());
            let inserted = match rule.net {
                IpNet::V4(net) => {
                    let key = Dest4 {
                        port,
                        addr: net.addr().octets(),
                    };
                    self.dest4[idle].insert(&Key::new(prefix, key), flags, 0)
                }
                IpNet::V6(net) => {
                    let key = Dest6 {
                        port,
                        addr: net.addr().octets(),
                    };
                    self.dest6[idle].insert(&Key::new(prefix, key), flags, 0)
                }
            };
            inserted.with_context(|| format!("cannot add {rule} to the policy"))?;
        }
        let gateway = policy.gateway.unwrap_or_default();
        let slot = SlotConfig {
            gateway_cgroup_id: gateway.cgroup_id,
            gateway_level: gateway.level,
            flags: policy.slot_flags(),
        };
        self.slots.set(idle as u32, slot, 0)?;
        self.active.set(0, idle as u32, 0)?;
        Ok(())
    }

    /// What the active slot holds, as a [`Policy`].
    pub fn read_active(&self) -> Result<Policy> {
        let slot = self.active_slot()?;
        let cfg = self.slots.get(&slot, 0)?;
        let mut policy = Policy {
            gateway: (cfg.gateway_cgroup_id != 0).then_some(super::GatewayIdentity {
                cgroup_id: cfg.gateway_cgroup_id,
                level: cfg.gateway_level,
            }),
            egress_lockdown: cfg.flags & moat_common::slot_flags::EGRESS_LOCKDOWN != 0,
            destinations: Default::default(),
        };
        let slot = slot as usize;
        read_trie(&self.dest4[slot], &mut policy, |d| {
            (d.port, IpAddr::V4(Ipv4Addr::from(d.addr)))
        })?;
        read_trie(&self.dest6[slot], &mut policy, |d| {
            (d.port, IpAddr::V6(Ipv6Addr::from(d.addr)))
        })?;
        Ok(policy)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; COUNTERS as usize]> {
        crate::segment::pinned::sum_counters(&self.counters)
    }
}

/// Adds every entry of one destination trie to `policy`; `split` gives a key's port bytes and
/// address.
fn read_trie<K: aya::Pod>(
    trie: &LpmTrie<MapData, K, u32>,
    policy: &mut Policy,
    split: impl Fn(&K) -> ([u8; 2], IpAddr),
) -> Result<()> {
    for entry in trie.iter() {
        let (key, flags) = entry?;
        let (port, addr) = split(&key.data());
        let net = IpNet::new(addr, (key.prefix_len() - PORT_PREFIX_BITS) as u8)?;
        let port = u16::from_be_bytes(port);
        policy
            .destinations
            .insert(DestinationRule { net, port }, flags);
    }
    Ok(())
}

/// The deny-event ring buffer.
pub fn open_events(pins: &Pins) -> Result<RingBuf<MapData>> {
    Ok(RingBuf::try_from(open_map(pins, pins::MAP_EVENTS)?)?)
}
