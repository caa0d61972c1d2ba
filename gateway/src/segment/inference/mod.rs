//! Kernel segmentation on an inference host: the ingress guard in front of the model ports.
//!
//! This module owns the guard's pins (`<pin root>/v<schema>/inference/{maps,progs,links}`),
//! its policy (guarded ports and the allowed gateway prefixes, double-buffered like the
//! gateway side), its links (one `cgroup_skb` ingress link at the cgroup2 root and/or one tcx
//! ingress link per listed interface), its status and its deny events.
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

mod events;
mod maps;
mod policy;
mod status;

use std::{
    fs::File,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use aya::{
    EbpfLoader,
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, SchedClassifier, TcAttachType,
        links::FdLink,
    },
};
use moat_common::guard::IngressHook;
use tracing::info;

pub use events::IngressDeny;
pub use maps::GuardMaps;
pub use policy::GuardPolicy;
pub use status::{GuardStatus, status};

use super::Pins;
use crate::{
    cgroup,
    config::{GuardAttach, InferenceGuard},
};

/// The guard's map names in the eBPF object (see `ebpf/programs/src/guard.rs`).
pub const MAP_ACTIVE: &str = "MOAT_IN_ACTIVE";
pub const MAP_PORTS: [&str; 2] = ["MOAT_IN_PORTS_0", "MOAT_IN_PORTS_1"];
pub const MAP_SRC4: [&str; 2] = ["MOAT_IN_SRC4_0", "MOAT_IN_SRC4_1"];
pub const MAP_SRC6: [&str; 2] = ["MOAT_IN_SRC6_0", "MOAT_IN_SRC6_1"];
pub const MAP_COUNTERS: &str = "MOAT_IN_COUNTERS";
pub const MAP_EVENTS: &str = "MOAT_IN_EVENTS";

pub const ALL_MAPS: [&str; 9] = [
    MAP_ACTIVE,
    MAP_PORTS[0],
    MAP_PORTS[1],
    MAP_SRC4[0],
    MAP_SRC4[1],
    MAP_SRC6[0],
    MAP_SRC6[1],
    MAP_COUNTERS,
    MAP_EVENTS,
];

/// One place the guard is attached.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Attachment {
    /// cgroup_skb ingress at the cgroup2 root.
    CgroupRoot,
    /// tcx ingress on an interface (of the daemon's network namespace).
    Tc(String),
}

impl Attachment {
    /// The file name of the link's pin.
    pub fn pin_name(&self) -> String {
        match self {
            Attachment::CgroupRoot => "cgroup_skb".to_owned(),
            Attachment::Tc(ifname) => format!("tc-{ifname}"),
        }
    }

    fn from_pin_name(name: &str) -> Option<Attachment> {
        if name == "cgroup_skb" {
            Some(Attachment::CgroupRoot)
        } else {
            name.strip_prefix("tc-")
                .map(|i| Attachment::Tc(i.to_owned()))
        }
    }

    pub fn hook(&self) -> IngressHook {
        match self {
            Attachment::CgroupRoot => IngressHook::CgroupSkb,
            Attachment::Tc(_) => IngressHook::Tc,
        }
    }

    /// What the config asks for.
    pub fn wanted(guard: &InferenceGuard) -> Vec<Attachment> {
        let mut out = Vec::new();
        if matches!(guard.attach, GuardAttach::CgroupSkb | GuardAttach::Both) {
            out.push(Attachment::CgroupRoot);
        }
        if matches!(guard.attach, GuardAttach::Tc | GuardAttach::Both) {
            out.extend(guard.interfaces.iter().cloned().map(Attachment::Tc));
        }
        out
    }
}

impl std::fmt::Display for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attachment::CgroupRoot => write!(f, "cgroup_skb ingress at the cgroup2 root"),
            Attachment::Tc(i) => write!(f, "tc ingress on {i}"),
        }
    }
}

/// Where the guard's pins live, below the gateway side's versioned directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardPins {
    dir: PathBuf,
}

impl GuardPins {
    pub fn new(pins: &Pins) -> GuardPins {
        GuardPins {
            dir: pins.dir().join("inference"),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn program(&self, hook: IngressHook) -> PathBuf {
        self.dir.join("progs").join(hook.program_name())
    }

    pub fn link(&self, at: &Attachment) -> PathBuf {
        self.dir.join("links").join(at.pin_name())
    }

    /// Every map and both programs are pinned (links are reconciled separately).
    pub fn complete(&self) -> bool {
        ALL_MAPS.iter().all(|m| self.map(m).exists())
            && IngressHook::ALL.iter().all(|h| self.program(*h).exists())
    }

    /// The links pinned now.
    pub fn links(&self) -> Vec<Attachment> {
        let mut out: Vec<Attachment> = std::fs::read_dir(self.dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| Attachment::from_pin_name(&e.file_name().to_string_lossy()))
            .collect();
        out.sort();
        out
    }

    fn create_dirs(&self) -> std::io::Result<()> {
        for sub in ["maps", "progs", "links"] {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        Ok(())
    }
}

/// A live handle on the pinned guard. Dropping it changes nothing in the kernel.
pub struct Guard {
    pins: GuardPins,
    maps: GuardMaps,
    adopted: bool,
}

impl Guard {
    /// Adopts the pinned guard under `pins` or installs a fresh one, makes `guard`'s policy
    /// active and attaches exactly where `guard` asks.
    pub fn install_or_adopt(pins: &Pins, guard: &InferenceGuard) -> Result<Guard> {
        super::ensure_bpffs(pins.root())?;
        let gpins = GuardPins::new(pins);
        let policy = GuardPolicy::from_config(guard);
        let wanted = Attachment::wanted(guard);
        let had_links = !gpins.links().is_empty();
        let result = converge(&gpins, &policy).and_then(|()| {
            let mut me = Guard {
                maps: GuardMaps::open(&gpins)?,
                pins: gpins.clone(),
                adopted: had_links,
            };
            me.reconcile(&wanted)?;
            Ok(me)
        });
        match result {
            Ok(me) if had_links => {
                info!(pins = %me.pins.dir().display(), "adopted the pinned inference guard (programs updated in place)");
                Ok(me)
            }
            Ok(me) => {
                info!(pins = %me.pins.dir().display(), "installed the inference guard");
                Ok(me)
            }
            Err(e) => {
                // Leave nothing half-installed behind a refused start; a guard that was
                // already enforcing stays (fail-static).
                if !had_links {
                    let _ = uninstall(pins);
                }
                Err(e)
            }
        }
    }

    /// Applies a reloaded config, all or nothing: new links are attached first (they run the
    /// old policy until the flip), then the new policy is made active with one atomic flip,
    /// then links no longer wanted are detached. If an attach or the policy write fails, the
    /// links attached by this call are detached again and the old policy stays.
    pub fn apply(&mut self, guard: &InferenceGuard) -> Result<()> {
        let wanted = Attachment::wanted(guard);
        let added = self.attach_missing(&wanted)?;
        if let Err(e) = self.maps.apply(&GuardPolicy::from_config(guard)) {
            self.roll_back(&added);
            return Err(e);
        }
        self.detach_unwanted(&wanted)
    }

    /// Attaches what is wanted but not pinned, then removes pinned links no longer wanted.
    fn reconcile(&mut self, wanted: &[Attachment]) -> Result<()> {
        self.attach_missing(wanted)?;
        self.detach_unwanted(wanted)
    }

    /// Attaches every wanted link that is not pinned yet; on a failure, detaches the ones this
    /// call attached and returns the error. Returns what it attached.
    fn attach_missing(&mut self, wanted: &[Attachment]) -> Result<Vec<Attachment>> {
        let pinned = self.pins.links();
        let mut added = Vec::new();
        for at in wanted {
            if pinned.contains(at) {
                continue;
            }
            if let Err(e) = attach(&self.pins, at) {
                self.roll_back(&added);
                return Err(e);
            }
            info!(attachment = %at, "inference guard attached");
            added.push(at.clone());
        }
        Ok(added)
    }

    fn roll_back(&mut self, added: &[Attachment]) {
        for at in added {
            if let Err(e) = detach(&self.pins, at) {
                tracing::error!(attachment = %at, error = %format!("{e:#}"), "cannot roll back a guard link");
            }
        }
    }

    fn detach_unwanted(&mut self, wanted: &[Attachment]) -> Result<()> {
        for at in self.pins.links() {
            if !wanted.contains(&at) {
                detach(&self.pins, &at)?;
                info!(attachment = %at, "inference guard detached (no longer in the config)");
            }
        }
        Ok(())
    }

    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> &GuardPins {
        &self.pins
    }

    /// The guard's counters, summed over CPUs, and the deny events lost.
    pub fn hook_counts(&self) -> Result<(Vec<crate::metrics::HookCount>, u64)> {
        use moat_common::guard::{EVENTS_LOST_COUNTER, counter_index};
        Ok(crate::segment::pinned::hook_counts(
            &self.maps.counters()?,
            &IngressHook::ALL,
            IngressHook::label,
            counter_index,
            EVENTS_LOST_COUNTER,
        ))
    }

    pub fn maps(&self) -> &GuardMaps {
        &self.maps
    }

    /// The deny-event ring buffer (one reader at a time drains it).
    pub fn open_events(&self) -> Result<aya::maps::RingBuf<aya::maps::MapData>> {
        maps::open_events(&self.pins)
    }

    /// Logs every ingress deny event until the task is dropped (rate-limited, see
    /// [`crate::segment::pinned::Limiter`]).
    pub fn spawn_event_logger(&self) -> Result<tokio::task::JoinHandle<()>> {
        crate::segment::pinned::spawn_ring_logger::<IngressDeny>(self.open_events()?)
    }
}

/// Steps 1–3 of the life cycle: maps bound to their pins, policy written, this binary's
/// programs loaded and pinned, pinned links switched to them.
fn converge(pins: &GuardPins, policy: &GuardPolicy) -> Result<()> {
    let object = super::object()?;
    pins.create_dirs()
        .with_context(|| format!("cannot create {}", pins.dir().display()))?;
    let map_pins: Vec<(&str, PathBuf)> = ALL_MAPS.iter().map(|m| (*m, pins.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut bpf = loader
        .load(object)
        .context("cannot load moat's eBPF object")?;
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
        super::remove_pin(&path)?;
        prog.pin(&path)
            .with_context(|| format!("cannot pin program {name}"))?;
        let fd = prog.fd()?;
        for at in links.iter().filter(|a| a.hook() == hook) {
            let link = pins.link(at);
            super::link::update_pinned(&link, fd.as_fd()).with_context(|| {
                format!("cannot switch link {} to the new program", link.display())
            })?;
        }
    }
    Ok(())
}

/// Detaches the link now (not when the kernel frees the unpinned link) and removes its pin.
fn detach(pins: &GuardPins, at: &Attachment) -> Result<usize> {
    let path = pins.link(at);
    super::link::detach_pinned(&path)
        .with_context(|| format!("cannot detach {}", path.display()))?;
    super::remove_pin(&path)
}

/// Attaches the pinned program for `at` and pins the link.
fn attach(pins: &GuardPins, at: &Attachment) -> Result<()> {
    let link: FdLink = match at {
        Attachment::CgroupRoot => {
            let mut prog = CgroupSkb::from_pin(
                pins.program(IngressHook::CgroupSkb),
                CgroupSkbAttachType::Ingress,
            )
            .context("cannot open the pinned cgroup_skb guard program")?;
            let root_path = cgroup::cgroup2_mount()?;
            let root = File::open(&root_path)
                .with_context(|| format!("cannot open {}", root_path.display()))?;
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
            let id = prog
                .attach(ifname, TcAttachType::Ingress)
                .with_context(|| format!("cannot attach tc ingress on interface {ifname}"))?;
            FdLink::try_from(prog.take_link(id)?).map_err(|_| {
                anyhow::anyhow!(
                    "tc ingress on {ifname} was attached through netlink, not as a tcx link: \
                     the guard needs Linux 6.6 or newer for pinned TC links"
                )
            })?
        }
    };
    let path = pins.link(at);
    link.pin(&path)
        .with_context(|| format!("cannot pin link {}", path.display()))?;
    Ok(())
}

/// Removes every pin of the guard (links first, so enforcement stops before the maps go).
/// Returns how many pins were removed.
pub fn uninstall(pins: &Pins) -> Result<usize> {
    let gpins = GuardPins::new(pins);
    let mut removed = 0;
    for at in gpins.links() {
        removed += detach(&gpins, &at)?;
    }
    for hook in IngressHook::ALL {
        removed += super::remove_pin(&gpins.program(hook))?;
    }
    for name in ALL_MAPS {
        removed += super::remove_pin(&gpins.map(name))?;
    }
    for sub in ["links", "progs", "maps"] {
        let _ = std::fs::remove_dir(gpins.dir().join(sub));
    }
    let _ = std::fs::remove_dir(gpins.dir());
    Ok(removed)
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
