//! Coalesced orders. Concurrent CreateOrder calls in one process are gathered into one
//! statement per batch, the database function `create_orders`, run as its own transaction:
//! the batch's holds are locked once (in id order), every active hold with nothing waiting
//! on it becomes a pending order, and everything commits once, in one round trip. Each
//! caller gets its own answer, only after the commit.
//!
//! What the batch leaves alone (a hold that is already an order, past its TTL, released,
//! expired, unknown, or with payments waiting on it) goes back to its caller, which handles
//! it alone on the one-order path ([`super::Checkout::create_order`]): the rare cases keep
//! one implementation.

use std::collections::HashMap;

use chrono::TimeDelta;
use uuid::Uuid;

use super::DomainError;
use super::coalesce::{BatchWork, Batched, rows_or_all_left_alone};
use crate::db::DbPool;
use crate::db::models::Order;
use crate::db::orders::create_orders;

/// Largest number of calls one transaction carries.
pub const MAX_BATCH: usize = 512;

/// CreateOrder batches: a hold id per request.
pub struct OrderBatches {
    /// Connections the batches run on.
    pub pool: DbPool,
    /// How long an order waits for its payment.
    pub payment_ttl: TimeDelta,
}

impl BatchWork for OrderBatches {
    type Request = Uuid;
    type Answer = Result<Batched<Order>, DomainError>;
    const SIZE_METRIC: &'static str = "flashsale_order_batch_size";

    fn lane_key(hold_id: &Uuid) -> u128 {
        hold_id.as_u128()
    }

    /// A batch the database refused as a whole leaves every hold to its caller (see
    /// [`rows_or_all_left_alone`]).
    async fn run(&self, hold_ids: Vec<Uuid>) -> Vec<Self::Answer> {
        let made =
            match rows_or_all_left_alone(self.create(&hold_ids).await, "order", hold_ids.len()) {
                Ok(rows) => rows,
                Err(error) => return hold_ids.iter().map(|_| Err(error.clone())).collect(),
            };
        tracing::debug!(size = hold_ids.len(), created = made.len(), "order batch");
        let made: HashMap<Uuid, Order> = made
            .into_iter()
            .map(|order| (order.hold_id, order))
            .collect();
        hold_ids
            .iter()
            .map(|hold_id| {
                Ok(match made.get(hold_id) {
                    Some(order) => Batched::Done(order.clone()),
                    None => Batched::LeftAlone,
                })
            })
            .collect()
    }
}

impl OrderBatches {
    /// Creates the orders of a batch in one statement (one round trip, one commit).
    async fn create(&self, hold_ids: &[Uuid]) -> Result<Vec<Order>, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
        let order_ids: Vec<Uuid> = hold_ids.iter().map(|_| Uuid::now_v7()).collect();
        Ok(create_orders(&mut conn, hold_ids, &order_ids, self.payment_ttl).await?)
    }
}
