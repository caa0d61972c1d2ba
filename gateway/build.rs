//! Embeds the eBPF object built by `cargo xtask build` (see `segment::object`), and the
//! versions of moat's key dependencies from the workspace's Cargo.lock (`moat doctor` prints
//! them), so the binary reports what it was really built with.
//!
//! The object is taken from `MOAT_BPF_OBJECT` or from the workspace's default output path.
//! When neither exists (say a plain `cargo clippy` before any eBPF build) an empty object is
//! embedded and the daemon reports, at run time, that the binary was built without its kernel
//! programs — it never pretends to enforce.

use std::{env, fs, path::PathBuf};

/// Dependencies whose versions `moat doctor` reports.
const KEY_DEPENDENCIES: &[&str] = &[
    "aya",
    "aya-obj",
    "axum",
    "hyper",
    "tokio",
    "rustls",
    "serde",
    "toml",
    "clap",
    "tracing",
    "libc",
    "nix",
    "argon2",
    "jsonwebtoken",
    "ed25519-dalek",
    "hmac",
    "sha2",
    "rusqlite",
];

fn dependency_versions(lock: &str) -> String {
    let mut found: Vec<(String, String)> = Vec::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block.lines().find_map(|l| {
                l.strip_prefix(k)
                    .and_then(|r| r.trim().strip_prefix('='))
                    .map(|v| v.trim().trim_matches('"').to_owned())
            })
        };
        if let (Some(name), Some(version)) = (field("name "), field("version "))
            && KEY_DEPENDENCIES.contains(&name.as_str())
        {
            found.push((name, version));
        }
    }
    found.sort();
    found
        .iter()
        .map(|(n, v)| format!("{n}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let lock = manifest_dir.join("../Cargo.lock");
    println!("cargo:rerun-if-changed={}", lock.display());
    let versions = fs::read_to_string(&lock)
        .map(|l| dependency_versions(&l))
        .unwrap_or_default();
    println!("cargo:rustc-env=MOAT_DEPENDENCY_VERSIONS={versions}");
    // The compiler this binary was built with (`moat audit report`).
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=MOAT_RUSTC_VERSION={rustc_version}");

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
