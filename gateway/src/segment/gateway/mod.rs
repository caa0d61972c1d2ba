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

use std::os::fd::AsFd;

use anyhow::{Context, Result};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use moat_common::Hook;

pub use super::status::GatewayStatus;
pub use events::Deny;
pub use maps::PolicyMaps;
pub use policy::{GatewayIdentity, Policy, describe_flags};
pub use status::{DestinationStatus, LinkStatus, PolicyStatus, status};

pub use super::side::Gateway;
use super::{
    enforcement::Enforcement,
    link, object,
    pin_paths::{Pins, SidePins},
};

/// Where the gateway side's maps and links are pinned.
pub type GatewayPins = SidePins<Gateway>;

/// A live handle on the pinned enforcement. Dropping it changes nothing in the kernel.
pub type Enforcer = Enforcement<Gateway>;

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
    ///
    /// A refused first start leaves nothing behind (the inference guard, if any, is not this
    /// start's to remove).
    pub fn install_or_adopt(pins: &Pins, policy: &Policy) -> Result<Enforcer> {
        Enforcement::install_or_adopt_with(pins, |gpins| {
            install(gpins, policy)?;
            PolicyMaps::open(gpins)
        })
    }

    /// Swaps in a new policy atomically (see [`PolicyMaps::apply`]).
    pub fn apply(&mut self, policy: &Policy) -> Result<()> {
        self.maps.apply(policy)
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
