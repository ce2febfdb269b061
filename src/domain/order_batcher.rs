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
use std::sync::Arc;

use chrono::TimeDelta;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::DomainError;
use super::coalesce::Lanes;
use crate::db::DbPool;
use crate::db::io_thread::IoThread;
use crate::db::models::Order;
use crate::db::orders::create_orders;

/// Largest number of calls one transaction carries.
const MAX_BATCH: usize = 512;

/// What the batch did for one call.
pub enum Batched {
    /// The hold became this order (committed).
    Created(Order),
    /// The batch left the hold alone: the caller handles it on its own.
    LeftAlone,
}

/// A caller waiting for its order.
struct PendingOrder {
    /// The hold to turn into an order.
    hold_id: Uuid,
    /// Where its answer goes once the batch committed.
    reply: oneshot::Sender<Result<Batched, DomainError>>,
}

/// Gathers concurrent CreateOrder calls into shared transactions.
pub struct OrderBatcher {
    /// Connections the batches run on.
    pool: DbPool,
    /// How long an order waits for its payment.
    payment_ttl: TimeDelta,
    /// Independent queues; a hold always maps to the same lane.
    queue: Lanes<PendingOrder>,
    /// Where the batches run.
    io: Arc<IoThread>,
}

impl OrderBatcher {
    /// A batcher with `lanes` queues (at least one) whose batches run on `io`.
    pub fn new(pool: DbPool, payment_ttl: TimeDelta, lanes: usize, io: Arc<IoThread>) -> Arc<Self> {
        Arc::new(OrderBatcher {
            pool,
            payment_ttl,
            queue: Lanes::new(lanes, MAX_BATCH),
            io,
        })
    }

    /// Queues a CreateOrder for `hold_id` and waits for what its batch did.
    pub async fn submit(self: &Arc<Self>, hold_id: Uuid) -> Result<Batched, DomainError> {
        let lane = self.queue.lane_for(hold_id.as_u128());
        let (reply, answer) = oneshot::channel();
        if self.queue.push(lane, PendingOrder { hold_id, reply }) {
            let batcher = self.clone();
            self.io.handle().spawn(async move {
                batcher
                    .queue
                    .drain(lane, |batch| batcher.run_batch(batch))
                    .await
            });
        }
        answer
            .await
            .map_err(|_| DomainError::internal("order batch ended without an answer"))?
    }

    /// Runs one batch and answers every caller in it; callers that went away while they
    /// queued are left out before anything is sent. A batch the database refused as a whole
    /// (for a reason other than being unreachable or a lost race) leaves every hold to its
    /// caller, so each gets its own answer.
    async fn run_batch(&self, mut batch: Vec<PendingOrder>) {
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let hold_ids: Vec<Uuid> = batch.iter().map(|pending| pending.hold_id).collect();
        let made = match self.create(&hold_ids).await {
            Ok(made) => made,
            Err(error @ (DomainError::Unavailable(_) | DomainError::Conflict(_))) => {
                for pending in batch {
                    let _ = pending.reply.send(Err(error.clone()));
                }
                return;
            }
            Err(error) => {
                tracing::warn!(%error, size = batch.len(), "order batch refused; its holds go one by one");
                Vec::new()
            }
        };
        tracing::debug!(size = batch.len(), created = made.len(), "order batch");
        let made: HashMap<Uuid, Order> = made
            .into_iter()
            .map(|order| (order.hold_id, order))
            .collect();
        for pending in batch {
            let answer = match made.get(&pending.hold_id) {
                Some(order) => Batched::Created(order.clone()),
                None => Batched::LeftAlone,
            };
            let _ = pending.reply.send(Ok(answer));
        }
    }

    /// Creates the orders of a batch in one statement (one round trip, one commit).
    async fn create(&self, hold_ids: &[Uuid]) -> Result<Vec<Order>, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
        let order_ids: Vec<Uuid> = hold_ids.iter().map(|_| Uuid::now_v7()).collect();
        Ok(create_orders(&mut conn, hold_ids, &order_ids, self.payment_ttl).await?)
    }
}
