//! Deny events from the kernel, for both sides: decoding a ring buffer record and reading a
//! ring buffer into the log at a bounded rate. What a record holds is each side's own
//! ([`super::gateway::Deny`], [`super::inference::IngressDeny`]).

use std::time::{Duration, Instant};

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

/// A kernel deny record as it goes to the log.
pub trait DenyRecord: Sized {
    /// The record as the program writes it (`moat_common`).
    type Raw: aya::Pod;
    /// What the ring buffer is called in errors and warnings.
    const KIND: &'static str;
    /// The `event` of the line that sums up records the rate limit held back.
    const SUPPRESSED_EVENT: &'static str;
    /// `gateway` or `inference`, in the audit record.
    const SIDE: &'static str;
    /// `None` for a record with unknown values (a newer program than this daemon).
    fn from_raw(raw: Self::Raw) -> Option<Self>;
    fn log(&self);
    /// The record for the audit log.
    fn audit(&self) -> crate::audit::Event;

    /// Decodes one ring buffer record; `None` for a record of the wrong size or with unknown
    /// values.
    fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < size_of::<Self::Raw>() {
            return None;
        }
        // SAFETY: the length is checked and the record type is plain old data; the record may
        // be unaligned, hence read_unaligned.
        let raw: Self::Raw = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        Self::from_raw(raw)
    }
}

/// The IP protocol's name in a deny log line.
pub fn protocol_name(protocol: i32) -> &'static str {
    match protocol {
        libc::IPPROTO_TCP => "tcp",
        libc::IPPROTO_UDP => "udp",
        _ => "other",
    }
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
        let mut limiter = Limiter::new(R::SUPPRESSED_EVENT, R::SIDE);
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            // Everything queued is read first and judged at the time it was read: what the
            // limit admits must not depend on how long writing the admitted lines takes (on a
            // slow machine, writing 200 lines can take longer than the 1 s window, and the
            // rest of a burst would then open fresh windows instead of being summed up).
            let read_at = Instant::now();
            let mut burst = Vec::new();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match R::decode(&item) {
                    Some(record) => burst.push(record),
                    None => tracing::warn!(len = item.len(), kind = R::KIND, "undecodable event"),
                }
            }
            guard.clear_ready();
            for record in burst {
                if limiter.admit_at(read_at) {
                    record.log();
                    crate::audit::emit(record.audit());
                }
            }
        }
    }))
}

/// Admits at most [`Limiter::PER_SECOND`] log lines (and audit records) a second; the rest are
/// counted and reported in one summary line and one `kernel_deny_suppressed` audit record, so
/// a flood cannot fill the disk. The kernel's
/// per-CPU counters still count every deny.
#[derive(Debug)]
pub struct Limiter {
    summary_event: &'static str,
    side: &'static str,
    window: Instant,
    logged: u32,
    suppressed: u64,
}

impl Limiter {
    pub const PER_SECOND: u32 = 200;

    pub fn new(summary_event: &'static str, side: &'static str) -> Limiter {
        Limiter {
            summary_event,
            side,
            window: Instant::now(),
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether one more line, read from the ring buffer at `now`, may be logged.
    fn admit_at(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                tracing::warn!(
                    event = self.summary_event,
                    suppressed = self.suppressed,
                    "deny events not logged individually (rate limit)"
                );
                crate::audit::emit(crate::audit::Event::KernelDenySuppressed {
                    side: self.side.to_owned(),
                    suppressed: self.suppressed,
                });
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

/// A record's bytes as the program writes them, for the decoders' tests.
#[cfg(test)]
pub(super) fn raw_bytes<T: aya::Pod>(record: &T) -> Vec<u8> {
    // SAFETY: plain old data viewed as bytes, for exactly its size.
    unsafe { std::slice::from_raw_parts((record as *const T).cast::<u8>(), size_of::<T>()) }
        .to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_logged_at_most_per_second_quota() {
        let mut l = Limiter::new("test_suppressed", "gateway");
        let t0 = l.window;
        let logged = (0..500).filter(|_| l.admit_at(t0)).count();
        assert_eq!(logged, Limiter::PER_SECOND as usize);
        assert_eq!(l.suppressed, 500 - Limiter::PER_SECOND as u64);
        // The next second starts a new quota.
        assert!(l.admit_at(t0 + Duration::from_millis(1001)));
        assert_eq!(l.suppressed, 0);
    }
}
