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
    pub fn sum(&self) -> Result<Vec<u64>> {
        (0..S::COUNTERS)
            .map(|i| Ok(self.map.get(&i, 0)?.iter().sum()))
            .collect()
    }

    /// Per-hook (allowed, denied) counts, summed over CPUs, and the lost-event count.
    pub fn per_hook(&self) -> Result<(Vec<HookCount>, u64)> {
        Ok(per_hook::<S>(&self.sum()?))
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
