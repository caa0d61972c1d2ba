//! Kernel segmentation on the gateway host: moat's `cgroup_sock_addr` programs attached at the
//! cgroup2 root as bpf links, everything pinned, the policy fed, deny events read.
//!
//! Life cycle:
//! - **install**: load the object, pin the maps, write the policy, then attach and pin the
//!   links — enforcement starts with the right policy, never an empty one;
//! - **adopt**: the pinned maps and links of this schema version are reused (no second copy
//!   is stacked); each link is switched to this binary's program in one atomic update, so an
//!   upgrade has no gap; the new policy is swapped in;
//! - **fail-static**: nothing is detached when the daemon exits or dies; only
//!   `moat segment uninstall` removes enforcement.

mod events;
mod maps;
mod policy;
mod status;

use std::{os::fd::AsFd, path::PathBuf};

use anyhow::{Context, Result};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use moat_common::{Hook, names};
use tracing::info;

pub use events::Deny;
pub use maps::PolicyMaps;
pub use policy::{GatewayIdentity, Policy, describe_flags};
pub use status::{DestinationStatus, GatewayStatus, LinkStatus, status};

use super::{
    bpffs, counters, link, object,
    pin_paths::{Pins, SidePins},
    pinned_maps,
    side::Side,
};

/// The gateway side, as the shared modules see it.
pub enum Gateway {}

impl Side for Gateway {
    // Its pins sit directly in the versioned directory (the layout predates the guard).
    const SUBDIR: &'static str = "";
    const PIN_SUBDIRS: &'static [&'static str] = &["maps", "links"];
    const MAPS: &'static [&'static str] = &names::MAPS;
    const COUNTERS_MAP: &'static str = names::MAP_COUNTERS;
    const EVENTS_MAP: &'static str = names::MAP_EVENTS;
    const EVENTS_LOST_COUNTER: u32 = moat_common::EVENTS_LOST_COUNTER;

    type Hook = Hook;
    const HOOKS: &'static [Hook] = &Hook::ALL;
    fn program_name(hook: Hook) -> &'static str {
        hook.program_name()
    }
    fn hook_label(hook: Hook) -> &'static str {
        hook.program_name()
    }
    fn counter_index(hook: Hook, denied: bool) -> u32 {
        moat_common::counter_index(hook, denied)
    }

    // One link per hook, at the cgroup2 root, named after its program.
    type Link = Hook;
    fn link_pin_name(hook: &Hook) -> String {
        hook.program_name().to_owned()
    }
    fn link_from_pin_name(name: &str) -> Option<Hook> {
        Hook::ALL.into_iter().find(|h| h.program_name() == name)
    }

    /// Every map and every hook's link (programs live as long as their links; no program pin).
    fn required_pins(pins: &GatewayPins) -> Vec<PathBuf> {
        let maps = Self::MAPS.iter().map(|m| pins.map(m));
        maps.chain(Hook::ALL.iter().map(|h| pins.link(h))).collect()
    }

    type Deny = Deny;
}

/// Where the gateway side's maps and links are pinned.
pub type GatewayPins = SidePins<Gateway>;

/// A live handle on the pinned enforcement. Dropping it changes nothing in the kernel.
pub struct Enforcer {
    pins: GatewayPins,
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
        bpffs::ensure_bpffs(pins.root())?;
        let gpins = GatewayPins::new(pins);
        let had_links = !gpins.links().is_empty();
        if let Err(e) = install(&gpins, policy) {
            if !had_links {
                // Leave nothing half-installed behind a refused start (the inference guard,
                // if any, is not this start's to remove).
                let _ = uninstall(pins);
            }
            return Err(e);
        }
        let maps = PolicyMaps::open(&gpins)?;
        if had_links {
            info!(pins = %gpins.dir().display(), "adopted pinned kernel enforcement (programs updated in place)");
        } else {
            info!(pins = %gpins.dir().display(), "installed kernel enforcement");
        }
        Ok(Enforcer {
            pins: gpins,
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

    pub fn pins(&self) -> &GatewayPins {
        &self.pins
    }

    pub fn maps(&self) -> &PolicyMaps {
        &self.maps
    }

    /// The hooks' counters, summed over CPUs, and the deny events lost.
    pub fn hook_counts(&self) -> Result<(Vec<crate::metrics::HookCount>, u64)> {
        Ok(counters::per_hook::<Gateway>(&self.maps.counters()?))
    }

    /// The deny-event ring buffer (one reader at a time drains it).
    pub fn open_events(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        pinned_maps::open_events(&self.pins)
    }

    /// Logs every deny event until the task is dropped (rate-limited, see
    /// [`super::events::Limiter`]).
    pub fn spawn_event_logger(&self) -> Result<tokio::task::JoinHandle<()>> {
        super::events::spawn_ring_logger::<Deny>(self.open_events()?)
    }
}

fn install(pins: &GatewayPins, policy: &Policy) -> Result<()> {
    let mut bpf = object::load(pins)?;
    // The policy goes in before any program of this object can run.
    PolicyMaps::open(pins)?.apply(policy)?;
    let (root_path, root) = link::cgroup_root()?;
    for hook in Hook::ALL {
        let name = hook.program_name();
        let prog: &mut CgroupSockAddr = bpf
            .program_mut(name)
            .with_context(|| format!("eBPF object has no program {name}"))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused program {name}"))?;
        let pinned = pins.link(&hook);
        if link::switch_pinned(&pinned, prog.fd()?.as_fd())? {
            continue;
        }
        // A cgroup bpf link always coexists with other programs; the kernel refuses the
        // legacy BPF_F_ALLOW_MULTI flag on links, so the mode must be `Single` (flags 0).
        let id = prog
            .attach(&root, CgroupAttachMode::Single)
            .with_context(|| format!("cannot attach {name} at {}", root_path.display()))?;
        let fd_link = FdLink::try_from(prog.take_link(id)?)
            .with_context(|| format!("{name} was not attached as a bpf link"))?;
        link::pin(fd_link, &pinned)?;
    }
    Ok(())
}

/// Removes the gateway side's pins (the inference guard's stay), and the pin root when moat
/// was its only user. Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    let removed = GatewayPins::new(pins).remove_all()?;
    let _ = std::fs::remove_dir(pins.root());
    Ok(removed)
}
