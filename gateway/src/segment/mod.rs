//! Kernel segmentation on the gateway host: loads moat's `cgroup_sock_addr` programs, attaches
//! them at the cgroup2 root as bpf links, pins everything, feeds the policy, and reads deny
//! events.
//!
//! Life cycle:
//! - **install**: load the object, pin the maps, write the policy, then attach and pin the
//!   links — enforcement starts with the right policy, never an empty one;
//! - **adopt**: a complete pinned installation of this schema version is reused as is (no
//!   second copy is stacked), and the new policy is swapped in;
//! - **fail-static**: nothing is detached when the daemon exits or dies; only
//!   [`uninstall`] removes enforcement.

mod events;
mod maps;
mod pins;
mod policy;
mod status;

use std::{fs::File, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use moat_common::Hook;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::info;

pub use events::Deny;
pub use maps::PolicyMaps;
pub use pins::Pins;
pub use policy::{GatewayIdentity, Policy, describe_flags};
pub use status::{Status, status};

use crate::cgroup;

/// The eBPF object built by `cargo xtask build` (empty when the binary was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat.bpf.o"));

/// A live handle on the pinned enforcement. Dropping it changes nothing in the kernel.
pub struct Enforcer {
    pins: Pins,
    maps: PolicyMaps,
    adopted: bool,
}

impl Enforcer {
    /// Adopts the complete pinned installation under `pins`, or installs a fresh one, and
    /// makes `policy` the active policy.
    pub fn install_or_adopt(pins: &Pins, policy: &Policy) -> Result<Enforcer> {
        ensure_bpffs(pins.root())?;
        if pins.complete() {
            let mut maps = PolicyMaps::open(pins)?;
            maps.apply(policy)?;
            info!(pins = %pins.dir().display(), "adopted pinned kernel enforcement");
            return Ok(Enforcer {
                pins: pins.clone(),
                maps,
                adopted: true,
            });
        }
        if pins.any() {
            // A crash during an earlier install left part of it: start over cleanly.
            tracing::warn!(pins = %pins.dir().display(), "incomplete pinned installation; reinstalling");
            uninstall(pins)?;
        }
        if let Err(e) = install(pins, policy) {
            // Leave nothing half-installed behind a refused start.
            let _ = uninstall(pins);
            return Err(e);
        }
        let maps = PolicyMaps::open(pins)?;
        info!(pins = %pins.dir().display(), "installed kernel enforcement");
        Ok(Enforcer {
            pins: pins.clone(),
            maps,
            adopted: false,
        })
    }

    /// Swaps in a new policy atomically (see [`PolicyMaps::apply`]).
    pub fn apply(&mut self, policy: &Policy) -> Result<()> {
        self.maps.apply(policy)
    }

    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> &Pins {
        &self.pins
    }

    pub fn maps(&self) -> &PolicyMaps {
        &self.maps
    }

    /// The deny-event ring buffer (one reader at a time drains it).
    pub fn open_events(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        maps::open_events(&self.pins)
    }

    /// Logs every deny event until the task is dropped.
    pub fn spawn_event_logger(&self) -> Result<tokio::task::JoinHandle<()>> {
        let ring = self.open_events()?;
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
        // as the AsyncFd owns the ring buffer.
        let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the deny-event ring buffer: {e}"))?;
        Ok(tokio::spawn(async move {
            loop {
                let Ok(mut guard) = fd.readable_mut().await else {
                    return;
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    match Deny::decode(&item) {
                        Some(deny) => deny.log(),
                        None => tracing::warn!(len = item.len(), "undecodable deny event"),
                    }
                }
                guard.clear_ready();
            }
        }))
    }
}

fn install(pins: &Pins, policy: &Policy) -> Result<()> {
    if OBJECT.is_empty() {
        bail!(
            "this moat binary was built without its eBPF programs; build it with `cargo xtask build`"
        );
    }
    raise_memlock();
    let mut bpf = Ebpf::load(OBJECT).context("cannot load moat's eBPF object")?;
    pins.create_dirs()
        .with_context(|| format!("cannot create {}", pins.dir().display()))?;
    for name in pins::ALL_MAPS {
        let map = bpf
            .map(name)
            .with_context(|| format!("eBPF object has no map {name}"))?;
        map.pin(pins.map(name))
            .with_context(|| format!("cannot pin map {name}"))?;
    }
    // The policy goes in before any program is attached.
    PolicyMaps::open(pins)?.apply(policy)?;
    let root_path = cgroup::cgroup2_mount()?;
    let root =
        File::open(&root_path).with_context(|| format!("cannot open {}", root_path.display()))?;
    for hook in Hook::ALL {
        let name = hook.program_name();
        let prog: &mut CgroupSockAddr = bpf
            .program_mut(name)
            .with_context(|| format!("eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused program {name}"))?;
        let id = prog
            // A cgroup bpf link always coexists with other programs; the kernel refuses the
            // legacy BPF_F_ALLOW_MULTI flag on links, so the mode must be `Single` (flags 0).
            .attach(&root, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {name} at {}", root_path.display()))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .with_context(|| format!("{name} was not attached as a bpf link"))?;
        link.pin(pins.link(hook))
            .with_context(|| format!("cannot pin link {name}"))?;
    }
    Ok(())
}

/// Removes every pin of this schema version (links first, so enforcement stops before the
/// maps go). Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    let mut removed = 0;
    for hook in Hook::ALL {
        removed += remove_pin(&pins.link(hook))?;
    }
    for name in pins::ALL_MAPS {
        removed += remove_pin(&pins.map(name))?;
    }
    for dir in [
        pins.dir().join("links"),
        pins.dir().join("maps"),
        pins.dir().to_path_buf(),
    ] {
        let _ = std::fs::remove_dir(dir);
    }
    // The pin root itself goes too when moat was its only user.
    let _ = std::fs::remove_dir(pins.root());
    Ok(removed)
}

fn remove_pin(path: &Path) -> Result<usize> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(1),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}

/// The pin root must live on a bpffs. `/sys/fs/bpf` is mounted when it is not (root only).
fn ensure_bpffs(pin_root: &Path) -> Result<()> {
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

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so loading never fails on
/// a small default there.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}
