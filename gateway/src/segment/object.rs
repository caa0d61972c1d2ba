//! moat's eBPF object, embedded in the binary at build time, and loading it for one side with
//! that side's maps bound to their pins.

use anyhow::{Context, Result, bail};
use aya::{Ebpf, EbpfLoader};

use super::{pin_paths::SidePins, side::Side};

/// The eBPF object built by `cargo xtask build` (empty when the binary was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/moat.bpf.o"));

/// The embedded eBPF object, or why there is none. Lifts RLIMIT_MEMLOCK for the loads that
/// follow.
pub(crate) fn object() -> Result<&'static [u8]> {
    if OBJECT.is_empty() {
        bail!(
            "this moat binary was built without its eBPF programs; build it with `cargo xtask build`"
        );
    }
    raise_memlock();
    Ok(OBJECT)
}

/// Size of the embedded eBPF object (0 when the binary was built without it).
pub fn object_len() -> usize {
    OBJECT.len()
}

/// Loads the object with every map of side `S` bound to its pin: an existing pin is reused
/// (the policy and counters survive), a missing one is created and pinned. No program is
/// loaded into the kernel yet.
pub(super) fn load<S: Side>(pins: &SidePins<S>) -> Result<Ebpf> {
    let object = object()?;
    pins.create_dirs()
        .with_context(|| format!("cannot create {}", pins.dir().display()))?;
    let map_pins: Vec<(&str, std::path::PathBuf)> =
        S::MAPS.iter().map(|m| (*m, pins.map(m))).collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    loader
        .load(object)
        .context("cannot load moat's eBPF object")
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it so loading never fails on
/// a small default there.
fn raise_memlock() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use moat_common::{guard, names};

    use super::*;

    /// The eBPF programs spell their map and program names as literals (`#[map(name = ...)]`
    /// takes nothing else); the daemon pins and looks up the constants of `moat_common`. The
    /// built object must hold exactly those names. Run after the eBPF build (`cargo xtask
    /// build`); a binary without the object fails here instead of passing unchecked.
    #[test]
    fn embedded_object_holds_exactly_the_shared_names() {
        let bytes = object().expect("the eBPF object is embedded (build it first)");
        let obj = aya_obj::Object::parse(bytes).expect("the embedded object parses");
        // Data sections (.rodata, .bss) appear as maps too; they are not named in the source.
        let maps: BTreeSet<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with('.'))
            .collect();
        let expected_maps: BTreeSet<&str> =
            names::MAPS.into_iter().chain(guard::names::MAPS).collect();
        assert_eq!(maps, expected_maps);
        let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
        let expected_programs: BTreeSet<&str> = moat_common::Hook::ALL
            .map(moat_common::Hook::program_name)
            .into_iter()
            .chain(guard::IngressHook::ALL.map(guard::IngressHook::program_name))
            .collect();
        assert_eq!(programs, expected_programs);
    }
}
