//! `cargo xtask`: everything between a fresh clone and a running, tested moat.
//!
//! - `setup`  installs what this kind of machine lacks (idempotent, quiet when all is there)
//! - `build`  the eBPF programs (nightly, bpfel-unknown-none) and then the `moat` binary
//! - `test`   setup + build + fmt/clippy + the whole test suite (root tests included), then the
//!   kernel-facing suites again in a VM on Linux 6.1 (`--no-vm` skips them); prints the time
//!   each part took
//! - `run`    setup + build + `moat serve` with `examples/moat.toml` (and `moat-sim` as its
//!   inference host when no real one listens on 127.0.0.1:8000)
//! - `bench`  benchmarks (`segment`, …), printed as ratios measured in one run
//! - `vm-test` the kernel-facing suites inside qemu on Debian's kernels (see `vm/mod.rs`)

mod replicas;
mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain pieces and system packages moat needs.
    Setup,
    /// Build the eBPF object and the moat binary that embeds it.
    Build {
        /// Debug build of the userspace side.
        #[arg(long)]
        debug: bool,
    },
    /// Run formatting and lint checks and the whole test suite.
    Test {
        /// Skip the kernel-facing suites in a VM on Linux 6.1 (`vm-test --kernel 6.1`), which
        /// otherwise run last: under TCG they take most of an hour. For quick local runs only;
        /// CI runs them.
        #[arg(long)]
        no_vm: bool,
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Run the daemon with the example config.
    Run {
        #[arg(long, default_value = "examples/moat.toml")]
        config: PathBuf,
        /// Instead: this many gateway replicas sharing a throw-away PostgreSQL and Redis
        /// (docs/replicas.md), in front of the same demo inference host.
        #[arg(long)]
        replicas: Option<u16>,
    },
    /// Run a benchmark and print its ratios.
    Bench {
        /// Which benchmark: segment, gateway, auth.
        name: String,
        /// Extra arguments for the gateway benchmark (e.g. `--soak 60`; see its `--help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run the kernel-facing test suites inside qemu on Debian's kernels.
    VmTest {
        /// Which kernel: 6.1, 6.12 or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Only this suite (repeatable; default: every kernel-facing suite).
        #[arg(long = "test")]
        tests: Vec<String>,
        /// Extra arguments for each test executable (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Inside a VM guest only: pid 1 (or, with --run, the test runner).
    #[command(hide = true)]
    VmGuest {
        #[arg(long)]
        run: bool,
        plan: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup::run(),
        Cmd::Build { debug } => {
            setup::run()?;
            build(!debug)
        }
        Cmd::Test { args, no_vm } => {
            setup::run()?;
            test(&args, !no_vm)
        }
        Cmd::Run { config, replicas } => {
            setup::run()?;
            build(true)?;
            // Stand-in GPU: the simulator on the example config's inference host, unless a
            // real server already listens there. Killed when the daemon exits.
            let _sim = demo_inference_host(&root)?;
            if let Some(n) = replicas {
                return replicas::run(&root, n, DEMO_INFERENCE_HOST);
            }
            let status = Command::new(root.join("target/release/moat"))
                .args(["serve", "--config"])
                .arg(&config)
                .status()?;
            if !status.success() {
                bail!("moat serve exited with {status}");
            }
            Ok(())
        }
        Cmd::Bench { name, args } => {
            setup::run()?;
            build(true)?;
            cargo(&["build", "--release", "-p", "moat-tests", "--bins"])?;
            match name.as_str() {
                // The data plane against direct and nginx (wrk, nginx from `setup`).
                "gateway" => {
                    run(Command::new(root.join("target/release/moat-bench-gateway")).args(&args))
                }
                _ => run(Command::new(root.join("target/release/moat-bench")).arg(&name)),
            }
        }
        Cmd::VmTest {
            kernel,
            tests,
            args,
        } => {
            setup::run()?;
            vm_test(
                &root,
                &vm::Request {
                    kernel,
                    suites: tests,
                    test_args: args,
                },
            )
        }
        Cmd::VmGuest { run: false, plan } => vm::guest::pid1(&plan),
        Cmd::VmGuest { run: true, plan } => vm::guest::run_plan(&plan),
    }
}

/// Runs the VM suites and prints one line per kernel; fails when any kernel failed.
fn vm_test(root: &Path, req: &vm::Request) -> Result<()> {
    let outcomes = vm::run(root, req)?;
    for o in &outcomes {
        println!("{}", o.line);
    }
    if outcomes.iter().any(|o| !o.ok) {
        bail!("vm-test failed");
    }
    Ok(())
}

/// The inference host of `examples/moat.toml`.
const DEMO_INFERENCE_HOST: &str = "127.0.0.1:8000";

/// A running `moat-sim`, killed on drop.
struct Simulator(std::process::Child);

impl Drop for Simulator {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `moat-sim` on [`DEMO_INFERENCE_HOST`] when nothing listens there, so the README's
/// main command works on a machine without a GPU.
fn demo_inference_host(root: &Path) -> Result<Option<Simulator>> {
    use std::io::BufRead;
    let addr: std::net::SocketAddr = DEMO_INFERENCE_HOST.parse()?;
    // Probe by binding, not connecting: moat's pinned kernel policy may refuse this process a
    // connect() to the protected port, but never a bind.
    if std::net::TcpListener::bind(addr).is_err() {
        eprintln!("run: something already listens on {addr}; using it as the inference host");
        return Ok(None);
    }
    eprintln!("run: no inference server on {addr}; starting the simulator (moat-sim) there");
    let mut child = Command::new(root.join("target/release/moat-sim"))
        .args(["--listen", DEMO_INFERENCE_HOST, "--name", "demo-gpu"])
        .args(["--model", "meta-llama/Llama-3.1-8B-Instruct"])
        .args(["--echo", "--tokens-per-sec", "40"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot start target/release/moat-sim")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let sim = Simulator(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    if !line.starts_with("LISTENING") {
        bail!("moat-sim did not start listening on {addr}");
    }
    Ok(Some(sim))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The eBPF object first (it is embedded), then the userspace binaries.
fn build(release: bool) -> Result<()> {
    build_ebpf()?;
    let mut args = vec!["build", "--bins"];
    if release {
        args.push("--release");
    }
    cargo(&args)
}

fn build_ebpf() -> Result<()> {
    run(Command::new("cargo").args([
        "+nightly",
        "build",
        "--package",
        "moat-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]))
}

/// The whole check: lint, then every suite on the host's kernel (and the identity suite again
/// on PostgreSQL), then with `vm` the kernel-facing suites in a VM on Linux 6.1. Prints how
/// long each part took (also when one fails).
fn test(extra: &[String], vm: bool) -> Result<()> {
    eprintln!("{}", setup::toolchain_report());
    sweep_stale_test_state();
    let mut timings = Timings::default();
    let result = (|| {
        timings.time("build eBPF", build_ebpf)?;
        timings.time("fmt, doc links, clippy", || {
            cargo(&["fmt", "--all", "--", "--check"])
                .context("cargo fmt --check: run `cargo fmt --all`")?;
            run(Command::new("python3").arg(".ci/check-doc-links"))
                .context("README.md or docs/ link to a file or heading that does not exist")?;
            cargo(&["clippy", "--all-targets", "--", "-D", "warnings"])
        })?;
        timings.time("build binaries", || cargo(&["build", "--bins"]))?;
        timings.time("tests on this kernel", || {
            let mut args = vec!["test"];
            if !extra.is_empty() {
                args.push("--");
                args.extend(extra.iter().map(String::as_str));
            }
            cargo(&args)
        })?;
        if extra.is_empty() {
            // The identity suite once more on the shared store: same tests, PostgreSQL instead
            // of SQLite (the fixture starts a throw-away server per daemon).
            timings.time("identity suite on PostgreSQL", || {
                run(Command::new("cargo")
                    .args(["test", "-p", "moat-tests", "--test", "identity"])
                    .env("MOAT_TEST_STORE", "postgres"))
            })?;
        }
        if vm && !extra.is_empty() {
            eprintln!("a test filter was given: the VM suite does not run");
        } else if vm {
            // The kernel-facing suites again, in a VM on the oldest kernel moat is tested on
            // (docs/kernel-enforcement.md#kernels). A failure fails the run, as any suite's.
            let root = workspace_root();
            timings.time("kernel suites in a VM (Linux 6.1)", || {
                vm_test(
                    &root,
                    &vm::Request {
                        kernel: "6.1".into(),
                        suites: Vec::new(),
                        test_args: Vec::new(),
                    },
                )
            })?;
        }
        Ok(())
    })();
    timings.print();
    result
}

/// Wall time per part of `cargo xtask test`.
#[derive(Default)]
struct Timings(Vec<(&'static str, std::time::Duration, bool)>);

impl Timings {
    fn time(&mut self, part: &'static str, f: impl FnOnce() -> Result<()>) -> Result<()> {
        let start = std::time::Instant::now();
        let r = f();
        self.0.push((part, start.elapsed(), r.is_ok()));
        r
    }

    fn print(&self) {
        let total: std::time::Duration = self.0.iter().map(|t| t.1).sum();
        eprintln!("time per part:");
        for (part, took, ok) in &self.0 {
            let mark = if *ok { "" } else { "  (failed)" };
            eprintln!("  {part:<36} {:>7.1} s{mark}", took.as_secs_f64());
        }
        eprintln!("  {:<36} {:>7.1} s", "total", total.as_secs_f64());
    }
}

fn cargo(args: &[&str]) -> Result<()> {
    run(Command::new("cargo").args(args))
}

fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Kernel tests clean up after themselves, even when they fail; a test process killed outright
/// cannot. Before a run, remove what an earlier killed run may have left: its pin roots (which
/// unpins its programs), its empty cgroups and its network namespaces. Each is named
/// `moat-test-…-<pid>-<n>` or `moat-bench-…-<pid>-<n>` after the process that made it; what
/// belongs to a process still alive (another run on this machine) is left alone.
fn sweep_stale_test_state() {
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for e in entries.flatten().filter(|e| is_stale(&e.file_name())) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let cgroup2 = mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
    });
    if let Some(Ok(entries)) = cgroup2.map(std::fs::read_dir) {
        for e in entries.flatten().filter(|e| is_stale(&e.file_name())) {
            remove_cgroup_tree(&e.path());
        }
    }
    // Deleting a network namespace removes its veth pairs too.
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten().filter(|e| is_stale(&e.file_name())) {
            let name = e.file_name().to_string_lossy().into_owned();
            let _ = Command::new("ip").args(["netns", "del", &name]).status();
        }
    }
}

/// Whether `name` is a test's or benchmark's (`moat-test-…`, `moat-bench-…`) whose owner is
/// gone: the owner's pid is the second-to-last `-` field; a name without one is stale.
fn is_stale(name: &std::ffi::OsStr) -> bool {
    let name = name.to_string_lossy();
    if !["moat-test-", "moat-bench-"]
        .iter()
        .any(|p| name.starts_with(p))
    {
        return false;
    }
    match owner_pid(&name) {
        Some(pid) => !Path::new("/proc").join(pid.to_string()).exists(),
        None => true,
    }
}

/// The pid in `<prefix>-<pid>-<n>`.
fn owner_pid(name: &str) -> Option<u32> {
    let mut fields = name.rsplit('-');
    fields.next()?.parse::<u32>().ok()?;
    fields.next()?.parse().ok()
}

/// Removes a cgroup tree depth first; cgroups that still hold processes stay.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_pid_is_the_second_to_last_field() {
        assert_eq!(owner_pid("moat-test-4242-7"), Some(4242));
        assert_eq!(owner_pid("moat-test-gw-4242-0"), Some(4242));
        assert_eq!(owner_pid("moat-test-gw"), None);
        assert_eq!(owner_pid("moat-test-4242"), None);
    }

    #[test]
    fn entries_of_a_live_process_are_not_stale() {
        let mine = format!("moat-test-{}-0", std::process::id());
        assert!(!is_stale(mine.as_ref()));
        // No process has pid u32::MAX (pid_max is at most 2^22).
        assert!(is_stale(format!("moat-bench-{}-0", u32::MAX).as_ref()));
        assert!(is_stale("moat-test-nopid".as_ref()));
        assert!(!is_stale("other-1-0".as_ref()));
    }
}
