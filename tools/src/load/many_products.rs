//! `many-products`: the hot-holds race spread over many products, so contention is spread
//! too; clients pick products round-robin or at random.

use std::time::Duration;

use clap::{Args, ValueEnum};
use rand::RngExt;
use rand::rngs::SmallRng;

use super::conn::Server;
use super::hot_holds::{HoldsFigures, HoldsPlan, UNLIMITED_STOCK, run_plan};
use super::{Budget, Crowd, LoadError, actor_rng, positive};

/// Options of `flashsale-tools load many-products`.
#[derive(Debug, Clone, Args)]
pub struct ManyProductsArgs {
    /// Clients and connections.
    #[command(flatten)]
    pub crowd: Crowd,
    /// When to stop.
    #[command(flatten)]
    pub budget: Budget,
    /// Products the holds spread over.
    #[arg(long, default_value_t = 64, value_parser = positive)]
    pub products: usize,
    /// Units each product starts with (the default never sells out).
    #[arg(long, default_value_t = UNLIMITED_STOCK, value_parser = clap::value_parser!(i64).range(0..))]
    pub stock: i64,
    /// How each client chooses the product of its next hold.
    #[arg(long, value_enum, default_value_t = Pick::RoundRobin)]
    pub pick: Pick,
}

/// How a client chooses the product of its next hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pick {
    /// The next product after its last one; clients start at different products.
    RoundRobin,
    /// Uniformly at random.
    Random,
}

/// `flashsale-tools load many-products`.
pub async fn run(server: &Server, args: ManyProductsArgs) -> Result<HoldsFigures, LoadError> {
    let plan = HoldsPlan {
        scenario: "many-products",
        products: args.products,
        stock: args.stock,
        pick: args.pick,
        crowd: args.crowd,
        budget: args.budget,
        backoff: Duration::ZERO,
    };
    run_plan(server, plan).await
}

/// One client's sequence of product indexes.
#[derive(Debug, Clone)]
pub enum Picker {
    /// The next product after the last one.
    RoundRobin {
        /// The next index (taken modulo the product count).
        next: u64,
    },
    /// Uniformly at random, from the client's own generator.
    Random(SmallRng),
}

impl Picker {
    /// The picker of client number `client`; `seed` varies the random sequences per run.
    pub fn new(pick: Pick, client: usize, seed: u64) -> Picker {
        let client = client as u64;
        match pick {
            Pick::RoundRobin => Picker::RoundRobin { next: client },
            Pick::Random => Picker::Random(actor_rng(seed, client)),
        }
    }

    /// The next product index below `count`.
    pub fn next(&mut self, count: usize) -> usize {
        match self {
            Picker::RoundRobin { next } => {
                let drawn = *next % count as u64;
                *next = next.wrapping_add(1);
                drawn as usize
            }
            Picker::Random(rng) => rng.random_range(0..count),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_starts_at_the_client_and_cycles() {
        let mut picker = Picker::new(Pick::RoundRobin, 3, 0);
        let picks: Vec<usize> = (0..5).map(|_| picker.next(4)).collect();
        assert_eq!(picks, [3, 0, 1, 2, 3]);
    }

    #[test]
    fn random_covers_every_product() {
        let mut picker = Picker::new(Pick::Random, 0, 7);
        let mut seen = [false; 8];
        for _ in 0..200 {
            seen[picker.next(8)] = true;
        }
        assert!(seen.iter().all(|hit| *hit));
    }
}
