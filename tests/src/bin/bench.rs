//! `moat-bench`: benchmarks run by `cargo xtask bench <name>`. Every case of one benchmark is
//! measured in the same run, interleaved over several rounds, and reported as ratios — the
//! machines are noisy, absolute numbers are not comparable between runs.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// connect()+close() cost of the gateway-host hooks, then the inference host's ingress
    /// guard: allowed throughput with and without it, and the rogue drop rate.
    Segment {
        /// Round trips per measurement.
        #[arg(long, default_value_t = 2000)]
        connects: u32,
        /// Interleaved rounds; the median is reported.
        #[arg(long, default_value_t = 9)]
        rounds: u32,
    },
    /// Requests/s of `GET /v1/models` with an API key, an access token, and no auth; `/v1`
    /// latency under a flood of password logins.
    Auth {
        /// Seconds per case per round.
        #[arg(long, default_value_t = 3)]
        secs: u32,
        /// Interleaved rounds; the median is reported.
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// wrk connections.
        #[arg(long, default_value_t = 32)]
        connections: u32,
        /// Clients flooding the token endpoint with password grants.
        #[arg(long, default_value_t = 8)]
        flooders: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.bench {
        Bench::Segment { connects, rounds } => moat_tests::bench::segment::run(connects, rounds)
            .and_then(|()| moat_tests::bench::inference::run(rounds)),
        Bench::Auth {
            secs,
            rounds,
            connections,
            flooders,
        } => moat_tests::bench::auth::run(secs, rounds, connections, flooders),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moat-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
