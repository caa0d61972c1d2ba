//! Opening and reading both sides' pinned maps: the active-slot index of a double-buffered
//! policy, the (port, prefix) tries a policy slot holds, the deny-event ring buffer, and
//! the `::ffff:a.b.c.d` rule the tries share.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Context, Result};
use aya::maps::{Array, LpmTrie, Map, MapData, MapError, RingBuf, lpm_trie::Key};
use ipnet::IpNet;
use moat_common::{Dest4, Dest6, PORT_PREFIX_BITS, guard};

use super::{counters::Counters, pin_paths::SidePins, side::Side};

/// Opens the map `name` of side `S` from its pin, as the map type `T`.
pub fn open<S: Side, T>(pins: &SidePins<S>, name: &str) -> Result<T>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pins.map(name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    let map = Map::from_map_data(data)
        .with_context(|| format!("pinned map {} has an unexpected type", path.display()))?;
    T::try_from(map)
        .with_context(|| format!("pinned map {} has an unexpected type", path.display()))
}

/// The side's deny-event ring buffer (one reader at a time drains it).
pub fn open_events<S: Side>(pins: &SidePins<S>) -> Result<RingBuf<MapData>> {
    open(pins, S::EVENTS_MAP)
}

/// The one-entry array that says which of the two policy slots the programs read. The daemon
/// fills the idle slot, then flips this index with one 4-byte write, so a program run sees
/// one whole policy, never a mix.
pub struct ActiveSlot(Array<MapData, u32>);

impl ActiveSlot {
    pub fn get(&self) -> Result<u32> {
        Ok(self.0.get(&0, 0)? & 1)
    }

    /// The slot a new policy is written into.
    pub fn idle(&self) -> Result<usize> {
        Ok((self.get()? ^ 1) as usize)
    }

    /// Makes `slot` the active one.
    pub fn flip_to(&mut self, slot: usize) -> Result<()> {
        Ok(self.0.set(0, slot as u32, 0)?)
    }
}

/// What every side's maps have besides its policy: the active-slot index and the counters.
pub struct SlotAndCounters<S> {
    pub active: ActiveSlot,
    pub counters: Counters<S>,
}

impl<S: Side> SlotAndCounters<S> {
    pub fn open(pins: &SidePins<S>) -> Result<SlotAndCounters<S>> {
        Ok(SlotAndCounters {
            active: ActiveSlot(open(pins, S::ACTIVE_MAP)?),
            counters: Counters::open(pins)?,
        })
    }
}

/// A trie key made of a port (matched exactly, the first [`PORT_PREFIX_BITS`] of the prefix)
/// and an address of `N` bytes, both in network byte order.
pub trait PortKey<const N: usize>: aya::Pod {
    fn new(port: [u8; 2], addr: [u8; N]) -> Self;
    fn port(&self) -> [u8; 2];
    fn addr(&self) -> [u8; N];
}

macro_rules! port_key {
    ($($t:ty => $n:literal),*) => {$(
        impl PortKey<$n> for $t {
            fn new(port: [u8; 2], addr: [u8; $n]) -> Self {
                Self { port, addr }
            }
            fn port(&self) -> [u8; 2] {
                self.port
            }
            fn addr(&self) -> [u8; $n] {
                self.addr
            }
        }
    )*};
}
port_key!(Dest4 => 4, Dest6 => 16, guard::Source4 => 4, guard::Source6 => 16);

/// One policy slot's pair of (port, prefix) → value tries, IPv4 and IPv6.
pub struct PortPrefixTries<K4, K6> {
    v4: LpmTrie<MapData, K4, u32>,
    v6: LpmTrie<MapData, K6, u32>,
}

impl<K4: PortKey<4>, K6: PortKey<16>> PortPrefixTries<K4, K6> {
    pub fn open<S: Side>(pins: &SidePins<S>, v4: &str, v6: &str) -> Result<Self> {
        Ok(PortPrefixTries {
            v4: open(pins, v4)?,
            v6: open(pins, v6)?,
        })
    }

    /// Empties both tries (the idle policy slot, before it is written).
    pub fn clear(&mut self) -> Result<()> {
        clear_trie(&mut self.v4)?;
        clear_trie(&mut self.v6)
    }

    pub fn insert(&mut self, port: u16, net: IpNet, value: u32) -> Result<()> {
        let port = port.to_be_bytes();
        let len = PORT_PREFIX_BITS + u32::from(net.prefix_len());
        match net {
            IpNet::V4(n) => {
                self.v4
                    .insert(&Key::new(len, K4::new(port, n.addr().octets())), value, 0)
            }
            IpNet::V6(n) => {
                self.v6
                    .insert(&Key::new(len, K6::new(port, n.addr().octets())), value, 0)
            }
        }?;
        Ok(())
    }

    /// Every (port, prefix, value) entry of both tries.
    pub fn entries(&self) -> Result<Vec<(u16, IpNet, u32)>> {
        let mut out = Vec::new();
        read_trie(&self.v4, &mut out, |a| IpAddr::V4(Ipv4Addr::from(a)))?;
        read_trie(&self.v6, &mut out, |a| IpAddr::V6(Ipv6Addr::from(a)))?;
        Ok(out)
    }
}

fn clear_trie<K: aya::Pod>(trie: &mut LpmTrie<MapData, K, u32>) -> Result<()> {
    let keys: Vec<Key<K>> = trie.keys().collect::<Result<_, _>>()?;
    for key in keys {
        trie.remove(&key)?;
    }
    Ok(())
}

fn read_trie<const N: usize, K: PortKey<N>>(
    trie: &LpmTrie<MapData, K, u32>,
    out: &mut Vec<(u16, IpNet, u32)>,
    addr: impl Fn([u8; N]) -> IpAddr,
) -> Result<()> {
    for entry in trie.iter() {
        let (key, value) = entry?;
        let data = key.data();
        let net = IpNet::new(
            addr(data.addr()),
            (key.prefix_len() - PORT_PREFIX_BITS) as u8,
        )?;
        out.push((u16::from_be_bytes(data.port()), net, value));
    }
    Ok(())
}

/// The address whose trie judges `ip`: `::ffff:a.b.c.d` reaches the IPv4 host a.b.c.d, so the
/// programs look it up in the IPv4 trie.
pub fn unmap_v4(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}
