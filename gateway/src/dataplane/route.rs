//! Routing: which host of a pool serves a request.
//!
//! Owns the live state of every pool host: requests outstanding (the pick is
//! least-outstanding-requests among routable hosts, ties rotated), the active health verdict
//! (written by the checker tasks in `proxy::health`), and passive ejection: after
//! `eject_after_failures` failures in a row a host is taken out for `eject_base_ms`, doubled on
//! every ejection in a row up to `eject_max_ms`; one success clears it.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde::Serialize;

use crate::{
    clock::Coarse,
    config::{Config, Ejection},
};

/// All pools by name.
pub struct Pools {
    pools: BTreeMap<String, Arc<Pool>>,
}

impl Pools {
    pub fn from_config(config: &Config) -> Self {
        let pools = config
            .pools
            .values()
            .map(|p| {
                let hosts = p
                    .hosts
                    .iter()
                    .enumerate()
                    .map(|(index, name)| {
                        Arc::new(Host {
                            name: name.clone(),
                            index,
                            outstanding: AtomicUsize::new(0),
                            health: Mutex::new(Health::default()),
                        })
                    })
                    .collect();
                let pool = Pool {
                    name: p.name.clone(),
                    hosts,
                    next: AtomicUsize::new(0),
                    ejection: p.ejection,
                };
                (p.name.clone(), Arc::new(pool))
            })
            .collect();
        Self { pools }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.pools.values()
    }
}

/// One pool's hosts and their state.
pub struct Pool {
    pub name: String,
    pub hosts: Vec<Arc<Host>>,
    /// Where the next scan starts, so equally loaded hosts take turns.
    next: AtomicUsize,
    ejection: Ejection,
}

/// One upstream host (`host:port` as written in the config).
pub struct Host {
    pub name: String,
    /// Position in the pool's `hosts`, which is also the index of its addresses in the config.
    pub index: usize,
    outstanding: AtomicUsize,
    health: Mutex<Health>,
}

#[derive(Debug, Default)]
struct Health {
    /// At least one active check has answered.
    checked: bool,
    /// The last active check failed.
    check_failed: bool,
    consecutive_failures: u32,
    ejections_in_a_row: u32,
    ejected_until: Option<Coarse>,
}

impl Health {
    fn routable(&self, now: Coarse) -> bool {
        !self.check_failed && self.ejected_until.is_none_or(|t| now >= t)
    }
}

impl Host {
    pub fn outstanding(&self) -> usize {
        self.outstanding.load(Ordering::Relaxed)
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        // A poisoned lock only means a panic elsewhere mid-update of plain counters.
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether new requests may go here now. Hosts not yet checked are routable, so the
    /// gateway serves from its first second; `/readyz` waits for a real check.
    pub fn routable(&self) -> bool {
        self.health().routable(Coarse::now())
    }

    /// Healthy by an active check and not ejected.
    pub fn ready(&self) -> bool {
        let h = self.health();
        h.checked && h.routable(Coarse::now())
    }

    /// Records an active health check's verdict.
    pub fn set_checked(&self, ok: bool) {
        let mut h = self.health();
        h.checked = true;
        h.check_failed = !ok;
    }
}

/// The state a host is reported with (`/readyz`).
#[derive(Debug, Serialize)]
pub struct HostStatus {
    pub host: String,
    pub ready: bool,
    pub outstanding: usize,
}

impl Pool {
    /// Leases the least-loaded routable host not in `exclude` (host indexes), or `None`.
    pub fn pick(&self, exclude: &[usize]) -> Option<Lease> {
        let n = self.hosts.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let now = Coarse::now();
        let mut best: Option<&Arc<Host>> = None;
        for i in 0..n {
            let host = &self.hosts[(start + i) % n];
            if exclude.contains(&host.index) || !host.health().routable(now) {
                continue;
            }
            if best.is_none_or(|b| host.outstanding() < b.outstanding()) {
                best = Some(host);
            }
        }
        let host = best?.clone();
        host.outstanding.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            host,
            ejection: self.ejection,
            settled: false,
        })
    }

    /// At least one host answered its active check and is not ejected.
    pub fn ready(&self) -> bool {
        self.hosts.iter().any(|h| h.ready())
    }

    pub fn status(&self) -> Vec<HostStatus> {
        self.hosts
            .iter()
            .map(|h| HostStatus {
                host: h.name.clone(),
                ready: h.ready(),
                outstanding: h.outstanding(),
            })
            .collect()
    }
}

/// One request's hold on a host: counts as outstanding until dropped, and reports the outcome
/// to passive health once (the first of `success`/`failure` wins; dropping without either,
/// say on client disconnect, says nothing about the host).
pub struct Lease {
    host: Arc<Host>,
    ejection: Ejection,
    settled: bool,
}

impl Lease {
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    pub fn success(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut h = self.host.health();
        h.consecutive_failures = 0;
        h.ejections_in_a_row = 0;
        h.ejected_until = None;
    }

    /// Counts a failure; ejects the host when it has failed `eject_after_failures` in a row.
    /// The count is kept across an ejection, so a host that fails again right after coming
    /// back is ejected again at once, for twice as long.
    pub fn failure(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let mut h = self.host.health();
        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
        if h.consecutive_failures >= self.ejection.after_failures {
            let factor = 1u32 << h.ejections_in_a_row.min(16);
            let period = self
                .ejection
                .base
                .saturating_mul(factor)
                .min(self.ejection.max);
            h.ejected_until = Some(Coarse::now() + period);
            h.ejections_in_a_row = h.ejections_in_a_row.saturating_add(1);
            tracing::warn!(
                host = %self.host.name,
                ejected_ms = period.as_millis() as u64,
                "upstream host ejected after consecutive failures"
            );
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.host.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn pools(extra: &str) -> Pools {
        let text = format!(
            "[pools.p]\nhosts = [\"127.0.0.1:1\", \"127.0.0.1:2\", \"127.0.0.1:3\"]\n{extra}"
        );
        Pools::from_config(&Config::from_str(Path::new("/t.toml"), &text).unwrap())
    }

    #[test]
    fn least_outstanding_wins_and_ties_rotate() {
        let ps = pools("");
        let p = ps.get("p").unwrap();
        let a = p.pick(&[]).unwrap();
        let b = p.pick(&[]).unwrap();
        let c = p.pick(&[]).unwrap();
        let mut seen = [a.host().index, b.host().index, c.host().index];
        seen.sort();
        assert_eq!(seen, [0, 1, 2], "three leases spread over three hosts");
        let freed = b.host().index;
        drop(b);
        let d = p.pick(&[]).unwrap();
        assert_eq!(
            d.host().index,
            freed,
            "the only idle host gets the next request"
        );
        assert_eq!(p.hosts.iter().map(|h| h.outstanding()).sum::<usize>(), 3);
    }

    #[test]
    fn excluded_and_failed_hosts_are_skipped() {
        let ps = pools("");
        let p = ps.get("p").unwrap();
        p.hosts[1].set_checked(false);
        for _ in 0..10 {
            let l = p.pick(&[0]).unwrap();
            assert_eq!(l.host().index, 2);
        }
        assert!(p.pick(&[0, 2]).is_none());
        assert!(!p.ready(), "no host checked yet");
        p.hosts[2].set_checked(true);
        assert!(p.ready());
    }

    #[test]
    fn consecutive_failures_eject_with_back_off() {
        let ps = pools("eject_after_failures = 2\neject_base_ms = 60000\neject_max_ms = 60000\n");
        let p = ps.get("p").unwrap();
        for _ in 0..2 {
            let mut l = p.pick(&[1, 2]).unwrap();
            l.failure();
        }
        assert!(!p.hosts[0].routable());
        assert!(p.pick(&[1, 2]).is_none());
        // A success elsewhere does not bring it back; its own success would.
        let mut l = p.pick(&[]).unwrap();
        assert_ne!(l.host().index, 0);
        l.success();
    }
}
