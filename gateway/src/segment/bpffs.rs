//! The bpffs under the pin root: both sides pin there, so it is mounted first when missing.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// The pin root must live on a bpffs. `/sys/fs/bpf` is mounted when it is not (root only).
pub fn ensure_bpffs(pin_root: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    let bpf_mounts: Vec<&str> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"bpf")).then(|| f[1])
        })
        .collect();
    if bpf_mounts.iter().any(|m| pin_root.starts_with(m)) {
        return Ok(());
    }
    if pin_root.starts_with("/sys/fs/bpf") {
        nix::mount::mount(
            Some("bpf"),
            "/sys/fs/bpf",
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("cannot mount a bpffs at /sys/fs/bpf")?;
        return Ok(());
    }
    bail!(
        "pin root {} is not on a bpffs (mounted bpffs: {bpf_mounts:?})",
        pin_root.display()
    )
}
