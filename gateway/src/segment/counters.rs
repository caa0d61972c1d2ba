//! Both sides' per-CPU counters: `hook * 2 + verdict` slots, then one slot of deny events lost
//! to a full ring buffer; summed over CPUs for `/metrics` and `moat segment status`.

use std::marker::PhantomData;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};

use super::{pin_paths::SidePins, pinned_maps, side::Side};
use crate::metrics::HookCount;

/// A side's pinned counter array.
pub struct Counters<S> {
    map: PerCpuArray<MapData, u64>,
    side: PhantomData<S>,
}

impl<S: Side> Counters<S> {
    pub fn open(pins: &SidePins<S>) -> Result<Counters<S>> {
        Ok(Counters {
            map: pinned_maps::open(pins, S::COUNTERS_MAP)?,
            side: PhantomData,
        })
    }

    /// Every counter, summed over CPUs.
    pub fn sum<const N: usize>(&self) -> Result<[u64; N]> {
        let mut out = [0u64; N];
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.map.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(out)
    }
}

/// Per-hook (allowed, denied) counts and the lost-event count out of a summed counter array.
pub fn per_hook<S: Side>(counters: &[u64]) -> (Vec<HookCount>, u64) {
    let hooks = S::HOOKS
        .iter()
        .map(|&h| HookCount {
            hook: S::hook_label(h).to_owned(),
            allowed: counters[S::counter_index(h, false) as usize],
            denied: counters[S::counter_index(h, true) as usize],
        })
        .collect();
    (hooks, counters[S::EVENTS_LOST_COUNTER as usize])
}
