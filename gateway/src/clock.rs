//! The coarse monotonic clock, for deadlines and windows the data plane checks on every
//! request: cache lifetimes, quota seconds, idle timeouts, host ejections.
//!
//! `std::time::Instant::now()` reads the TSC, 20–40 ns in a VM, and a proxied request used to
//! read it about twenty times. None of those checks needs more than a few milliseconds of
//! precision: `CLOCK_MONOTONIC_COARSE` is the kernel's last tick (1–4 ms old) and costs a
//! memory read. Latencies that are reported (access log, metrics) keep `std::time::Instant`.

use std::time::Duration;

/// A reading of the coarse monotonic clock. Only ever compare it with another `Coarse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Coarse(coarsetime::Instant);

impl Coarse {
    pub fn now() -> Self {
        // Not `coarsetime::Instant::now()`: that also stores the reading in a process-wide
        // atomic, one shared cache line written by every serving thread.
        Self(coarsetime::Instant::now_without_cache_update())
    }

    /// The time from `earlier` to `self`; zero if `earlier` is the later one.
    pub fn since(self, earlier: Coarse) -> Duration {
        (self.0 - earlier.0).into()
    }

    pub fn elapsed(self) -> Duration {
        Self::now().since(self)
    }
}

impl std::ops::Add<Duration> for Coarse {
    type Output = Coarse;

    fn add(self, d: Duration) -> Coarse {
        Coarse(self.0 + coarsetime::Duration::from(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moves_forward_with_real_time() {
        let start = Coarse::now();
        let precise = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        let coarse = start.elapsed();
        let real = precise.elapsed();
        // One kernel tick is at most 10 ms (HZ=100) on each reading.
        assert!(
            coarse + Duration::from_millis(20) >= real
                && coarse <= real + Duration::from_millis(20),
            "coarse {coarse:?}, real {real:?}"
        );
        assert_eq!(start.since(Coarse::now()), Duration::ZERO, "never negative");
        assert!(start + Duration::from_secs(1) > Coarse::now());
    }
}
