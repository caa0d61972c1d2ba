//! Kernel segmentation on an inference host: the ingress guard in front of the model ports.
//!
//! This module owns the guard's pins (`<pin root>/v<schema>/inference/{maps,progs,links}`),
//! its policy (guarded ports and the allowed gateway prefixes, double-buffered like the
//! gateway side), its links (one `cgroup_skb` ingress link at the cgroup2 root and/or one TC
//! ingress attachment per listed interface: a tcx link, or a clsact filter on kernels before
//! 6.6, see [`super::tc`]), its status and its deny events.
//!
//! Life cycle, as on the gateway side — one converging path installs and adopts:
//! 1. the object is loaded with every guard map bound to its pin (an existing pin is reused, so
//!    the policy and counters survive; a missing one is created and pinned);
//! 2. the policy is written (before any new program can run);
//! 3. both guard programs are loaded and pinned, and every pinned link is switched to this
//!    binary's program in one atomic `BPF_LINK_UPDATE` (an upgrade has no gap and stacks no
//!    second copy);
//! 4. the links are reconciled with the config: missing ones attached first, then links no
//!    longer wanted detached, so no moment is unguarded.
//!
//! **Fail-static**: nothing is detached when the daemon exits or dies; only [`uninstall`]
//! removes the guard (detaching each link synchronously, not when the kernel gets round to
//! freeing an unpinned link).

mod attachment;
mod events;
mod maps;
mod policy;
mod status;

use std::os::fd::AsFd;

use anyhow::{Context, Result, bail};
use aya::programs::{
    CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, links::FdLink,
};
use moat_common::guard::IngressHook;
use tracing::info;

pub use super::status::GuardStatus;
pub use attachment::Attachment;
pub use events::IngressDeny;
pub use maps::GuardMaps;
pub use policy::GuardPolicy;
pub use status::{AllowedStatus, GuardCounters, GuardLinkStatus, GuardPolicyStatus, status};

pub use super::side::Inference;
use super::{
    enforcement::Enforcement,
    link, object,
    pin_paths::{Pins, SidePins, remove_pin},
    side::Side,
    tc,
};
use crate::config::InferenceGuard;

/// Where the guard's maps, programs and links are pinned, below the gateway side's versioned
/// directory.
pub type GuardPins = SidePins<Inference>;

/// A live handle on the pinned guard. Dropping it changes nothing in the kernel.
pub type Guard = Enforcement<Inference>;

impl Guard {
    /// Adopts the pinned guard under `pins` or installs a fresh one, makes `guard`'s policy
    /// active and attaches exactly where `guard` asks. A refused first start leaves nothing
    /// behind; a guard that was already enforcing stays (fail-static).
    pub fn install_or_adopt(pins: &Pins, guard: &InferenceGuard) -> Result<Guard> {
        let wanted = Attachment::wanted(guard);
        Enforcement::install_or_adopt_with(pins, |gpins| {
            // Links severed behind moat's back are replaced instead of refusing the start.
            let found = if gpins.links().is_empty() {
                Vec::new()
            } else {
                not_attached(gpins, &wanted)
            };
            converge(gpins, &GuardPolicy::from_config(guard))?;
            let maps = GuardMaps::open(gpins)?;
            reconcile(gpins, &wanted)?;
            log_restored(&found, "adopt");
            Ok(maps)
        })
    }

    /// The wanted links the kernel does not report attached (`cgroup_skb (severed)`,
    /// `tc-eth0 (missing)`) and the map pins that are gone. Empty when all is in place.
    pub fn check(&self, guard: &InferenceGuard) -> Vec<String> {
        not_attached(&self.pins, &Attachment::wanted(guard))
    }

    /// Restores what [`Guard::check`] finds: this binary's programs loaded again with the
    /// pinned maps, attached links switched in place, severed or missing ones attached anew
    /// and pinned; logs `kernel_enforcement_restored`. Returns what was found.
    pub fn heal(&mut self, guard: &InferenceGuard) -> Result<Vec<String>> {
        let found = self.check(guard);
        if found.is_empty() {
            return Ok(found);
        }
        converge(&self.pins, &GuardPolicy::from_config(guard))?;
        self.maps = GuardMaps::open(&self.pins)?;
        reconcile(&self.pins, &Attachment::wanted(guard))?;
        log_restored(&found, "check");
        Ok(found)
    }

    /// Applies a reloaded config, all or nothing: new links are attached first (they run the
    /// old policy until the flip), then the new policy is made active with one atomic flip,
    /// then links no longer wanted are detached. If an attach or the policy write fails, the
    /// links attached by this call are detached again and the old policy stays.
    pub fn apply(&mut self, guard: &InferenceGuard) -> Result<()> {
        let wanted = Attachment::wanted(guard);
        let added = attach_missing(&self.pins, &wanted)?;
        if let Err(e) = self.maps.apply(&GuardPolicy::from_config(guard)) {
            roll_back(&self.pins, &added);
            return Err(e);
        }
        detach_unwanted(&self.pins, &wanted)
    }
}

/// See [`Guard::check`]. Only links this daemon wants count: one that is pinned but no
/// longer wanted is detached by [`reconcile`] anyway.
fn not_attached(pins: &GuardPins, wanted: &[Attachment]) -> Vec<String> {
    let mut found: Vec<String> = wanted
        .iter()
        .filter_map(|at| match attachment_state(pins, at) {
            Ok((true, _)) => None,
            Ok((false, label)) => Some(format!("{} ({label})", at.pin_name())),
            Err(e) => Some(format!("{} (unreadable: {e:#})", at.pin_name())),
        })
        .collect();
    found.extend(
        Inference::MAPS
            .iter()
            .filter(|m| !pins.map(m).exists())
            .map(|m| format!("inference/maps/{m} (missing)")),
    );
    found
}

/// Whether the guard runs at `at`, and the word for its state (`attached`, `severed`,
/// `missing`, `replaced`): for a link, what the kernel says of the link; for a netlink
/// filter's record (a pinned program, kernels before 6.6), what a dump of the interface's
/// filters shows (see [`tc::filter_state`]).
pub(super) fn attachment_state(pins: &GuardPins, at: &Attachment) -> Result<(bool, &'static str)> {
    let path = pins.link(at);
    match at {
        Attachment::Tc(ifname) if tc::pinned_is_program(&path) == Some(true) => {
            let state = tc::filter_state(ifname, &path)?;
            Ok((state.attached(), state.label()))
        }
        _ => {
            let state = link::link_state(&path)?;
            Ok((state.attached(), state.label()))
        }
    }
}

fn log_restored(found: &[String], during: &'static str) {
    if !found.is_empty() {
        tracing::warn!(
            event = "kernel_enforcement_restored",
            found = %found.join(", "),
            during,
            "inference guard enforcement was removed behind moat's back; restored"
        );
    }
}

/// Attaches what is wanted but not pinned, then removes pinned links no longer wanted.
fn reconcile(pins: &GuardPins, wanted: &[Attachment]) -> Result<()> {
    attach_missing(pins, wanted)?;
    detach_unwanted(pins, wanted)
}

/// Attaches every wanted link that is not pinned yet; on a failure, detaches the ones this
/// call attached and returns the error. Returns what it attached.
fn attach_missing(pins: &GuardPins, wanted: &[Attachment]) -> Result<Vec<Attachment>> {
    let pinned = pins.links();
    let mut added = Vec::new();
    for at in wanted {
        if pinned.contains(at) {
            continue;
        }
        if let Err(e) = attach(pins, at) {
            roll_back(pins, &added);
            return Err(e);
        }
        info!(attachment = %at, "inference guard attached");
        added.push(at.clone());
    }
    Ok(added)
}

fn roll_back(pins: &GuardPins, added: &[Attachment]) {
    for at in added {
        if let Err(e) = link::detach_and_unpin(&pins.link(at)) {
            tracing::error!(attachment = %at, error = %format!("{e:#}"), "cannot roll back a guard link");
        }
    }
}

fn detach_unwanted(pins: &GuardPins, wanted: &[Attachment]) -> Result<()> {
    for at in pins.links() {
        if !wanted.contains(&at) {
            link::detach_and_unpin(&pins.link(&at))?;
            info!(attachment = %at, "inference guard detached (no longer in the config)");
        }
    }
    Ok(())
}

/// Steps 1–3 of the life cycle: maps bound to their pins, policy written, this binary's
/// programs loaded and pinned, pinned links switched to them.
fn converge(pins: &GuardPins, policy: &GuardPolicy) -> Result<()> {
    let mut bpf = object::load(pins)?;
    // The policy goes in before any program of this object can run.
    GuardMaps::open(pins)?.apply(policy)?;
    let links = pins.links();
    for hook in IngressHook::ALL {
        let name = hook.program_name();
        let prog = bpf
            .program_mut(name)
            .with_context(|| format!("eBPF object has no program {name}"))?;
        match hook {
            IngressHook::CgroupSkb => {
                let p: &mut CgroupSkb = prog.try_into()?;
                p.load()
            }
            IngressHook::Tc => {
                let p: &mut SchedClassifier = prog.try_into()?;
                p.load()
            }
        }
        .with_context(|| format!("the kernel refused program {name}"))?;
        let prog = bpf.program_mut(name).expect("loaded above");
        let path = pins.program(hook);
        remove_pin(&path)?;
        prog.pin(&path)
            .with_context(|| format!("cannot pin program {name}"))?;
        for at in links.iter().filter(|a| a.hook() == hook) {
            let path = pins.link(at);
            match at {
                // A netlink filter's record: swap the filter's program, re-pin the record. A
                // filter removed behind moat's back has nothing to swap: its record goes, and
                // `reconcile` adds the filter (and the clsact qdisc) anew.
                Attachment::Tc(ifname) if tc::pinned_is_program(&path) == Some(true) => {
                    if tc::filter_state(ifname, &path)? == tc::FilterState::Missing {
                        remove_pin(&path)?;
                        continue;
                    }
                    let p: &mut SchedClassifier =
                        bpf.program_mut(name).expect("loaded").try_into()?;
                    tc::replace_filter(p, ifname)?;
                    remove_pin(&path)?;
                    p.pin(&path)
                        .with_context(|| format!("cannot pin {}", path.display()))?;
                }
                // A severed link cannot be updated: its pin goes, and `reconcile` attaches anew.
                _ if link::link_state(&path)?.attached() => {
                    let fd = bpf.program_mut(name).expect("loaded").fd()?;
                    link::switch_pinned(&path, fd.as_fd())?;
                }
                _ => {
                    remove_pin(&path)?;
                }
            }
        }
    }
    Ok(())
}

/// Attaches the pinned program for `at` and pins the link.
fn attach(pins: &GuardPins, at: &Attachment) -> Result<()> {
    let fd_link: FdLink = match at {
        Attachment::CgroupRoot => {
            let mut prog = CgroupSkb::from_pin(
                pins.program(IngressHook::CgroupSkb),
                CgroupSkbAttachType::Ingress,
            )
            .context("cannot open the pinned cgroup_skb guard program")?;
            let (root_path, root) = link::cgroup_root()?;
            // Links always coexist with other programs; the kernel refuses BPF_F_ALLOW_MULTI
            // on links, so the mode is `Single` (flags 0).
            let id = prog
                .attach(
                    &root,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .with_context(|| {
                    format!(
                        "cannot attach cgroup_skb ingress at {}",
                        root_path.display()
                    )
                })?;
            FdLink::try_from(prog.take_link(id)?)
                .context("cgroup_skb guard was not attached as a bpf link")?
        }
        Attachment::Tc(ifname) => {
            let mut prog = SchedClassifier::from_pin(pins.program(IngressHook::Tc))
                .context("cannot open the pinned tc guard program")?;
            match tc::attach(&mut prog, ifname)? {
                tc::Attached::Link(link) => link,
                // The filter lives in the qdisc; the program pinned at the link pin records it.
                tc::Attached::Filter => {
                    let path = pins.link(at);
                    return prog
                        .pin(&path)
                        .with_context(|| format!("cannot pin {}", path.display()));
                }
            }
        }
    };
    link::pin(fd_link, &pins.link(at))
}

/// Removes every pin of the guard (links first, so enforcement stops before the maps go).
/// Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    GuardPins::new(pins).remove_all()
}

/// Refuses a reload that would change what `moat serve` runs: turning the guard on or off
/// needs a restart (on) or `moat segment uninstall` (off), because only uninstall removes
/// enforcement.
pub fn check_reload(running: bool, new: Option<&InferenceGuard>) -> Result<()> {
    match (running, new.is_some()) {
        (true, false) => bail!(
            "the new config has no [segmentation.inference] but the guard is running; \
             remove it with `moat segment uninstall`"
        ),
        (false, true) => {
            bail!("the new config adds [segmentation.inference]; restart moat to install the guard")
        }
        _ => Ok(()),
    }
}
