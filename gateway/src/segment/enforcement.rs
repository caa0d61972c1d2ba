//! A live handle on one side's pinned enforcement ([`super::Enforcer`] on the gateway host,
//! [`super::inference::Guard`] on an inference host), and the install-or-adopt frame both
//! share. Dropping a handle changes nothing in the kernel (fail-static).

use anyhow::Result;
use aya::maps::{MapData, RingBuf};
use tracing::info;

use super::{
    bpffs, events,
    pin_paths::{Pins, SidePins},
    pinned_maps,
    side::Side,
};
use crate::metrics::HookCount;

pub struct Enforcement<S: Side> {
    pub(super) pins: SidePins<S>,
    pub(super) maps: S::Maps,
    pub(super) adopted: bool,
}

impl<S: Side> Enforcement<S> {
    /// Installs side `S` under `pins`, or adopts what is pinned there: mounts the bpffs if
    /// need be, then `converge` brings the pins to this binary's programs and policy and
    /// returns the side's maps. When it fails on a host where nothing of the side was attached
    /// yet, everything pinned on the way is removed again; enforcement that was already
    /// attached stays.
    pub(super) fn install_or_adopt_with(
        pins: &Pins,
        converge: impl FnOnce(&SidePins<S>) -> Result<S::Maps>,
    ) -> Result<Enforcement<S>> {
        super::kernel::check()?;
        bpffs::ensure_bpffs(pins.root())?;
        let side = SidePins::<S>::new(pins);
        let adopted = !side.links().is_empty();
        let maps = match converge(&side) {
            Ok(maps) => maps,
            Err(e) => {
                if !adopted {
                    let _ = side.remove_all();
                    // The pin root too, when moat was its only user.
                    let _ = std::fs::remove_dir(pins.root());
                }
                return Err(e);
            }
        };
        let message = if adopted {
            S::ADOPTED_LOG
        } else {
            S::INSTALLED_LOG
        };
        info!(pins = %side.dir().display(), "{message}");
        Ok(Enforcement {
            pins: side,
            maps,
            adopted,
        })
    }

    /// Whether the pins were already attached when this handle was made.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    pub fn pins(&self) -> &SidePins<S> {
        &self.pins
    }

    pub fn maps(&self) -> &S::Maps {
        &self.maps
    }

    /// The hooks' counters, summed over CPUs, and the deny events lost.
    pub fn hook_counts(&self) -> Result<(Vec<HookCount>, u64)> {
        self.maps.as_ref().counters.per_hook()
    }

    /// The deny-event ring buffer (one reader at a time drains it).
    pub fn open_events(&self) -> Result<RingBuf<MapData>> {
        pinned_maps::open_events(&self.pins)
    }

    /// Logs every deny event until the task is dropped (rate-limited, see
    /// [`events::Limiter`]).
    pub fn spawn_event_logger(&self) -> Result<tokio::task::JoinHandle<()>> {
        events::spawn_ring_logger::<S::Deny>(self.open_events()?)
    }
}
