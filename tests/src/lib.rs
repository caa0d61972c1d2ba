//! Shared helpers for moat's end-to-end tests: finding the built binaries; in [`kernel`],
//! throw-away cgroups, pin roots and probes for the real-kernel tests; in [`moatd`], a real
//! `moat serve` with its own data dir and port, and its CLI.

pub mod bench;
pub mod daemon;
pub mod kernel;
pub mod moatd;
pub mod netns;

use std::path::PathBuf;

/// A binary of this workspace, built next to the test executable (`target/<profile>/<name>`).
/// `cargo xtask test` builds every binary before it runs the tests.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test>-<hash> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo xtask test` does)",
        path.display()
    );
    path
}
