// mimalloc: the proxy path allocates per request on every thread; glibc's malloc spent more
// time on arena locks and consolidation than moat spent on its own work (measured with perf
// under `cargo xtask bench gateway`).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    moat::cli::main()
}
