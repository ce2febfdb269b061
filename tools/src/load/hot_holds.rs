//! `hot-holds`: many clients race `CreateHold` (qty 1) on one product, the worst case of
//! row contention. The engine here also runs `many-products` (the same race over many
//! products): clients over connections, a stop rule, per-product tallies, summary and checks.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::task::JoinSet;

use super::checks::Checks;
use super::conn::{Connection, Server, connect, create_products, hold_ttl};
use super::many_products::{Pick, Picker};
use super::stats::{OK, Progress, Recorder, Rpc, Ticker, option_name, per_second};
use super::{Budget, Crowd, DEFAULT_DURATION, LoadError, run_id};
use flashsale::grpc::pb::{self, checkout_service_client::CheckoutServiceClient};

/// Stock of a product that must not sell out during a run.
pub const UNLIMITED_STOCK: i64 = 1_000_000_000;
/// The ErrorInfo reason of a refused hold.
pub const INSUFFICIENT_STOCK: &str = "INSUFFICIENT_STOCK";

/// Options of `flashsale-tools load hot-holds`.
#[derive(Debug, Clone, Args)]
pub struct HotHoldsArgs {
    /// Clients and connections.
    #[command(flatten)]
    pub crowd: Crowd,
    /// When to stop.
    #[command(flatten)]
    pub budget: Budget,
    /// Units the product starts with (the default never sells out).
    #[arg(long, default_value_t = UNLIMITED_STOCK, value_parser = clap::value_parser!(i64).range(0..))]
    pub stock: i64,
    /// Pause after a RESOURCE_EXHAUSTED answer (the server's in-flight limit) before the
    /// client's next call, as a client retrying with backoff would (e.g. 50ms).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub backoff: Duration,
}

/// `flashsale-tools load hot-holds`.
pub async fn run(server: &Server, args: HotHoldsArgs) -> Result<HoldsFigures, LoadError> {
    let plan = HoldsPlan {
        scenario: "hot-holds",
        products: 1,
        stock: args.stock,
        pick: Pick::RoundRobin,
        crowd: args.crowd,
        budget: args.budget,
        backoff: args.backoff,
    };
    run_plan(server, plan).await
}

/// What a holds race runs: how many products, how much stock, who calls and for how long.
pub struct HoldsPlan {
    /// The scenario's name, for the product names and the output.
    pub scenario: &'static str,
    /// Products the holds spread over.
    pub products: usize,
    /// Units each product starts with.
    pub stock: i64,
    /// How each client chooses the product of its next hold.
    pub pick: Pick,
    /// Clients and connections.
    pub crowd: Crowd,
    /// When to stop.
    pub budget: Budget,
    /// Pause of a client after an overload refusal.
    pub backoff: Duration,
}

/// The headline figures of a holds race, for `flashsale-tools bench`.
#[derive(Debug, Clone, Copy)]
pub struct HoldsFigures {
    /// Holds granted over the race.
    pub holds: u64,
    /// Holds granted per second over the race.
    pub holds_per_second: f64,
    /// Median CreateHold latency.
    pub p50: Duration,
    /// 99th percentile CreateHold latency.
    pub p99: Duration,
}

/// Runs a holds race: connect, create the products, race, print, check.
pub async fn run_plan(server: &Server, plan: HoldsPlan) -> Result<HoldsFigures, LoadError> {
    let connections = connect(server, plan.crowd.connections).await?;
    let (run, seed) = run_id();
    let label = format!("{} {run}", plan.scenario);
    let products = create_products(&connections[0], &label, plan.products, plan.stock).await?;
    let ids: Vec<String> = products.into_iter().map(|product| product.id).collect();
    let outcome = race(&plan, &connections, Arc::new(ids.clone()), seed).await?;
    print_summary(&plan, &ids, &outcome);
    check(&plan, &connections[0], &ids, &outcome).await?;
    let latency = |quantile| {
        outcome
            .recorder
            .latency_at(Rpc::CreateHold, quantile)
            .unwrap_or_default()
    };
    Ok(HoldsFigures {
        holds: outcome.granted(),
        holds_per_second: per_second(outcome.granted(), outcome.elapsed),
        p50: latency(0.5),
        p99: latency(0.99),
    })
}

/// What one product saw during the race.
#[derive(Debug, Clone, Copy, Default)]
struct ProductTally {
    /// Holds granted.
    granted: u64,
    /// Holds refused for lack of stock.
    sold_out: u64,
}

/// The merged figures of a race.
struct RaceOutcome {
    /// Latency and status counts of every call.
    recorder: Recorder,
    /// Per product, in the order of the product ids.
    tallies: Vec<ProductTally>,
    /// From the first call to the last answer.
    elapsed: Duration,
    /// How long a hold lasts, read from the first granted hold.
    hold_ttl: Option<Duration>,
}

/// When the clients stop taking new calls.
enum Limit {
    /// At this instant.
    Until(Instant),
    /// After this many calls in all; `issued` counts those taken so far.
    Count { issued: AtomicU64, total: u64 },
}

impl Limit {
    /// The limit of `budget`, starting now.
    fn start(budget: &Budget) -> Limit {
        match (budget.requests, budget.duration) {
            (Some(total), _) => Limit::Count {
                issued: AtomicU64::new(0),
                total,
            },
            (None, duration) => Limit::Until(Instant::now() + duration.unwrap_or(DEFAULT_DURATION)),
        }
    }

    /// Whether one more call may start (and takes it).
    fn take(&self) -> bool {
        match self {
            Limit::Until(deadline) => Instant::now() < *deadline,
            Limit::Count { issued, total } => issued.fetch_add(1, Ordering::Relaxed) < *total,
        }
    }
}

/// One client of the race: calls CreateHold until the limit says stop.
struct HoldClient {
    /// Its stub, on one of the shared connections.
    checkout: CheckoutServiceClient<Connection>,
    /// The product ids to hold from.
    products: Arc<Vec<String>>,
    /// Chooses the next product.
    picker: Picker,
    /// Shared stop rule.
    limit: Arc<Limit>,
    /// This client's latency and status counts.
    recorder: Recorder,
    /// This client's tallies, per product.
    tallies: Vec<ProductTally>,
    /// Reservation length seen on this client's first granted hold.
    hold_ttl: Option<Duration>,
    /// Pause after an overload refusal.
    backoff: Duration,
}

impl HoldClient {
    /// Runs until the limit says stop and hands back its figures.
    async fn run(mut self) -> Self {
        while self.limit.take() {
            let index = self.picker.next(self.products.len());
            self.hold(index).await;
        }
        self
    }

    /// One CreateHold of qty 1 on product `index`.
    async fn hold(&mut self, index: usize) {
        let request = pb::CreateHoldRequest {
            product_id: self.products[index].clone(),
            qty: 1,
            client_request_id: String::new(),
            buyer_id: String::new(),
        };
        let started = Instant::now();
        let result = self.checkout.create_hold(request).await;
        self.recorder.record(Rpc::CreateHold, started, &result);
        let tally = &mut self.tallies[index];
        match result {
            Ok(hold) => {
                tally.granted += 1;
                if self.hold_ttl.is_none() {
                    self.hold_ttl = hold_ttl(hold.get_ref());
                }
            }
            Err(status) if super::stats::has_reason(&status, INSUFFICIENT_STOCK) => {
                tally.sold_out += 1
            }
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                tokio::time::sleep(self.backoff).await
            }
            Err(_) => {}
        }
    }
}

/// Runs the clients until the budget is spent and merges their figures.
async fn race(
    plan: &HoldsPlan,
    connections: &[Connection],
    products: Arc<Vec<String>>,
    seed: u64,
) -> Result<RaceOutcome, LoadError> {
    let progress = Arc::new(Progress::default());
    let _ticker = Ticker::start(plan.scenario, progress.clone());
    let limit = Arc::new(Limit::start(&plan.budget));
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for index in 0..plan.crowd.clients {
        let client = HoldClient {
            checkout: CheckoutServiceClient::new(connections[index % connections.len()].clone()),
            products: products.clone(),
            picker: Picker::new(plan.pick, index, seed),
            limit: limit.clone(),
            recorder: Recorder::new(progress.clone()),
            tallies: vec![ProductTally::default(); products.len()],
            hold_ttl: None,
            backoff: plan.backoff,
        };
        clients.spawn(client.run());
    }
    let mut outcome = RaceOutcome {
        recorder: Recorder::new(progress.clone()),
        tallies: vec![ProductTally::default(); products.len()],
        elapsed: Duration::ZERO,
        hold_ttl: None,
    };
    while let Some(joined) = clients.join_next().await {
        let client = joined.map_err(|error| format!("a client task failed: {error}"))?;
        outcome.absorb(client);
    }
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

impl RaceOutcome {
    /// Adds one client's figures.
    fn absorb(&mut self, client: HoldClient) {
        self.recorder.merge(client.recorder);
        for (mine, theirs) in self.tallies.iter_mut().zip(&client.tallies) {
            mine.granted += theirs.granted;
            mine.sold_out += theirs.sold_out;
        }
        self.hold_ttl = self.hold_ttl.or(client.hold_ttl);
    }

    /// Holds granted over all products.
    fn granted(&self) -> u64 {
        self.tallies.iter().map(|tally| tally.granted).sum()
    }

    /// Calls answered with a hold or with "sold out" (other failures left out).
    fn answered(&self) -> u64 {
        self.tallies
            .iter()
            .map(|tally| tally.granted + tally.sold_out)
            .sum()
    }
}

/// Prints the run's figures.
fn print_summary(plan: &HoldsPlan, ids: &[String], outcome: &RaceOutcome) {
    println!(
        "{}: {} clients over {} connections, {:.1} s",
        plan.scenario,
        plan.crowd.clients,
        plan.crowd.connections,
        outcome.elapsed.as_secs_f64()
    );
    match ids {
        [id] => println!("product: {id}, stock {}", plan.stock),
        _ => println!(
            "products: {}, stock {} each, pick {}",
            ids.len(),
            plan.stock,
            option_name(&plan.pick)
        ),
    }
    let calls = outcome.recorder.total(Rpc::CreateHold);
    println!(
        "throughput: {:.0} holds/s ({} holds granted of {calls} calls, {:.0} calls/s)",
        per_second(outcome.granted(), outcome.elapsed),
        outcome.granted(),
        per_second(calls, outcome.elapsed),
    );
    outcome.recorder.print();
}

/// The checks of a holds race: books and audit, then holds granted as the stock allows
/// and reserved units matching them on every product.
async fn check(
    plan: &HoldsPlan,
    connection: &Connection,
    ids: &[String],
    outcome: &RaceOutcome,
) -> Result<(), LoadError> {
    let mut checks = Checks::default();
    let products = checks.books(connection, ids).await?;
    let refused = format!("FAILED_PRECONDITION/{INSUFFICIENT_STOCK}");
    let recorder = &outcome.recorder;
    let other_failures = recorder.total(Rpc::CreateHold)
        - recorder.ok(Rpc::CreateHold)
        - recorder.calls(Rpc::CreateHold, &refused);
    if other_failures > 0 {
        println!(
            "note: {other_failures} calls failed with neither {OK} nor {INSUFFICIENT_STOCK}; they are left out of the counts"
        );
    }
    if outcome.hold_ttl.is_some_and(|ttl| outcome.elapsed >= ttl) {
        println!(
            "note: the run outlasted the hold ttl, so holds expired mid-run; granted holds are not compared with stock"
        );
    } else {
        check_grants(&mut checks, plan.stock, &products, outcome);
    }
    checks.finish()
}

/// On every product: holds granted == min(requests answered, stock), and reserved units
/// == holds granted (each hold is one unit and none has expired yet).
fn check_grants(checks: &mut Checks, stock: i64, products: &[pb::Product], outcome: &RaceOutcome) {
    let stock = u64::try_from(stock).unwrap_or(0);
    let tallies = &outcome.tallies;
    let over_or_under = tallies
        .iter()
        .filter(|tally| tally.granted != (tally.granted + tally.sold_out).min(stock))
        .count();
    let (granted, answered) = (outcome.granted(), outcome.answered());
    let reserved: i64 = products.iter().map(|product| product.reserved).sum();
    let (grants, reservations) = match tallies.len() {
        1 => (
            format!("holds granted {granted} == min(requests {answered}, stock {stock})"),
            format!("reserved {reserved} == holds granted {granted}"),
        ),
        count => (
            format!(
                "holds granted == min(requests, stock {stock}) on each of {count} products ({granted} granted of {answered} requests)"
            ),
            format!("reserved == holds granted on each of {count} products ({reserved} reserved)"),
        ),
    };
    checks.expect(over_or_under == 0, grants);
    let mismatched = products
        .iter()
        .zip(tallies)
        .filter(|(product, tally)| u64::try_from(product.reserved) != Ok(tally.granted))
        .count();
    checks.expect(mismatched == 0, reservations);
}
