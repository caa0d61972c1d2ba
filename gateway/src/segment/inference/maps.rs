//! The guard's pinned maps: writing a policy (double-buffered) and reading back what the kernel
//! enforces.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key};
use ipnet::IpNet;
use moat_common::{
    PORT_PREFIX_BITS,
    guard::{ANY_PORT_GUARDED, COUNTERS, PORT_GUARDED, Source4, Source6},
};

use super::{
    GuardPins, GuardPolicy, MAP_ACTIVE, MAP_COUNTERS, MAP_EVENTS, MAP_PORTS, MAP_SRC4, MAP_SRC6,
};

pub struct GuardMaps {
    active: Array<MapData, u32>,
    ports: [HashMap<MapData, u16, u32>; 2],
    src4: [LpmTrie<MapData, Source4, u32>; 2],
    src6: [LpmTrie<MapData, Source6, u32>; 2],
    counters: PerCpuArray<MapData, u64>,
}

fn open_map(pins: &GuardPins, name: &str) -> Result<Map> {
    crate::segment::pinned::open_map(&pins.map(name))
}

impl GuardMaps {
    pub fn open(pins: &GuardPins) -> Result<GuardMaps> {
        let ports = |n: &str| -> Result<HashMap<MapData, u16, u32>> {
            Ok(HashMap::try_from(open_map(pins, n)?)?)
        };
        let trie4 = |n: &str| -> Result<LpmTrie<MapData, Source4, u32>> {
            Ok(LpmTrie::try_from(open_map(pins, n)?)?)
        };
        let trie6 = |n: &str| -> Result<LpmTrie<MapData, Source6, u32>> {
            Ok(LpmTrie::try_from(open_map(pins, n)?)?)
        };
        Ok(GuardMaps {
            active: Array::try_from(open_map(pins, MAP_ACTIVE)?)?,
            ports: [ports(MAP_PORTS[0])?, ports(MAP_PORTS[1])?],
            src4: [trie4(MAP_SRC4[0])?, trie4(MAP_SRC4[1])?],
            src6: [trie6(MAP_SRC6[0])?, trie6(MAP_SRC6[1])?],
            counters: PerCpuArray::try_from(open_map(pins, MAP_COUNTERS)?)?,
        })
    }

    pub fn active_slot(&self) -> Result<u32> {
        Ok(self.active.get(&0, 0)? & 1)
    }

    /// Writes `policy` into the idle slot, then makes it active with one 4-byte map write, so
    /// a packet is judged by the old policy or the new one, never a mix. If anything fails
    /// before the flip, the active policy is untouched.
    pub fn apply(&mut self, policy: &GuardPolicy) -> Result<()> {
        let idle = (self.active_slot()? ^ 1) as usize;
        let old_ports: Vec<u16> = self.ports[idle].keys().collect::<Result<_, _>>()?;
        for p in old_ports {
            self.ports[idle].remove(&p)?;
        }
        crate::segment::pinned::clear_trie(&mut self.src4[idle])?;
        crate::segment::pinned::clear_trie(&mut self.src6[idle])?;
        for &port in &policy.ports {
            self.ports[idle]
                .insert(port, PORT_GUARDED, 0)
                .with_context(|| format!("cannot guard port {port}"))?;
        }
        if !policy.ports.is_empty() {
            self.ports[idle].insert(0, ANY_PORT_GUARDED, 0)?;
        }
        for &(port, net) in &policy.sources {
            let len = PORT_PREFIX_BITS + u32::from(net.prefix_len());
            let port_be = port.to_be_bytes();
            match net {
                IpNet::V4(n) => self.src4[idle].insert(
                    &Key::new(
                        len,
                        Source4 {
                            port: port_be,
                            addr: n.addr().octets(),
                        },
                    ),
                    1,
                    0,
                ),
                IpNet::V6(n) => self.src6[idle].insert(
                    &Key::new(
                        len,
                        Source6 {
                            port: port_be,
                            addr: n.addr().octets(),
                        },
                    ),
                    1,
                    0,
                ),
            }
            .with_context(|| format!("cannot allow {net} to port {port}"))?;
        }
        self.active.set(0, idle as u32, 0)?;
        Ok(())
    }

    /// What the active slot holds.
    pub fn read_active(&self) -> Result<GuardPolicy> {
        let slot = self.active_slot()? as usize;
        let mut policy = GuardPolicy::default();
        for port in self.ports[slot].keys() {
            let port = port?;
            // Key 0 is the "guards something" marker, not a port.
            if port != 0 {
                policy.ports.insert(port);
            }
        }
        for key in self.src4[slot].keys() {
            let key = key?;
            let d = key.data();
            let net = IpNet::new(
                IpAddr::V4(Ipv4Addr::from(d.addr)),
                (key.prefix_len() - PORT_PREFIX_BITS) as u8,
            )?;
            policy.sources.insert((u16::from_be_bytes(d.port), net));
        }
        for key in self.src6[slot].keys() {
            let key = key?;
            let d = key.data();
            let net = IpNet::new(
                IpAddr::V6(Ipv6Addr::from(d.addr)),
                (key.prefix_len() - PORT_PREFIX_BITS) as u8,
            )?;
            policy.sources.insert((u16::from_be_bytes(d.port), net));
        }
        Ok(policy)
    }

    /// Every counter, summed over CPUs.
    pub fn counters(&self) -> Result<[u64; COUNTERS as usize]> {
        crate::segment::pinned::sum_counters(&self.counters)
    }
}

/// The ingress deny-event ring buffer.
pub fn open_events(pins: &GuardPins) -> Result<RingBuf<MapData>> {
    Ok(RingBuf::try_from(open_map(pins, MAP_EVENTS)?)?)
}
