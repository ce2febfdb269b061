//! `flashsale-tools load`: a load generator that drives a running server over gRPC, prints
//! throughput, latency percentiles and status counts, and checks the books afterwards.
//!
//! Scenarios, one module each:
//!
//! - [`hot_holds`]: many clients race `CreateHold` (qty 1) on one product.
//! - [`many_products`]: the same race spread over many products.
//! - [`flash_crowd`]: buyers hold, order and pay (or fail, or walk away) on a small stock.
//! - [`watchers`]: thousands of `WatchAvailability` streams and the delivery latency of
//!   stock changes to all of them.
//! - [`health_checks`]: `grpc.health.v1.Health/Check` as fast as it goes: the ceiling of a
//!   gRPC call, no database.
//! - [`soak`]: flash-crowd waves for a long time, with the server's memory, descriptors and
//!   database connections reported as it goes.
//!
//! Shared pieces: [`conn`] (connections, products), [`stats`] (per-client latency histograms
//! and status counts merged at the end, the progress line), [`checks`] (the final checks
//! that exit non-zero on failure) and [`procfs`] (server memory and CPU, file limits).
//!
//! Every client task owns its statistics; they are merged once the clients are done, so the
//! hot path shares nothing but a few relaxed atomic counters for the progress line.

mod checks;
mod conn;
pub use conn::Server;
pub mod flash_crowd;
pub mod health_checks;
pub mod hot_holds;
pub mod many_products;
pub mod procfs;
mod soak;
mod stats;
mod watchers;

use std::time::Duration;

use clap::{Args, Subcommand};
use rand::SeedableRng;
use rand::rngs::SmallRng;

pub use flash_crowd::FlashCrowdArgs;
pub use health_checks::HealthChecksArgs;
pub use hot_holds::HotHoldsArgs;
pub use many_products::ManyProductsArgs;
pub use soak::SoakArgs;
pub use watchers::WatchersArgs;

/// Any failure of a scenario, including a failed check: `flashsale-tools` reports it and exits 1.
pub type LoadError = Box<dyn std::error::Error + Send + Sync>;

/// How long a run lasts when neither `--duration` nor `--requests` is given.
const DEFAULT_DURATION: Duration = Duration::from_secs(10);

/// Options of `flashsale-tools load`.
#[derive(Debug, Clone, Args)]
pub struct LoadArgs {
    /// The server to drive, and the token to call it with.
    #[command(flatten)]
    pub server: conn::Server,
    /// The scenario to run.
    #[command(subcommand)]
    pub scenario: Scenario,
}

/// The load scenarios.
#[derive(Debug, Clone, Subcommand)]
pub enum Scenario {
    /// Many clients hammer CreateHold (qty 1) on one product.
    HotHolds(HotHoldsArgs),
    /// Buyers race for a small stock: hold, order, then pay (success or failure) or walk away.
    FlashCrowd(FlashCrowdArgs),
    /// Like hot-holds, spread over many products.
    ManyProducts(ManyProductsArgs),
    /// Thousands of WatchAvailability streams on one product: delivery latency of changes.
    Watchers(WatchersArgs),
    /// Many clients call grpc.health.v1.Health/Check: the ceiling of a call, no database.
    HealthChecks(HealthChecksArgs),
    /// Flash-crowd waves for a long time: rate, p99, server memory, descriptors and
    /// database connections every few seconds, the books of every wave at the end.
    Soak(SoakArgs),
}

/// How many clients run and over how many HTTP/2 connections.
#[derive(Debug, Clone, Args)]
pub struct Crowd {
    /// Concurrent clients (each runs one call at a time).
    #[arg(long, default_value_t = 256, value_parser = positive)]
    pub clients: usize,
    /// HTTP/2 connections the clients are spread over (round-robin).
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub connections: usize,
}

/// When a run of independent calls stops: after a duration or after a number of calls.
#[derive(Debug, Clone, Args)]
pub struct Budget {
    /// How long to run (e.g. 10s, 1m); the default (10s) unless --requests is given.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with = "requests")]
    pub duration: Option<Duration>,
    /// Total calls to make, over all clients, instead of running for a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,
}

/// Runs the chosen scenario and prints its figures; fails when a check fails.
pub async fn run(args: LoadArgs) -> Result<(), LoadError> {
    match args.scenario {
        Scenario::HotHolds(scenario) => hot_holds::run(&args.server, scenario).await.map(drop),
        Scenario::FlashCrowd(scenario) => flash_crowd::run(&args.server, scenario).await.map(drop),
        Scenario::ManyProducts(scenario) => {
            many_products::run(&args.server, scenario).await.map(drop)
        }
        Scenario::Watchers(scenario) => watchers::run(&args.server, scenario).await,
        Scenario::HealthChecks(scenario) => {
            health_checks::run(&args.server, scenario).await.map(drop)
        }
        Scenario::Soak(scenario) => soak::run(&args.server, scenario).await,
    }
}

/// Parses a count that must be at least one.
fn positive(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(value) => Ok(value),
        Err(error) => Err(error.to_string()),
    }
}

/// Parses a ratio between 0 and 1.
fn ratio(text: &str) -> Result<f64, String> {
    let value: f64 = text.parse().map_err(|error| format!("{error}"))?;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err("must be between 0 and 1".into())
    }
}

/// The random draws of one actor (a client, a buyer) of a run: its own sequence, derived
/// from the run's seed and the actor's number, so actors never share a generator.
fn actor_rng(seed: u64, actor: u64) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ actor.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// A name suffix and seed unique to this run, so products and idempotency keys of
/// different runs never collide.
fn run_id() -> (String, u64) {
    let id = uuid::Uuid::now_v7();
    let (high, low) = id.as_u64_pair();
    (id.simple().to_string(), high ^ low)
}

#[cfg(test)]
mod tests {
    use rand::RngExt;

    use super::*;

    #[test]
    fn actors_of_one_run_draw_different_sequences() {
        let draws = |actor| -> Vec<u64> {
            let mut rng = actor_rng(42, actor);
            (0..4).map(|_| rng.random()).collect()
        };
        assert_ne!(draws(0), draws(1));
        assert_eq!(draws(0), draws(0), "one seed, one sequence");
    }

    #[test]
    fn parsers_refuse_out_of_range() {
        assert!(positive("0").is_err());
        assert_eq!(positive("3"), Ok(3));
        assert!(ratio("1.5").is_err());
        assert_eq!(ratio("0.25"), Ok(0.25));
    }
}
