//! What tells the gateway side and the inference guard apart, as one trait: the shared modules
//! (pin paths, loading, links, counters, deny events, uninstall) are generic over it, and
//! [`super::gateway`] and [`super::inference`] each implement it once.

use std::path::PathBuf;

use super::{events::DenyRecord, pin_paths::SidePins};

pub trait Side: Sized + 'static {
    /// Sub-directory of this side's pins below `<pin root>/v<schema>/` (`""`: that directory
    /// itself).
    const SUBDIR: &'static str;
    /// The sub-directories of the side's pin directory (`maps`, `links`, …).
    const PIN_SUBDIRS: &'static [&'static str];
    /// Every map of this side in the eBPF object; all of them are pinned.
    const MAPS: &'static [&'static str];
    /// The per-CPU counter array and the deny-event ring buffer (both among [`Side::MAPS`]).
    const COUNTERS_MAP: &'static str;
    const EVENTS_MAP: &'static str;
    /// The counter slot of deny events lost to a full ring buffer.
    const EVENTS_LOST_COUNTER: u32;

    /// A kernel hook of this side: one program each.
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

    /// One record of the deny-event ring buffer.
    type Deny: DenyRecord;
}
