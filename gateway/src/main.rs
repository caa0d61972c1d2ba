fn main() -> std::process::ExitCode {
    moat::cli::main()
}
