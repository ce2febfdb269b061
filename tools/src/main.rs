//! `flashsale-tools`: the load generator and the benchmark of the flashsale server, apart
//! from the server so that it links none of their code.
//!
//! - [`load`]: `flashsale-tools load <scenario>` drives a running server over gRPC and
//!   checks the books afterwards.
//! - [`bench`]: `flashsale-tools bench` runs the server (the `flashsale` binary) against
//!   PostgreSQL's own one-hold-per-commit ceiling, side by side in one run.

mod bench;
mod load;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "flashsale-tools",
    version,
    about = "Load generator and benchmark for the flashsale server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive a running server with a load scenario and print throughput, latency and checks.
    Load(load::LoadArgs),
    /// Measure hot-product hold throughput against PostgreSQL's one-hold-per-commit ceiling.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    flashsale::cli::run_command("warn", async {
        match cli.command {
            Command::Load(args) => load::run(args).await,
            Command::Bench(args) => bench::run(args).await,
        }
    })
}
