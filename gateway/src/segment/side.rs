//! What tells the gateway side and the inference guard apart, in one place: the shared modules
//! (pin paths, loading, links, counters, deny events, status, uninstall) are generic over
//! [`Side`], and the two descriptions below are all they need to know.

use std::path::PathBuf;

use anyhow::Result;
use moat_common::{Hook, guard, guard::IngressHook, names};

use super::{
    events::DenyRecord,
    gateway::{Deny, PolicyMaps},
    inference::{Attachment, GuardMaps, IngressDeny},
    pin_paths::SidePins,
    pinned_maps::SlotAndCounters,
};

pub trait Side: Sized + 'static {
    /// Sub-directory of this side's pins below `<pin root>/v<schema>/` (`""`: that directory
    /// itself).
    const SUBDIR: &'static str;
    /// The sub-directories of the side's pin directory (`maps`, `links`, …).
    const PIN_SUBDIRS: &'static [&'static str];
    /// Every map of this side in the eBPF object; all of them are pinned.
    const MAPS: &'static [&'static str];
    /// The active policy slot's index (one of [`Side::MAPS`]).
    const ACTIVE_MAP: &'static str;
    /// The per-CPU counter array (one of [`Side::MAPS`]), its length, and its slot counting
    /// deny events lost to a full ring buffer.
    const COUNTERS_MAP: &'static str;
    const COUNTERS: u32;
    const EVENTS_LOST_COUNTER: u32;
    /// The deny-event ring buffer (one of [`Side::MAPS`]).
    const EVENTS_MAP: &'static str;
    /// The log lines of a start that adopted the pins or installed them.
    const ADOPTED_LOG: &'static str;
    const INSTALLED_LOG: &'static str;

    /// A kernel hook of this side: one program each, in [`Side::HOOKS`] order.
    type Hook: Copy + PartialEq + 'static;
    const HOOKS: &'static [Self::Hook];
    fn program_name(hook: Self::Hook) -> &'static str;
    /// The hook's name in counters (`/metrics`, `moat segment status`).
    fn hook_label(hook: Self::Hook) -> &'static str;
    /// The hook's (allowed, denied) slot in the counter array.
    fn counter_index(hook: Self::Hook, denied: bool) -> u32;

    /// What a pinned link is attached to; its pin is named by [`Side::link_pin_name`].
    type Link: Clone + Ord;
    fn link_pin_name(link: &Self::Link) -> String;
    /// `None` for a file in the links directory that is not one of this side's links.
    fn link_from_pin_name(name: &str) -> Option<Self::Link>;

    /// The pins that must all exist for the side to count as installed.
    fn required_pins(pins: &SidePins<Self>) -> Vec<PathBuf>;

    /// The side's opened policy maps.
    type Maps: AsRef<SlotAndCounters<Self>>;
    fn open_maps(pins: &SidePins<Self>) -> Result<Self::Maps>;
    /// One record of the deny-event ring buffer.
    type Deny: DenyRecord;
}

/// The gateway host's `cgroup_sock_addr` hooks.
pub enum Gateway {}

impl Side for Gateway {
    // Its pins sit directly in the versioned directory (the layout predates the guard).
    const SUBDIR: &'static str = "";
    const PIN_SUBDIRS: &'static [&'static str] = &["maps", "links"];
    const MAPS: &'static [&'static str] = &names::MAPS;
    const ACTIVE_MAP: &'static str = names::MAP_ACTIVE;
    const COUNTERS_MAP: &'static str = names::MAP_COUNTERS;
    const COUNTERS: u32 = moat_common::COUNTERS;
    const EVENTS_LOST_COUNTER: u32 = moat_common::EVENTS_LOST_COUNTER;
    const EVENTS_MAP: &'static str = names::MAP_EVENTS;
    const ADOPTED_LOG: &'static str =
        "adopted pinned kernel enforcement (programs updated in place)";
    const INSTALLED_LOG: &'static str = "installed kernel enforcement";

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
    fn required_pins(pins: &SidePins<Self>) -> Vec<PathBuf> {
        let links = Hook::ALL.iter().map(|h| pins.link(h));
        Self::MAPS
            .iter()
            .map(|m| pins.map(m))
            .chain(links)
            .collect()
    }

    type Maps = PolicyMaps;
    fn open_maps(pins: &SidePins<Self>) -> Result<PolicyMaps> {
        PolicyMaps::open(pins)
    }
    type Deny = Deny;
}

/// The inference host's ingress guard.
pub enum Inference {}

impl Side for Inference {
    const SUBDIR: &'static str = "inference";
    const PIN_SUBDIRS: &'static [&'static str] = &["maps", "progs", "links"];
    const MAPS: &'static [&'static str] = &guard::names::MAPS;
    const ACTIVE_MAP: &'static str = guard::names::MAP_ACTIVE;
    const COUNTERS_MAP: &'static str = guard::names::MAP_COUNTERS;
    const COUNTERS: u32 = guard::COUNTERS;
    const EVENTS_LOST_COUNTER: u32 = guard::EVENTS_LOST_COUNTER;
    const EVENTS_MAP: &'static str = guard::names::MAP_EVENTS;
    const ADOPTED_LOG: &'static str =
        "adopted the pinned inference guard (programs updated in place)";
    const INSTALLED_LOG: &'static str = "installed the inference guard";

    type Hook = IngressHook;
    const HOOKS: &'static [IngressHook] = &IngressHook::ALL;
    fn program_name(hook: IngressHook) -> &'static str {
        hook.program_name()
    }
    fn hook_label(hook: IngressHook) -> &'static str {
        hook.label()
    }
    fn counter_index(hook: IngressHook, denied: bool) -> u32 {
        guard::counter_index(hook, denied)
    }

    // Links are reconciled with the config: cgroup root and/or tcx per interface.
    type Link = Attachment;
    fn link_pin_name(at: &Attachment) -> String {
        at.pin_name()
    }
    fn link_from_pin_name(name: &str) -> Option<Attachment> {
        Attachment::from_pin_name(name)
    }

    /// Every map and both programs (links are reconciled with the config separately).
    fn required_pins(pins: &SidePins<Self>) -> Vec<PathBuf> {
        let programs = IngressHook::ALL.map(|h| pins.program(h));
        Self::MAPS
            .iter()
            .map(|m| pins.map(m))
            .chain(programs)
            .collect()
    }

    type Maps = GuardMaps;
    fn open_maps(pins: &SidePins<Self>) -> Result<GuardMaps> {
        GuardMaps::open(pins)
    }
    type Deny = IngressDeny;
}

impl AsRef<SlotAndCounters<Gateway>> for PolicyMaps {
    fn as_ref(&self) -> &SlotAndCounters<Gateway> {
        &self.common
    }
}

impl AsRef<SlotAndCounters<Inference>> for GuardMaps {
    fn as_ref(&self) -> &SlotAndCounters<Inference> {
        &self.common
    }
}
