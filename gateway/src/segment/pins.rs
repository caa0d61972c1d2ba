//! Where moat pins its maps and links on the bpffs: `<pin root>/v<schema>/{maps,links}/…`.
//!
//! The schema version is part of the path so a daemon never adopts maps whose layout it does
//! not know; pins of another version are left alone (and `status` says they exist).

use std::{
    io,
    path::{Path, PathBuf},
};

use moat_common::{Hook, SCHEMA_VERSION};

/// The map names the eBPF object defines (see `ebpf/programs/src/main.rs`).
pub const MAP_ACTIVE: &str = "MOAT_ACTIVE";
pub const MAP_SLOTS: &str = "MOAT_SLOTS";
pub const MAP_DEST4: [&str; 2] = ["MOAT_DEST4_0", "MOAT_DEST4_1"];
pub const MAP_DEST6: [&str; 2] = ["MOAT_DEST6_0", "MOAT_DEST6_1"];
pub const MAP_COUNTERS: &str = "MOAT_COUNTERS";
pub const MAP_EVENTS: &str = "MOAT_EVENTS";

pub const ALL_MAPS: [&str; 8] = [
    MAP_ACTIVE,
    MAP_SLOTS,
    MAP_DEST4[0],
    MAP_DEST4[1],
    MAP_DEST6[0],
    MAP_DEST6[1],
    MAP_COUNTERS,
    MAP_EVENTS,
];

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

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn link(&self, hook: Hook) -> PathBuf {
        self.dir.join("links").join(hook.program_name())
    }

    /// Whether every link and map of a complete installation is pinned.
    pub fn complete(&self) -> bool {
        ALL_MAPS.iter().all(|m| self.map(m).exists())
            && Hook::ALL.iter().all(|h| self.link(*h).exists())
    }

    pub fn create_dirs(&self) -> io::Result<()> {
        std::fs::create_dir_all(self.dir.join("maps"))?;
        std::fs::create_dir_all(self.dir.join("links"))
    }
}
