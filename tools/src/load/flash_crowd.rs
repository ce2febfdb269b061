//! `flash-crowd`: many buyers race for a small stock. Each buyer holds one unit, then
//! orders it and pays (the payment succeeds or fails), or walks away from the hold
//! (released at once, or left to expire). Afterwards every unit must be accounted for:
//! sold == successful payments applied, reserved == pending orders + holds still active.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clap::{Args, ValueEnum};
use rand::RngExt;
use tokio::task::JoinSet;

use super::checks::{Checks, read_products};
use super::conn::{Connection, Server, connect, create_products, expires_at};
use super::hot_holds::INSUFFICIENT_STOCK;
use super::stats::{Progress, Recorder, Rpc, Ticker, has_reason, option_name, per_second};
use super::{Crowd, LoadError, actor_rng, positive, ratio, run_id};
use flashsale::grpc::pb::{
    self, checkout_service_client::CheckoutServiceClient, handle_payment_webhook_request::Target,
};

/// How long past the last abandoned hold's expiry the reaper gets to expire it.
const REAPER_GRACE: Duration = Duration::from_secs(30);
/// Pause between reads while waiting for the reaper.
const EXPIRY_POLL: Duration = Duration::from_millis(500);

/// Options of `flashsale-tools load flash-crowd`.
#[derive(Debug, Clone, Args)]
pub struct FlashCrowdArgs {
    /// Clients and connections; each client serves buyers one after another.
    #[command(flatten)]
    pub crowd: Crowd,
    /// Buyers in the crowd; each tries once.
    #[arg(long, default_value_t = 2000, value_parser = positive)]
    pub buyers: usize,
    /// Units on sale.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(i64).range(0..))]
    pub stock: i64,
    /// Share of orders whose payment fails (the units go back on sale).
    #[arg(long, default_value_t = 0.1, value_parser = ratio)]
    pub fail_ratio: f64,
    /// Share of buyers who walk away from their hold instead of ordering.
    #[arg(long, default_value_t = 0.1, value_parser = ratio)]
    pub abandon_ratio: f64,
    /// What happens to abandoned holds: released at once, or left for the reaper (the final
    /// check then waits for the hold TTL).
    #[arg(long, value_enum, default_value_t = Abandon::Release)]
    pub abandon: Abandon,
}

/// What an abandoning buyer does with the hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Abandon {
    /// ReleaseHold at once.
    Release,
    /// Nothing: the hold expires after its TTL.
    Expire,
}

/// `flashsale-tools load flash-crowd`.
pub async fn run(server: &Server, args: FlashCrowdArgs) -> Result<CrowdFigures, LoadError> {
    let connections = connect(server, args.crowd.connections).await?;
    let Wave {
        product_id,
        outcome,
    } = wave(&connections, &args).await?;
    print_summary(&args, &product_id, &outcome);
    check(&args, &connections[0], &product_id, &outcome).await?;
    Ok(CrowdFigures::of(&args, &outcome))
}

/// One crowd on a product of its own, nothing printed.
pub struct Wave {
    /// The product on sale.
    pub product_id: String,
    /// What the buyers did and saw.
    pub outcome: CrowdOutcome,
}

/// Runs one crowd on a new product over `connections`.
pub async fn wave(connections: &[Connection], args: &FlashCrowdArgs) -> Result<Wave, LoadError> {
    let (run, seed) = run_id();
    let label = format!("flash-crowd {run}");
    let products = create_products(&connections[0], &label, 1, args.stock).await?;
    let product_id = products[0].id.clone();
    let plan = Arc::new(CrowdPlan {
        args: args.clone(),
        product_id: product_id.clone(),
        run,
        seed,
        next_buyer: AtomicU64::new(0),
    });
    let outcome = crowd(&plan, connections).await?;
    Ok(Wave {
        product_id,
        outcome,
    })
}

/// The headline figures of a flash crowd, for `flashsale-tools bench`.
#[derive(Debug, Clone, Copy)]
pub struct CrowdFigures {
    /// Buyers served.
    pub buyers: u64,
    /// Buyers served per second, from the first call to the last answer.
    pub buyers_per_second: f64,
    /// The highest 99th percentile latency of any kind of call, and that call.
    pub worst_p99: (Duration, &'static str),
}

impl CrowdFigures {
    /// The figures of a finished crowd.
    fn of(args: &FlashCrowdArgs, outcome: &CrowdOutcome) -> CrowdFigures {
        CrowdFigures {
            buyers: args.buyers as u64,
            buyers_per_second: per_second(args.buyers as u64, outcome.elapsed),
            worst_p99: worst_p99(&outcome.recorder),
        }
    }
}

/// The highest 99th percentile latency of any call of a crowd, and that call.
pub fn worst_p99(recorder: &Recorder) -> (Duration, &'static str) {
    let rpcs = [
        Rpc::CreateHold,
        Rpc::CreateOrder,
        Rpc::HandlePaymentWebhook,
        Rpc::ReleaseHold,
    ];
    rpcs.into_iter()
        .filter_map(|rpc| Some((recorder.latency_at(rpc, 0.99)?, rpc.name())))
        .max()
        .unwrap_or((Duration::ZERO, "none"))
}

/// What every client of the crowd shares.
struct CrowdPlan {
    /// The options.
    args: FlashCrowdArgs,
    /// The product on sale.
    product_id: String,
    /// This run's id, part of every idempotency key.
    run: String,
    /// Seed of the buyers' dice.
    seed: u64,
    /// The next buyer to serve; clients take buyers from it until all are served.
    next_buyer: AtomicU64,
}

/// Where the buyers ended up; summed over clients.
#[derive(Debug, Clone, Default)]
struct Tally {
    /// Holds granted.
    held: u64,
    /// Buyers refused a hold for lack of stock.
    sold_out: u64,
    /// Abandoned holds released.
    released: u64,
    /// Holds still active after the run: abandoned ones left to expire, and ones whose
    /// release or order failed.
    active: u64,
    /// Orders created.
    ordered: u64,
    /// Orders paid (SUCCESS webhook applied).
    paid: u64,
    /// Orders cancelled (FAILURE webhook applied).
    cancelled: u64,
    /// Webhooks answered with an outcome other than APPLIED.
    not_applied: u64,
    /// Buyers stopped by a failure other than sold out.
    failed: u64,
    /// The latest expiry of the holds left active.
    last_expiry: Option<SystemTime>,
}

impl Tally {
    /// Adds another client's tally.
    fn add(&mut self, other: &Tally) {
        self.held += other.held;
        self.sold_out += other.sold_out;
        self.released += other.released;
        self.active += other.active;
        self.ordered += other.ordered;
        self.paid += other.paid;
        self.cancelled += other.cancelled;
        self.not_applied += other.not_applied;
        self.failed += other.failed;
        self.last_expiry = self.last_expiry.max(other.last_expiry);
    }

    /// Orders still awaiting payment.
    fn pending(&self) -> u64 {
        self.ordered - self.paid - self.cancelled
    }

    /// Remembers a hold left active.
    fn left_active(&mut self, hold: &pb::Hold) {
        self.active += 1;
        self.last_expiry = self.last_expiry.max(expires_at(hold));
    }
}

/// One client: serves buyers one after another.
struct CrowdClient {
    /// Its stub, on one of the shared connections.
    checkout: CheckoutServiceClient<Connection>,
    /// What all clients share.
    plan: Arc<CrowdPlan>,
    /// This client's latency and status counts.
    recorder: Recorder,
    /// Where this client's buyers ended up.
    tally: Tally,
}

impl CrowdClient {
    /// Serves buyers until none is left and hands back its figures.
    async fn run(mut self) -> Self {
        let buyers = self.plan.args.buyers as u64;
        loop {
            let buyer = self.plan.next_buyer.fetch_add(1, Ordering::Relaxed);
            if buyer >= buyers {
                return self;
            }
            self.buy(buyer).await;
        }
    }

    /// One buyer: hold, then walk away, or order and pay.
    async fn buy(&mut self, buyer: u64) {
        let args = &self.plan.args;
        let mut rng = actor_rng(self.plan.seed, buyer);
        let abandons = rng.random_bool(args.abandon_ratio);
        let fails = rng.random_bool(args.fail_ratio);
        let Some(hold) = self.hold().await else {
            return;
        };
        if abandons {
            return self.abandon(hold).await;
        }
        let Some(order) = self.order(&hold).await else {
            return;
        };
        self.pay(buyer, &order, fails).await;
    }

    /// CreateHold of one unit.
    async fn hold(&mut self) -> Option<pb::Hold> {
        let request = pb::CreateHoldRequest {
            product_id: self.plan.product_id.clone(),
            qty: 1,
            client_request_id: String::new(),
            buyer_id: String::new(),
        };
        let started = Instant::now();
        let result = self.checkout.create_hold(request).await;
        self.recorder.record(Rpc::CreateHold, started, &result);
        match result {
            Ok(hold) => {
                self.tally.held += 1;
                Some(hold.into_inner())
            }
            Err(status) if has_reason(&status, INSUFFICIENT_STOCK) => {
                self.tally.sold_out += 1;
                None
            }
            Err(_) => {
                self.tally.failed += 1;
                None
            }
        }
    }

    /// Walks away: releases the hold, or leaves it to expire.
    async fn abandon(&mut self, hold: pb::Hold) {
        if self.plan.args.abandon == Abandon::Expire {
            return self.tally.left_active(&hold);
        }
        let request = pb::ReleaseHoldRequest {
            hold_id: hold.hold_id.clone(),
        };
        let started = Instant::now();
        let result = self.checkout.release_hold(request).await;
        self.recorder.record(Rpc::ReleaseHold, started, &result);
        match result {
            Ok(_) => self.tally.released += 1,
            Err(_) => {
                self.tally.failed += 1;
                self.tally.left_active(&hold);
            }
        }
    }

    /// CreateOrder from the hold.
    async fn order(&mut self, hold: &pb::Hold) -> Option<pb::Order> {
        let request = pb::CreateOrderRequest {
            hold_id: hold.hold_id.clone(),
        };
        let started = Instant::now();
        let result = self.checkout.create_order(request).await;
        self.recorder.record(Rpc::CreateOrder, started, &result);
        match result {
            Ok(order) => {
                self.tally.ordered += 1;
                Some(order.into_inner())
            }
            Err(_) => {
                // Nothing was applied: the hold stays active until it expires.
                self.tally.failed += 1;
                self.tally.left_active(hold);
                None
            }
        }
    }

    /// The payment provider's webhook for the order: success, or failure if `fails`.
    async fn pay(&mut self, buyer: u64, order: &pb::Order, fails: bool) {
        let (result, failure_reason) = if fails {
            (pb::PaymentResult::Failure, "card declined".to_owned())
        } else {
            (pb::PaymentResult::Success, String::new())
        };
        let request = pb::HandlePaymentWebhookRequest {
            idempotency_key: format!("load-{}-{buyer}", self.plan.run),
            target: Some(Target::OrderId(order.order_id.clone())),
            result: result.into(),
            failure_reason,
            amount_cents: order.total_cents,
        };
        let started = Instant::now();
        let answer = self.checkout.handle_payment_webhook(request).await;
        self.recorder
            .record(Rpc::HandlePaymentWebhook, started, &answer);
        let applied = pb::WebhookOutcome::Applied as i32;
        match answer {
            Ok(response) if response.get_ref().outcome == applied => match result {
                pb::PaymentResult::Failure => self.tally.cancelled += 1,
                _ => self.tally.paid += 1,
            },
            Ok(_) => self.tally.not_applied += 1,
            Err(_) => self.tally.failed += 1,
        }
    }
}

/// The merged figures of the crowd.
pub struct CrowdOutcome {
    /// Latency and status counts of every call.
    pub recorder: Recorder,
    /// Where the buyers ended up.
    tally: Tally,
    /// From the first call to the last answer.
    pub elapsed: Duration,
}

impl CrowdOutcome {
    /// The claims about the crowd's product (read after it) that do not hold: sold as
    /// paid, reserved as pending orders plus active holds, nothing beyond `stock`.
    pub fn unaccounted_units(&self, stock: i64, product: &pb::Product) -> Vec<String> {
        unit_claims(stock, product, &self.tally)
            .into_iter()
            .filter(|(held, _)| !held)
            .map(|(_, what)| what)
            .collect()
    }
}

/// Runs the clients until every buyer is served and merges their figures.
async fn crowd(
    plan: &Arc<CrowdPlan>,
    connections: &[Connection],
) -> Result<CrowdOutcome, LoadError> {
    let progress = Arc::new(Progress::default());
    let _ticker = Ticker::start("flash-crowd", progress.clone());
    let started = Instant::now();
    let mut clients = JoinSet::new();
    for index in 0..plan.args.crowd.clients.min(plan.args.buyers) {
        let client = CrowdClient {
            checkout: CheckoutServiceClient::new(connections[index % connections.len()].clone()),
            plan: plan.clone(),
            recorder: Recorder::new(progress.clone()),
            tally: Tally::default(),
        };
        clients.spawn(client.run());
    }
    let mut outcome = CrowdOutcome {
        recorder: Recorder::new(progress),
        tally: Tally::default(),
        elapsed: Duration::ZERO,
    };
    while let Some(joined) = clients.join_next().await {
        let client = joined.map_err(|error| format!("a client task failed: {error}"))?;
        outcome.recorder.merge(client.recorder);
        outcome.tally.add(&client.tally);
    }
    outcome.elapsed = started.elapsed();
    Ok(outcome)
}

/// Prints the run's figures.
fn print_summary(args: &FlashCrowdArgs, product_id: &str, outcome: &CrowdOutcome) {
    let (tally, elapsed) = (&outcome.tally, outcome.elapsed);
    println!(
        "flash-crowd: {} buyers, {} clients over {} connections, {:.1} s",
        args.buyers,
        args.crowd.clients,
        args.crowd.connections,
        elapsed.as_secs_f64()
    );
    println!(
        "product: {product_id}, stock {}, fail ratio {}, abandon ratio {} ({})",
        args.stock,
        args.fail_ratio,
        args.abandon_ratio,
        option_name(&args.abandon)
    );
    println!(
        "buyers: {} held, {} sold out, {} released, {} left active, {} ordered, {} paid, {} payment failed, {} other failures",
        tally.held,
        tally.sold_out,
        tally.released,
        tally.active,
        tally.ordered,
        tally.paid,
        tally.cancelled,
        tally.failed
    );
    println!(
        "throughput: {:.0} buyers/s; holds {:.0}/s, orders {:.0}/s, payments {:.0}/s, releases {:.0}/s",
        per_second(args.buyers as u64, elapsed),
        per_second(tally.held, elapsed),
        per_second(tally.ordered, elapsed),
        per_second(tally.paid + tally.cancelled, elapsed),
        per_second(tally.released, elapsed),
    );
    outcome.recorder.print();
}

/// The checks: books and audit, units accounted for on the product; with holds left to
/// expire, again once the reaper has expired them.
async fn check(
    args: &FlashCrowdArgs,
    connection: &Connection,
    product_id: &str,
    outcome: &CrowdOutcome,
) -> Result<(), LoadError> {
    let mut checks = Checks::default();
    let tally = &outcome.tally;
    let product = checks
        .books(connection, &[product_id.to_owned()])
        .await?
        .remove(0);
    if tally.not_applied > 0 {
        println!(
            "note: {} webhooks were not applied (DUPLICATE, DEFERRED or IGNORED), unexpected with unique keys",
            tally.not_applied
        );
    }
    check_units(&mut checks, args.stock, &product, tally);
    if tally.active > 0 {
        check_expiry(&mut checks, connection, product_id, tally).await?;
    }
    checks.finish()
}

/// Every unit accounted for: sold as paid, reserved as pending orders plus active holds,
/// nothing beyond the stock.
fn check_units(checks: &mut Checks, stock: i64, product: &pb::Product, tally: &Tally) {
    for (held, what) in unit_claims(stock, product, tally) {
        checks.expect(held, what);
    }
}

/// The claims of [`check_units`], each with whether it holds.
fn unit_claims(stock: i64, product: &pb::Product, tally: &Tally) -> [(bool, String); 4] {
    let (paid, pending, active) = (tally.paid, tally.pending(), tally.active);
    [
        (
            product.stock_total == stock,
            format!("stock_total {} == stock {stock}", product.stock_total),
        ),
        (
            i64::try_from(paid) == Ok(product.sold),
            format!("sold {} == SUCCESS webhooks applied {paid}", product.sold),
        ),
        (
            i64::try_from(paid + pending + active).is_ok_and(|committed| committed <= stock),
            format!("paid {paid} + pending {pending} + active holds {active} <= stock {stock}"),
        ),
        (
            i64::try_from(pending + active) == Ok(product.reserved),
            format!(
                "reserved {} == pending orders {pending} + active holds {active}",
                product.reserved
            ),
        ),
    ]
}

/// Waits for the reaper to expire the holds left active (until the last one's expiry plus
/// a grace), then checks that their units are back and the books still add up.
async fn check_expiry(
    checks: &mut Checks,
    connection: &Connection,
    product_id: &str,
    tally: &Tally,
) -> Result<(), LoadError> {
    let deadline = tally.last_expiry.unwrap_or_else(SystemTime::now) + REAPER_GRACE;
    let wait = deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    println!(
        "waiting up to {:.0} s for the reaper to expire {} holds",
        wait.as_secs_f64(),
        tally.active
    );
    let ids = [product_id.to_owned()];
    let expected = i64::try_from(tally.pending()).unwrap_or(i64::MAX);
    let mut reserved = i64::MIN;
    while SystemTime::now() < deadline {
        reserved = read_products(connection, &ids).await?[0].reserved;
        if reserved == expected {
            break;
        }
        tokio::time::sleep(EXPIRY_POLL).await;
    }
    checks.expect(
        reserved == expected,
        format!("after expiry: reserved {reserved} == pending orders {expected}"),
    );
    checks.books(connection, &ids).await?;
    Ok(())
}
