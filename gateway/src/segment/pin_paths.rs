//! Where moat pins its maps, programs and links on the bpffs, and removing those pins:
//!
//! ```text
//! <pin root>/v<schema>/maps/<map>               gateway side
//! <pin root>/v<schema>/links/<program>
//! <pin root>/v<schema>/inference/maps/<map>     inference guard
//! <pin root>/v<schema>/inference/progs/<program>
//! <pin root>/v<schema>/inference/links/cgroup_skb | tc-<interface>
//! ```
//!
//! The schema version is part of the path so a daemon never adopts maps whose layout it does
//! not know; pins of another version are left alone (and `status` says they exist).

use std::{
    io,
    marker::PhantomData,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use moat_common::SCHEMA_VERSION;

use super::side::Side;

/// The pin root and this schema version's directory below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    root: PathBuf,
    dir: PathBuf,
}

impl Pins {
    pub fn new(root: &Path) -> Pins {
        Pins {
            root: root.to_path_buf(),
            dir: root.join(format!("v{SCHEMA_VERSION}")),
        }
    }

    /// `<pin root>/v<schema>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
}

/// One side's pin directory (see the module doc), named by what it holds.
pub struct SidePins<S> {
    dir: PathBuf,
    side: PhantomData<S>,
}

// Derived impls would ask the same of `S`, a marker type.
impl<S> Clone for SidePins<S> {
    fn clone(&self) -> Self {
        SidePins {
            dir: self.dir.clone(),
            side: PhantomData,
        }
    }
}

impl<S> std::fmt::Debug for SidePins<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SidePins").field(&self.dir).finish()
    }
}

impl<S> PartialEq for SidePins<S> {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl<S> Eq for SidePins<S> {}

impl<S: Side> SidePins<S> {
    pub fn new(pins: &Pins) -> SidePins<S> {
        // `join("")` would add a trailing slash, which shows in `status`.
        let dir = match S::SUBDIR {
            "" => pins.dir().to_path_buf(),
            sub => pins.dir().join(sub),
        };
        SidePins {
            dir,
            side: PhantomData,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn program(&self, hook: S::Hook) -> PathBuf {
        self.dir.join("progs").join(S::program_name(hook))
    }

    pub fn link(&self, link: &S::Link) -> PathBuf {
        self.dir.join("links").join(S::link_pin_name(link))
    }

    /// The links pinned now, sorted.
    pub fn links(&self) -> Vec<S::Link> {
        let mut out: Vec<S::Link> = std::fs::read_dir(self.dir.join("links"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| S::link_from_pin_name(&e.file_name().to_string_lossy()))
            .collect();
        out.sort();
        out
    }

    /// Whether every pin of a complete installation exists.
    pub fn complete(&self) -> bool {
        S::required_pins(self).iter().all(|p| p.exists())
    }

    pub(super) fn create_dirs(&self) -> io::Result<()> {
        for sub in S::PIN_SUBDIRS {
            std::fs::create_dir_all(self.dir.join(sub))?;
        }
        Ok(())
    }

    /// Removes every pin of the side (links first, each detached now, so enforcement stops
    /// before the maps go), then its directories. Returns how many pins were removed.
    pub(super) fn remove_all(&self) -> Result<usize> {
        let mut removed = 0;
        for link in self.links() {
            removed += super::link::detach_and_unpin(&self.link(&link))?;
        }
        for &hook in S::HOOKS {
            removed += remove_pin(&self.program(hook))?;
        }
        for name in S::MAPS {
            removed += remove_pin(&self.map(name))?;
        }
        self.remove_dirs();
        Ok(removed)
    }

    /// Removes the (empty) sub-directories and the side's directory; what is not empty stays.
    fn remove_dirs(&self) {
        for sub in S::PIN_SUBDIRS {
            let _ = std::fs::remove_dir(self.dir.join(sub));
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Removes one pin; returns how many were removed (0 when nothing was pinned there).
pub fn remove_pin(path: &Path) -> Result<usize> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(1),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(e).with_context(|| format!("cannot remove {}", path.display())),
    }
}
