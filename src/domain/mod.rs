//! The checkout domain, transport-neutral: plain Rust inputs and outputs, and
//! `Result<T, DomainError>`. Each operation is one short PostgreSQL transaction that takes
//! row locks in one global order (payment event key, hold, order, product), so concurrent
//! operations serialize on the rows they share and never deadlock each other.

pub mod availability;
pub mod coalesce;
pub mod error;
pub mod hold_batcher;
pub mod holds;
pub mod order_batcher;
pub mod orders;
pub mod payment_batcher;
pub mod payments;
pub mod products;
pub mod reaper;
pub mod refunds;
pub mod release_batcher;
pub mod settlement;
pub mod stock_folder;
pub mod waitlist;

use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;

use crate::db::change_feed::FeedEvent;
use crate::db::io_thread::IoThread;
use crate::db::{DbPool, PooledConnection};
use availability::{AvailabilityHub, StockSnapshot};
use coalesce::Batcher;
pub use error::DomainError;
use hold_batcher::HoldBatches;
use order_batcher::OrderBatches;
use payment_batcher::PaymentBatches;
use release_batcher::ReleaseBatches;
use stock_folder::StockFolder;
use uuid::Uuid;

/// Who is calling: the name of the token the call presented (`""` on a server without
/// tokens). The keys a caller chooses (client request ids, webhook idempotency keys) are its
/// own: the same key from another caller is another key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Caller(Arc<str>);

impl Caller {
    /// The caller holding the token named `name`.
    pub fn named(name: &str) -> Caller {
        Caller(name.into())
    }

    /// A caller on a server without tokens.
    pub fn anonymous() -> Caller {
        Caller::default()
    }

    /// The token's name (`""` when anonymous).
    pub fn name(&self) -> &str {
        &self.0
    }
}

/// Business limits that shape holds.
#[derive(Debug, Clone)]
pub struct CheckoutSettings {
    /// How long a hold reserves its units before the reaper gives them back.
    pub hold_ttl: Duration,
    /// How long an order waits for its payment before it is cancelled.
    pub payment_ttl: Duration,
    /// The longest ExtendHold may keep a hold, counted from its creation.
    pub hold_max_lifetime: Duration,
    /// Largest `qty` one hold may take, so one buyer cannot empty a sale in one call (at
    /// most [`MAX_QTY_PER_HOLD`], so a hold's total at the largest price fits in an i64).
    pub max_qty_per_hold: i64,
    /// Most product ids one WatchAvailability call may name, so one caller cannot make the
    /// server hold an unbounded subscription.
    pub max_watched_products: usize,
    /// Independent queues of coalesced CreateHold calls (each runs one transaction at a time).
    pub hold_batch_lanes: usize,
}

/// The checkout operations over one PostgreSQL database; cheap to share behind an `Arc`.
pub struct Checkout {
    /// Connections every operation borrows from.
    pool: DbPool,
    /// Limits applied to every request.
    settings: CheckoutSettings,
    /// Gathers concurrent CreateHold calls into shared transactions.
    hold_batcher: Arc<Batcher<HoldBatches>>,
    /// Gathers concurrent CreateOrder calls into shared transactions.
    order_batcher: Arc<Batcher<OrderBatches>>,
    /// Gathers concurrent webhook deliveries for orders into shared transactions.
    payment_batcher: Arc<Batcher<PaymentBatches>>,
    /// Gathers concurrent ReleaseHold calls into shared transactions.
    release_batcher: Arc<Batcher<ReleaseBatches>>,
    /// Folds counter movements (settlements, releases) into their products, many per statement.
    stock_folder: Arc<StockFolder>,
    /// The latest stock states, fanned out to this process's WatchAvailability streams; fed
    /// by the change feed through [`Checkout::publish_stock`].
    availability: Arc<AvailabilityHub>,
    /// The JoinWaitlist streams this process serves.
    waitlist: waitlist::WaitlistHub,
    /// This process's advisory-lock key: its waiters live while the change feed's
    /// connection holds it.
    session: i64,
    /// Holds granted to callers that went away before their answer, for
    /// [`Checkout::release_orphaned_holds`] to release (taken by the one task that does).
    orphaned: std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Uuid>>>,
}

/// Largest value `max_qty_per_hold` may take: times [`products::MAX_PRICE_CENTS`], it stays
/// far below `i64::MAX`.
pub const MAX_QTY_PER_HOLD: i64 = 1_000_000;

/// How many times an operation that lost a deadlock or key race is retried.
const CONFLICT_RETRIES: usize = 3;

impl Checkout {
    /// Wraps a pool; the schema must already be migrated. Hold batches run on `io`.
    pub fn new(pool: DbPool, settings: CheckoutSettings, io: Arc<IoThread>) -> Self {
        let (orphans, orphaned) = tokio::sync::mpsc::unbounded_channel();
        let hold_batcher = Batcher::new(
            HoldBatches {
                pool: pool.clone(),
                hold_ttl: TimeDelta::from_std(settings.hold_ttl).unwrap_or(TimeDelta::MAX),
                orphans,
            },
            settings.hold_batch_lanes,
            hold_batcher::MAX_BATCH,
            io.clone(),
        );
        let order_batcher = Batcher::new(
            OrderBatches {
                pool: pool.clone(),
                payment_ttl: TimeDelta::from_std(settings.payment_ttl).unwrap_or(TimeDelta::MAX),
            },
            settings.hold_batch_lanes,
            order_batcher::MAX_BATCH,
            io.clone(),
        );
        let payment_batcher = Batcher::new(
            PaymentBatches { pool: pool.clone() },
            settings.hold_batch_lanes,
            payment_batcher::MAX_BATCH,
            io.clone(),
        );
        let release_batcher = Batcher::new(
            ReleaseBatches { pool: pool.clone() },
            settings.hold_batch_lanes,
            release_batcher::MAX_BATCH,
            io.clone(),
        );
        let stock_folder = StockFolder::new(pool.clone(), io);
        Checkout {
            pool,
            settings,
            hold_batcher,
            order_batcher,
            payment_batcher,
            release_batcher,
            stock_folder,
            availability: Arc::new(AvailabilityHub::default()),
            waitlist: waitlist::WaitlistHub::default(),
            session: new_session(),
            orphaned: std::sync::Mutex::new(Some(orphaned)),
        }
    }

    /// Hands a committed stock state (from the change feed) to the watchers.
    pub fn publish_stock(&self, snapshot: StockSnapshot) {
        self.availability.publish(snapshot);
    }

    /// Ends every WatchAvailability and JoinWaitlist stream and refuses new ones, taking
    /// this process's waiters out of line: for shutdown, before the change feed stops.
    pub async fn close_streams(&self) {
        self.availability.close();
        self.close_waitlist().await;
    }

    /// What the change feed heard: a product's state goes to the watchers; a waitlist
    /// change to the local waiters of that product (read on a task of its own).
    pub fn on_feed_event(self: &Arc<Self>, event: FeedEvent) {
        match event {
            FeedEvent::Stock(snapshot) => self.publish_stock(snapshot),
            FeedEvent::Waitlist(product) => {
                let checkout = self.clone();
                tokio::spawn(async move { checkout.refresh_waiters(product).await });
            }
        }
    }

    /// Releases, until `stopping`, every hold granted to a caller that went away before its
    /// answer (its deadline passed, it cancelled): nobody will ever use it. Runs once per
    /// process; a second call returns at once.
    pub async fn release_orphaned_holds(&self, stopping: tokio_util::sync::CancellationToken) {
        let taken = self
            .orphaned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some(mut orphaned) = taken else {
            return;
        };
        loop {
            let hold_id = tokio::select! {
                _ = stopping.cancelled() => return,
                next = orphaned.recv() => match next {
                    Some(hold_id) => hold_id,
                    None => return,
                },
            };
            if let Err(error) = self.release_hold(hold_id).await {
                tracing::warn!(%error, %hold_id, "releasing an orphaned hold failed; it expires with its TTL");
            }
        }
    }

    /// The advisory-lock key the change feed holds for this process.
    pub fn session(&self) -> i64 {
        self.session
    }

    /// The JoinWaitlist streams this process serves, to look inside.
    pub fn waitlist(&self) -> &waitlist::WaitlistHub {
        &self.waitlist
    }

    /// The fan-out behind WatchAvailability, to look inside (open streams, wake groups).
    pub fn availability(&self) -> &Arc<AvailabilityHub> {
        &self.availability
    }

    /// After a transaction that recorded a counter movement (a settlement, a release)
    /// committed: folds its product's movements, so the caller's next read sees the counters
    /// it changed. A failed fold is only logged: the movement is committed and the reaper's
    /// next sweep folds it.
    async fn fold_after_commit(&self, products: &[Uuid]) {
        let folds = products.iter().map(|&product_id| async move {
            if let Err(error) = self.stock_folder.fold(product_id).await {
                tracing::warn!(%error, %product_id, "stock fold failed; the reaper's sweep retries it");
            }
        });
        // Asked for together, the folds share one statement.
        futures::future::join_all(folds).await;
    }

    /// Folds counter movements nobody folded (a failed fold, a process that died after its
    /// settlement committed); returns how many.
    pub async fn fold_stranded_movements(&self) -> Result<i64, DomainError> {
        self.stock_folder.sweep().await
    }

    /// Borrows a pooled connection; an unreachable database is `Unavailable`.
    async fn conn(&self) -> Result<PooledConnection, DomainError> {
        Ok(crate::db::connection(&self.pool).await?)
    }
}

/// A fresh random key for this process's advisory lock (see [`Checkout::session`]).
fn new_session() -> i64 {
    getrandom::u64().unwrap_or_else(|_| uuid::Uuid::now_v7().as_u64_pair().1) as i64
}

/// Whether an attempt that ended in `outcome` should run again: it lost a deadlock or a
/// concurrent duplicate key, and has attempts left (of [`CONFLICT_RETRIES`]).
fn retryable<T>(outcome: &Result<T, DomainError>, attempt: usize) -> bool {
    match outcome {
        Err(DomainError::Conflict(reason)) if attempt < CONFLICT_RETRIES => {
            tracing::debug!(attempt, %reason, "retrying after transaction conflict");
            true
        }
        _ => false,
    }
}

/// Longest client request id or idempotency key, in bytes.
const MAX_KEY_BYTES: usize = 255;

/// Checks a key (a client request id, an idempotency key): at most [`MAX_KEY_BYTES`], and
/// no control characters (PostgreSQL cannot store NUL, and keys are echoed in answers and
/// logs); `field` names it in the error.
fn check_key(field: &'static str, value: &str) -> Result<(), DomainError> {
    check_text(field, value, MAX_KEY_BYTES)?;
    if value.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// Checks a free-text field: at most `max` bytes, and no NUL (which PostgreSQL cannot
/// store); `field` names it in the error.
fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), DomainError> {
    if value.len() > max {
        return Err(DomainError::invalid(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if value.contains('\0') {
        return Err(DomainError::invalid(
            field,
            "must not contain NUL characters",
        ));
    }
    Ok(())
}
