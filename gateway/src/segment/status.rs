//! `moat segment status`: what both sides have pinned, read without changing anything. Each
//! side reports its own part ([`GatewayStatus`], [`GuardStatus`]); this module puts them
//! together in the shape `--json` has always had (the gateway side's fields at the top, the
//! guard's under `inference`).

use std::fmt;

use anyhow::Result;
use serde::Serialize;

use super::{
    gateway::{self, GatewayPins},
    inference::{self, GuardPins},
    pin_paths::{Pins, SidePins},
    side::Side,
};
use crate::metrics::HookCount;

/// The gateway side's status.
pub type GatewayStatus = SideStatus<gateway::LinkStatus, gateway::PolicyStatus, HookCount>;
/// The inference guard's status.
pub type GuardStatus =
    SideStatus<inference::GuardLinkStatus, inference::GuardPolicyStatus, inference::GuardCounters>;

#[derive(Debug, Serialize)]
pub struct Status {
    #[serde(flatten)]
    pub gateway: GatewayStatus,
    /// The inference-host guard (installed or not).
    pub inference: GuardStatus,
}

/// Reads the pinned state of both sides; never changes it.
pub fn status(pins: &Pins) -> Result<Status> {
    Ok(Status {
        gateway: super::gateway::status(&GatewayPins::new(pins))?,
        inference: super::inference::status(&GuardPins::new(pins))?,
    })
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.gateway, self.inference)
    }
}

/// One side's status: `L` a link's, `P` the active policy's fields, `C` a hook's counters.
#[derive(Debug, Serialize)]
pub struct SideStatus<L, P, C> {
    pub pin_dir: String,
    /// Every pin a complete installation has exists.
    pub installed: bool,
    pub links: Vec<L>,
    pub active_slot: Option<u32>,
    /// Empty (its default) when the side is not installed.
    #[serde(flatten)]
    pub policy: P,
    pub counters: Vec<C>,
    pub events_lost: u64,
    /// Links the kernel reports as not attached (`hook (severed)`), gateway side.
    pub not_attached: Vec<String>,
}

impl<L, P: Default, C> SideStatus<L, P, C> {
    /// Reads side `S`'s pins; never changes them. The maps are read only when the side is
    /// installed: `policy` describes the active policy, `counter` a hook's counts.
    pub(super) fn read<S: Side>(
        pins: &SidePins<S>,
        links: Vec<L>,
        policy: impl FnOnce(&S::Maps) -> anyhow::Result<P>,
        counter: impl Fn(HookCount) -> C,
    ) -> Result<Self> {
        let mut status = SideStatus {
            pin_dir: pins.dir().display().to_string(),
            installed: pins.complete(),
            links,
            active_slot: None,
            policy: P::default(),
            counters: Vec::new(),
            events_lost: 0,
            not_attached: Vec::new(),
        };
        if status.installed {
            let maps = S::open_maps(pins)?;
            status.active_slot = Some(maps.as_ref().active.get()?);
            status.policy = policy(&maps)?;
            let (hooks, lost) = maps.as_ref().counters.per_hook()?;
            status.counters = hooks.into_iter().map(counter).collect();
            status.events_lost = lost;
        }
        Ok(status)
    }
}

/// An id in the text report, `-` when there is none.
pub(super) fn or_dash(v: Option<u32>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}
