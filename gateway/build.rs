//! Embeds the eBPF object built by `cargo xtask build` (see `segment::object`).
//!
//! The object is taken from `MOAT_BPF_OBJECT` or from the workspace's default output path.
//! When neither exists (say a plain `cargo clippy` before any eBPF build) an empty object is
//! embedded and the daemon reports, at run time, that the binary was built without its kernel
//! programs — it never pretends to enforce.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=MOAT_BPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let target = env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| manifest.join("../target"));
    let source = env::var("MOAT_BPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target.join("bpfel-unknown-none/release/moat-ebpf"));
    println!("cargo:rerun-if-changed={}", source.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("moat.bpf.o");
    match fs::read(&source) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}; run `cargo xtask build` to embed it",
                source.display()
            );
            fs::write(&out, []).unwrap()
        }
    }
}
