//! Kernel segmentation on the gateway host: loads moat's `cgroup_sock_addr` programs, attaches
//! them at the cgroup2 root as bpf links, pins everything, feeds the policy, and reads deny
//! events.
//!
//! Life cycle:
//! - **install**: load the object, pin the maps, write the policy, then attach and pin the
//!   links — enforcement starts with the right policy, never an empty one;
//! - **adopt**: the pinned maps and links of this schema version are reused (no second copy
//!   is stacked); each link is switched to this binary's program in one atomic update, so an
//!   upgrade has no gap; the new policy is swapped in;
//! - **fail-static**: nothing is detached when the daemon exits or dies; only
//!   [`uninstall`] removes enforcement.
//!
//! The inference host's ingress guard lives in [`inference`], under the same pin root and
//! schema version.

mod events;
pub mod inference;
mod link;
mod maps;
pub(crate) mod pinned;
mod pins;
mod policy;
mod status;

use std::{fs::File, os::fd::AsFd, path::Path};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink},
};
use moat_common::Hook;
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
    /// Installs enforcement under `pins`, or adopts what is pinned there, and makes `policy`
    /// the active policy.
    ///
    /// One path does both, and converges on this binary's programs:
    /// 1. the object is loaded with every map bound to its pin — an existing pin is reused
    ///    (the policy and counters survive), a missing one is created and pinned;
    /// 2. the policy is written (before any new program can run);
    /// 3. per hook, a pinned link is kept and switched to the new program in one atomic
    ///    `BPF_LINK_UPDATE` (no gap, no second copy); a missing link is attached and pinned.
    pub fn install_or_adopt(pins: &Pins, policy: &Policy) -> Result<Enforcer> {
        ensure_bpffs(pins.root())?;
        let had_links = Hook::ALL.iter().any(|h| pins.link(*h).exists());
        if let Err(e) = install(pins, policy) {
            if !had_links {
                // Leave nothing half-installed behind a refused start (the inference guard,
                // if any, is not this start's to remove).
                let _ = uninstall_gateway(pins);
            }
            return Err(e);
        }
        let maps = PolicyMaps::open(pins)?;
        if had_links {
            info!(pins = %pins.dir().display(), "adopted pinned kernel enforcement (programs updated in place)");
        } else {
            info!(pins = %pins.dir().display(), "installed kernel enforcement");
        }
        Ok(Enforcer {
            pins: pins.clone(),
            maps,
            adopted: had_links,
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

    /// The hooks' counters, summed over CPUs, and the deny events lost.
    pub fn hook_counts(&self) -> Result<(Vec<crate::metrics::HookCount>, u64)> {
        Ok(pinned::hook_counts(
            &self.maps.counters()?,
            &Hook::ALL,
            Hook::program_name,
            moat_common::counter_index,
            moat_common::EVENTS_LOST_COUNTER,
        ))
    }

    /// The deny-event ring buffer (one reader at a time drains it).
    pub fn open_events(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        maps::open_events(&self.pins)
    }

    /// Logs every deny event until the task is dropped.
    pub fn spawn_event_logger(&self) -> Result<tokio::task::JoinHandle<()>> {
        pinned::spawn_ring_logger::<Deny>(self.open_events()?)
    }
}

/// The embedded eBPF object, or why there is none. Lifts RLIMIT_MEMLOCK for the loads that
/// follow.
pub(crate) fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this moat binary was built without its eBPF programs; build it with `cargo xtask build`"
        );
    }
    raise_memlock();
    Ok(OBJECT)
}

/// Size of the embedded eBPF object (0 when the binary was built without it).
pub fn object_len() -> usize {
    OBJECT.len()
}

fn install(pins: &Pins, policy: &Policy) -> Result<()> {
    let object = object()?;
    pins.create_dirs()
        .with_context(|| format!("cannot create {}", pins.dir().display()))?;
    let map_pins: Vec<(&str, std::path::PathBuf)> =
        pins::ALL_MAPS.iter().map(|m| (*m, pins.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load(object)
        .context("cannot load moat's eBPF object")?;
    // The policy goes in before any program of this object can run.
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
        let pinned = pins.link(hook);
        if link::update_pinned(&pinned, prog.fd()?.as_fd()).with_context(|| {
            format!("cannot switch link {} to the new program", pinned.display())
        })? {
            continue;
        }
        // A cgroup bpf link always coexists with other programs; the kernel refuses the
        // legacy BPF_F_ALLOW_MULTI flag on links, so the mode must be `Single` (flags 0).
        let id = prog
            .attach(&root, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {name} at {}", root_path.display()))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .with_context(|| format!("{name} was not attached as a bpf link"))?;
        link.pin(&pinned)
            .with_context(|| format!("cannot pin link {name}"))?;
    }
    Ok(())
}

/// Removes every pin of this schema version — the inference guard's and the gateway side's,
/// links first, so enforcement stops before the maps go. Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    let guard = inference::uninstall(pins)?;
    Ok(guard + uninstall_gateway(pins)?)
}

/// Removes the gateway side's pins (the inference guard's stay).
fn uninstall_gateway(pins: &Pins) -> Result<usize> {
    let mut removed = 0;
    for hook in Hook::ALL {
        let path = pins.link(hook);
        link::detach_pinned(&path).with_context(|| format!("cannot detach {}", path.display()))?;
        removed += remove_pin(&path)?;
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
