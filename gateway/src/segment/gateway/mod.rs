//! Kernel segmentation on the gateway host: moat's `cgroup_sock_addr` programs and its
//! `cgroup_skb/egress` program (the destination after NAT) attached at the cgroup2 root as bpf
//! links, everything pinned, the policy fed, deny events read.
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
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, links::FdLink,
};
use moat_common::Hook;
use tracing::{info, warn};

pub use super::status::GatewayStatus;
pub use events::Deny;
pub use maps::PolicyMaps;
pub use policy::{GatewayIdentity, Policy, describe_flags};
pub use status::{DestinationStatus, LinkStatus, PolicyStatus, status};

pub use super::side::Gateway;
use super::{
    enforcement::Enforcement,
    link::{self, LinkState},
    object,
    pin_paths::{Pins, SidePins, remove_pin},
    side::Side,
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
            // Adopting pins of which something was removed or severed behind moat's back
            // restores it (instead of refusing, which would leave the host unenforced).
            let found = if gpins.links().is_empty() {
                Vec::new()
            } else {
                not_enforcing(gpins)
            };
            install(gpins, policy)?;
            log_restored(&found, "adopt");
            PolicyMaps::open(gpins)
        })
    }

    /// What the kernel reports as not enforcing now: each hook whose link is not attached, and
    /// each map pin that is gone, as `connect4 (severed)`, `cgroup_egress (missing)`,
    /// `maps/MOAT_ACTIVE (missing)`. Empty when everything is in place.
    pub fn check(&self) -> Vec<String> {
        not_enforcing(&self.pins)
    }

    /// Each hook's link and whether the kernel reports it attached.
    pub fn links_attached(&self) -> Vec<(&'static str, bool)> {
        Hook::ALL
            .iter()
            .map(|h| {
                let state = link::cgroup_link_state(&self.pins.link(h));
                (h.program_name(), state.is_ok_and(LinkState::attached))
            })
            .collect()
    }

    /// Restores what [`Enforcer::check`] finds missing: loads this binary's programs again
    /// with the pinned maps (a map whose pin is gone is created anew and `policy` written
    /// into it), attaches a new link for each severed or missing one and pins it; attached
    /// links are switched in place, with no gap. Logs `kernel_enforcement_restored` naming
    /// what it found. Returns what was found (empty: nothing to do, nothing done).
    pub fn heal(&mut self, policy: &Policy) -> Result<Vec<String>> {
        let found = self.check();
        if found.is_empty() {
            return Ok(found);
        }
        install(&self.pins, policy)?;
        self.maps = PolicyMaps::open(&self.pins)?;
        log_restored(&found, "check");
        Ok(found)
    }

    /// Swaps in a new policy atomically (see [`PolicyMaps::apply`]).
    pub fn apply(&mut self, policy: &Policy) -> Result<()> {
        self.maps.apply(policy)
    }
}

fn install(pins: &GatewayPins, policy: &Policy) -> Result<()> {
    replace_outgrown_counters(pins)?;
    let mut bpf = object::load(pins)?;
    // The policy goes in before any program of this object can run.
    PolicyMaps::open(pins)?.apply(policy)?;
    let (root_path, root) = link::cgroup_root()?;
    for hook in Hook::ALL {
        let name = hook.program_name();
        let prog = bpf
            .program_mut(name)
            .with_context(|| format!("eBPF object has no program {name}"))?;
        let pinned = pins.link(&hook);
        match hook {
            Hook::Egress => {
                let prog: &mut CgroupSkb = prog.try_into()?;
                prog.load()
                    .with_context(|| format!("the kernel refused program {name}"))?;
                if keep_or_restore(&pinned, prog.fd()?.as_fd())? {
                    continue;
                }
                // See below for why the mode is `Single`.
                let id = prog
                    .attach(&root, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)
                    .with_context(|| format!("cannot attach {name} at {}", root_path.display()))?;
                let fd_link = FdLink::try_from(prog.take_link(id)?)
                    .with_context(|| format!("{name} was not attached as a bpf link"))?;
                link::pin(fd_link, &pinned)?;
            }
            _ => {
                let prog: &mut CgroupSockAddr = prog.try_into()?;
                prog.load()
                    .with_context(|| format!("the kernel refused program {name}"))?;
                if keep_or_restore(&pinned, prog.fd()?.as_fd())? {
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
        }
    }
    Ok(())
}

/// A pinned link that is still attached is switched to `program` in place (`true`: nothing
/// more to do). One that was severed behind moat's back (`bpftool link detach`, a cgroup
/// removed) cannot be updated: its pin is removed, so the caller attaches a new one.
fn keep_or_restore(pinned: &std::path::Path, program: std::os::fd::BorrowedFd<'_>) -> Result<bool> {
    match link::cgroup_link_state(pinned)? {
        LinkState::Attached { .. } => link::switch_pinned(pinned, program),
        LinkState::Severed { .. } => {
            remove_pin(pinned)?;
            Ok(false)
        }
        LinkState::Missing => Ok(false),
    }
}

/// See [`Enforcer::check`].
fn not_enforcing(pins: &GatewayPins) -> Vec<String> {
    let mut found: Vec<String> = Hook::ALL
        .iter()
        .filter_map(|h| match link::cgroup_link_state(&pins.link(h)) {
            Ok(state) if state.attached() => None,
            Ok(state) => Some(format!("{} ({})", h.program_name(), state.label())),
            Err(e) => Some(format!("{} (unreadable: {e:#})", h.program_name())),
        })
        .collect();
    found.extend(
        Gateway::MAPS
            .iter()
            .filter(|m| !pins.map(m).exists())
            .map(|m| format!("maps/{m} (missing)")),
    );
    found
}

fn log_restored(found: &[String], during: &'static str) {
    if !found.is_empty() {
        warn!(
            event = "kernel_enforcement_restored",
            found = %found.join(", "),
            during,
            "kernel enforcement was removed behind moat's back; restored"
        );
    }
}

/// Before the egress hook the counter array had 9 slots; the programs of this binary write
/// 11. A pinned array of another size is replaced (its counts restart): the old programs keep
/// writing the old one until their links are switched, moments later.
fn replace_outgrown_counters(pins: &GatewayPins) -> Result<()> {
    let path = pins.map(moat_common::names::MAP_COUNTERS);
    if !path.exists() {
        return Ok(());
    }
    let entries = aya::maps::MapData::from_pin(&path)
        .and_then(|m| m.info())
        .map(|i| i.max_entries())
        .with_context(|| format!("cannot read pinned map {}", path.display()))?;
    if entries != moat_common::COUNTERS {
        info!(
            map = %path.display(),
            entries,
            "replacing a counter array of an older layout (counts restart)"
        );
        remove_pin(&path)?;
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
