//! The change feed: every committed stock change, as PostgreSQL announces it.
//!
//! The statement triggers `products_notify_inserts` and `products_notify_updates` (function
//! `products_notify_changes`, see `migrations/schema.sql`) send the new state of every
//! product a statement inserted or whose stock it changed, with `NOTIFY` on
//! [`CHANGES_CHANNEL`], inside the changing transaction: heard only if it commits. The
//! payload, parsed here by [`ChangeNotification`]:
//!
//! ```json
//! {"changed_at": "<the transaction's time>",
//!  "products": [{"product_id": "...", "stock_total": 10, "reserved": 2, "sold": 1, "version": 7}, ...]}
//! ```
//!
//! with at most 16 products per notification (NOTIFY payloads must stay under 8000 bytes).
//! A product changed twice in one transaction may be announced twice with one state;
//! consumers keep a state only if its version is newer.
//!
//! [`run_change_feed`] keeps one dedicated connection listening (pinged now and then, so a
//! silently dead one is noticed), reconnects with backoff when it is lost, and after every
//! (re)connection re-reads every product, so nothing committed while it was away is missed.
//!
//! The same connection hears the waitlist: a product's id on [`WAITLIST_CHANNEL`] whenever
//! its line changes; and it holds this process's advisory lock (its session key), which
//! tells the database that the process, and so its waiters, still live.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use diesel::result::Error as DieselError;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};
use futures::StreamExt;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::models::Product;
use super::products::all_products;
use super::{LISTENER_APPLICATION_NAME, connect, ping};
use crate::config::DatabaseConfig;

/// The channel `products_notify_changes` notifies on.
pub const CHANGES_CHANNEL: &str = "flashsale_product_changes";
/// The channel the waitlist functions notify on, with a product's id.
pub const WAITLIST_CHANNEL: &str = "flashsale_waitlist";

/// What the feed hears.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FeedEvent {
    /// A product's committed state.
    Stock(StockSnapshot),
    /// The waitlist of a product changed; `None`: of any product (after a reconnection,
    /// when changes may have been missed).
    Waitlist(Option<Uuid>),
}
/// How often the listener checks that its (otherwise silent) connection is alive.
const PING_INTERVAL: Duration = Duration::from_secs(10);
/// How long the listener waits to connect or for a ping answer before reconnecting.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// How the listener paces its reconnection attempts: 100 ms, doubling up to 5 s.
const RECONNECT_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(5))
    .without_max_times();

/// One state of a product's stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockSnapshot {
    pub product_id: Uuid,
    pub stock_total: i64,
    pub reserved: i64,
    pub sold: i64,
    /// The product's version at this state: states of one product are ordered by it.
    pub version: i64,
    /// When the change that produced this state committed.
    pub changed_at: DateTime<Utc>,
    /// Most units per buyer; 0: no limit.
    pub max_per_buyer: i64,
    /// The sale window's bounds, if set.
    pub sale_starts_at: Option<DateTime<Utc>>,
    pub sale_ends_at: Option<DateTime<Utc>>,
    /// Buyers in its waitlist.
    pub waiting: i64,
}

impl StockSnapshot {
    /// Units nobody holds or bought.
    pub fn available(&self) -> i64 {
        self.stock_total - self.reserved - self.sold
    }
}

impl From<&Product> for StockSnapshot {
    fn from(product: &Product) -> Self {
        StockSnapshot {
            product_id: product.id,
            stock_total: product.stock_total,
            reserved: product.reserved,
            sold: product.sold,
            version: product.version,
            changed_at: product.updated_at,
            max_per_buyer: product.max_per_buyer,
            sale_starts_at: product.sale_starts_at,
            sale_ends_at: product.sale_ends_at,
            waiting: product.waiting,
        }
    }
}

/// One notification on [`CHANGES_CHANNEL`]: the states of products one statement changed.
#[derive(Debug, Deserialize)]
struct ChangeNotification {
    /// The changing transaction's time: every state in it is as of that change.
    changed_at: DateTime<Utc>,
    /// Up to 16 products' states.
    products: Vec<ChangedProduct>,
}

/// One product's part of a [`ChangeNotification`].
#[derive(Debug, Deserialize)]
struct ChangedProduct {
    product_id: Uuid,
    stock_total: i64,
    reserved: i64,
    sold: i64,
    version: i64,
    max_per_buyer: i64,
    sale_starts_at: Option<DateTime<Utc>>,
    sale_ends_at: Option<DateTime<Utc>>,
    waiting: i64,
}

impl ChangeNotification {
    /// The states it announces.
    fn into_snapshots(self) -> impl Iterator<Item = StockSnapshot> {
        let changed_at = self.changed_at;
        self.products.into_iter().map(move |product| StockSnapshot {
            product_id: product.product_id,
            stock_total: product.stock_total,
            reserved: product.reserved,
            sold: product.sold,
            version: product.version,
            changed_at,
            max_per_buyer: product.max_per_buyer,
            sale_starts_at: product.sale_starts_at,
            sale_ends_at: product.sale_ends_at,
            waiting: product.waiting,
        })
    }
}

/// Why a listening session ended.
#[derive(Debug, thiserror::Error)]
enum FeedLost {
    #[error("cannot connect: {0}")]
    Connect(#[source] diesel::ConnectionError),
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("query failed: {0}")]
    Query(#[from] DieselError),
    #[error("ping timed out")]
    PingTimeout,
    #[error("notification stream ended")]
    StreamEnded,
}

/// Hands every committed stock state and waitlist change to `deliver` until `shutdown`:
/// the current state of every product after each (re)connection, then each announced
/// change. Runs on a connection of its own (`application_name` `flashsale-listener`), which
/// holds the advisory lock `session` while connected.
pub async fn run_change_feed(
    database: DatabaseConfig,
    session: i64,
    shutdown: CancellationToken,
    mut deliver: impl FnMut(FeedEvent),
) {
    let database = database.with_application_name(LISTENER_APPLICATION_NAME);
    let mut backoff = RECONNECT_BACKOFF.build();
    while !shutdown.is_cancelled() {
        let mut connected = false;
        match listen_once(&database, session, &shutdown, &mut deliver, &mut connected).await {
            Ok(()) => break,
            Err(error) => tracing::warn!(%error, "change feed lost its connection; reconnecting"),
        }
        if connected {
            backoff = RECONNECT_BACKOFF.build();
        }
        let pause = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    tracing::info!("change feed stopped");
}

/// One listening session: `Ok` on shutdown, `Err` when the connection fails; `connected`
/// tells whether it got as far as listening.
async fn listen_once(
    database: &DatabaseConfig,
    session: i64,
    shutdown: &CancellationToken,
    deliver: &mut impl FnMut(FeedEvent),
    connected: &mut bool,
) -> Result<(), FeedLost> {
    let mut conn = tokio::time::timeout(PING_TIMEOUT, connect(database))
        .await
        .map_err(|_| FeedLost::ConnectTimeout)?
        .map_err(FeedLost::Connect)?;
    // A previous connection's backend may hold the lock still (it has not noticed its
    // client left): then it keeps telling that this process lives, which it does.
    diesel::sql_query("SELECT pg_try_advisory_lock($1)")
        .bind::<diesel::sql_types::BigInt, _>(session)
        .execute(&mut conn)
        .await?;
    conn.batch_execute(&format!(
        "LISTEN {CHANGES_CHANNEL}; LISTEN {WAITLIST_CHANNEL}"
    ))
    .await?;
    // Listening first, then reading: a change committed in between is heard, not lost.
    for product in all_products(&mut conn).await? {
        deliver(FeedEvent::Stock(StockSnapshot::from(&product)));
    }
    deliver(FeedEvent::Waitlist(None));
    tracing::info!("change feed connected");
    *connected = true;
    let mut ping_due = tokio::time::interval(PING_INTERVAL);
    ping_due.reset();
    loop {
        if !relay_until_ping(&mut conn, shutdown, deliver, &mut ping_due).await? {
            return Ok(());
        }
        tokio::time::timeout(PING_TIMEOUT, ping(&mut conn))
            .await
            .map_err(|_| FeedLost::PingTimeout)??;
    }
}

/// Relays notifications until the next ping is due (`true`) or shutdown (`false`).
async fn relay_until_ping(
    conn: &mut AsyncPgConnection,
    shutdown: &CancellationToken,
    deliver: &mut impl FnMut(FeedEvent),
    ping_due: &mut tokio::time::Interval,
) -> Result<bool, FeedLost> {
    // The stream only borrows the connection's queue: dropping it for a ping loses nothing.
    let mut notifications = std::pin::pin!(conn.notifications_stream());
    loop {
        let notification = tokio::select! {
            _ = shutdown.cancelled() => return Ok(false),
            _ = ping_due.tick() => return Ok(true),
            next = notifications.next() => next,
        };
        let notification = match notification {
            Some(Ok(notification)) => notification,
            Some(Err(error)) => return Err(error.into()),
            None => return Err(FeedLost::StreamEnded),
        };
        let payload = notification.payload;
        if notification.channel == WAITLIST_CHANNEL {
            match payload.parse::<Uuid>() {
                Ok(product_id) => deliver(FeedEvent::Waitlist(Some(product_id))),
                Err(error) => tracing::error!(%error, %payload, "unreadable waitlist change"),
            }
            continue;
        }
        match serde_json::from_str::<ChangeNotification>(&payload) {
            Ok(notification) => notification
                .into_snapshots()
                .for_each(|snapshot| deliver(FeedEvent::Stock(snapshot))),
            Err(error) => tracing::error!(%error, %payload, "unreadable stock changes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notification_carries_its_change_time_to_every_product_state() {
        let payload = r#"{"changed_at":"2026-01-02T03:04:05.123456+00:00","products":[
            {"product_id":"00000000-0000-0000-0000-000000000001","stock_total":10,"reserved":2,"sold":1,"version":7,
             "max_per_buyer":2,"sale_starts_at":"2026-01-02T04:00:00+00:00","sale_ends_at":null,"waiting":3},
            {"product_id":"00000000-0000-0000-0000-000000000002","stock_total":5,"reserved":0,"sold":5,"version":3,
             "max_per_buyer":0,"sale_starts_at":null,"sale_ends_at":null,"waiting":0}]}"#;
        let states: Vec<StockSnapshot> = serde_json::from_str::<ChangeNotification>(payload)
            .unwrap()
            .into_snapshots()
            .collect();
        assert_eq!(states.len(), 2);
        assert_eq!(states[0].available(), 7);
        assert_eq!(states[1].version, 3);
        assert_eq!(states[0].max_per_buyer, 2);
        assert!(states[0].sale_starts_at.is_some() && states[0].sale_ends_at.is_none());
        assert!(
            states
                .iter()
                .all(|state| state.changed_at == states[0].changed_at)
        );
    }
}
