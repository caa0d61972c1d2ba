//! What the running kernel must offer, checked before anything is loaded, so a kernel that
//! cannot enforce is refused at start with a sentence naming the version it needs (never a
//! feature silently left out). Per-hook needs, and the kernels the VM suite runs, are in
//! `docs/kernel-enforcement.md` ("Kernels").
//!
//! The one choice that depends on the version is made in [`super::tc`]: TC programs attach as
//! tcx links from 6.6 on, as clsact filters through netlink before.

use anyhow::{Result, bail};
use aya::util::KernelVersion;

/// The newest of what every side uses: bpf links for cgroup hooks and `BPF_LINK_UPDATE` (5.7),
/// the ring buffer for deny events (5.8), `BPF_LINK_DETACH` for uninstall (5.9).
pub const FLOOR: (u8, u8) = (5, 9);

/// Refuses a kernel older than [`FLOOR`].
pub fn check() -> Result<()> {
    match KernelVersion::current() {
        Ok(v) => check_version(v),
        // An unreadable version is not a reason to refuse: loading fails clearly if need be.
        Err(_) => Ok(()),
    }
}

fn check_version(v: KernelVersion) -> Result<()> {
    if v < KernelVersion::new(FLOOR.0, FLOOR.1, 0) {
        bail!(
            "this kernel is Linux {v}; moat's kernel enforcement needs Linux {}.{} or newer \
             (bpf links that can be updated and detached, and the bpf ring buffer)",
            FLOOR.0,
            FLOOR.1
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_kernel_is_refused_naming_the_version_it_needs() {
        let e = check_version(KernelVersion::new(5, 4, 0))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Linux 5.4.0") && e.contains("Linux 5.9 or newer"),
            "{e}"
        );
        assert!(check_version(KernelVersion::new(5, 9, 0)).is_ok());
        assert!(check_version(KernelVersion::new(6, 1, 176)).is_ok());
    }
}
