//! What the gateway side and the inference guard share about their pinned kernel state:
//! opening a pinned map, clearing a policy trie, summing per-CPU counters, and reading a
//! deny-event ring buffer into the log at a bounded rate.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use aya::maps::{LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key};
use tokio::io::{Interest, unix::AsyncFd};

/// Opens the map pinned at `path`.
pub fn open_map(path: &Path) -> Result<Map> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("cannot open pinned map {}", path.display()))?;
    Map::from_map_data(data)
        .with_context(|| format!("pinned map {} has an unexpected type", path.display()))
}

/// Empties a trie (the idle policy slot, before it is written).
pub fn clear_trie<K: aya::Pod>(trie: &mut LpmTrie<MapData, K, u32>) -> Result<()> {
    let keys: Vec<Key<K>> = trie.keys().collect::<Result<_, _>>()?;
    for key in keys {
        trie.remove(&key)?;
    }
    Ok(())
}

/// Every counter of a per-CPU array, summed over CPUs.
pub fn sum_counters<const N: usize>(counters: &PerCpuArray<MapData, u64>) -> Result<[u64; N]> {
    let mut out = [0u64; N];
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = counters.get(&(i as u32), 0)?.iter().sum();
    }
    Ok(out)
}

/// Per-hook (allowed, denied) counts and the lost-event count out of a summed counter array,
/// for `/metrics`. `index(hook, denied)` is the hook's slot in the array.
pub fn hook_counts<H: Copy>(
    counters: &[u64],
    hooks: &[H],
    name: impl Fn(H) -> &'static str,
    index: impl Fn(H, bool) -> u32,
    lost: u32,
) -> (Vec<crate::metrics::HookCount>, u64) {
    let hooks = hooks
        .iter()
        .map(|&h| crate::metrics::HookCount {
            hook: name(h).to_owned(),
            allowed: counters[index(h, false) as usize],
            denied: counters[index(h, true) as usize],
        })
        .collect();
    (hooks, counters[lost as usize])
}

/// A kernel deny record as it goes to the log.
pub trait DenyRecord: Sized {
    /// What the ring buffer is called in errors and warnings.
    const KIND: &'static str;
    /// The `event` of the line that sums up records the rate limit held back.
    const SUPPRESSED_EVENT: &'static str;
    /// `None` for a record of the wrong size or with unknown values.
    fn decode(bytes: &[u8]) -> Option<Self>;
    fn log(&self);
}

/// Logs every record of `ring` (at most [`Limiter::PER_SECOND`] a second) until the task is
/// dropped.
pub fn spawn_ring_logger<R: DenyRecord>(
    ring: RingBuf<MapData>,
) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long as
    // the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|e| anyhow::anyhow!("cannot poll the {} ring buffer: {e}", R::KIND))?;
    Ok(tokio::spawn(async move {
        let mut limiter = Limiter::new(R::SUPPRESSED_EVENT);
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match R::decode(&item) {
                    Some(record) if limiter.admit() => record.log(),
                    Some(_) => {}
                    None => tracing::warn!(len = item.len(), kind = R::KIND, "undecodable event"),
                }
            }
            guard.clear_ready();
        }
    }))
}

/// Admits at most [`Limiter::PER_SECOND`] log lines a second; the rest are counted and
/// reported in one summary line, so a flood cannot fill the disk with log lines. The kernel's
/// per-CPU counters still count every deny.
#[derive(Debug)]
pub struct Limiter {
    summary_event: &'static str,
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl Limiter {
    pub const PER_SECOND: u32 = 200;

    pub fn new(summary_event: &'static str) -> Limiter {
        Limiter {
            summary_event,
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line may be logged now.
    pub fn admit(&mut self) -> bool {
        self.admit_at(Instant::now())
    }

    fn admit_at(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    event = self.summary_event,
                    suppressed = self.suppressed,
                    "deny events not logged individually (rate limit)"
                );
            }
            self.window = now;
            self.logged = 0;
            self.suppressed = 0;
        }
        if self.logged < Self::PER_SECOND {
            self.logged += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_at_most_per_second_quota() {
        let mut l = Limiter::new("test_suppressed");
        let t0 = l.window;
        let logged = (0..500).filter(|_| l.admit_at(t0)).count();
        assert_eq!(logged, Limiter::PER_SECOND as usize);
        assert_eq!(l.suppressed, 500 - Limiter::PER_SECOND as u64);
        // The next second starts a new quota.
        assert!(l.admit_at(t0 + Duration::from_millis(1001)));
        assert_eq!(l.suppressed, 0);
    }
}
