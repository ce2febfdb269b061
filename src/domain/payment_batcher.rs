//! Coalesced payments. Concurrent webhook deliveries aimed at orders are gathered into one
//! statement per batch, the database function `apply_payments`, run as its own
//! transaction: the batch's orders are locked once (in id order), each new delivery for a
//! pending order before its deadline pays or cancels it, its event is stored, and
//! everything commits once, in one round trip. Each caller gets its own answer, only after
//! the commit.
//!
//! What the batch leaves alone (a key seen before, an order already final or overdue, an
//! amount that disagrees, an unknown order, a second delivery for an order or a key in the
//! same batch) goes back to its caller, which handles it alone on the one-delivery path
//! ([`super::Checkout::handle_payment_webhook`]).

use std::collections::{HashMap, HashSet};

use uuid::Uuid;

use super::DomainError;
use super::coalesce::{BatchWork, Batched, rows_or_all_left_alone};
use super::payments::{PaymentTarget, PaymentWebhook};
use crate::db::DbPool;
use crate::db::models::Order;
use crate::db::payments::{OrderPayment, apply_payments};

/// Largest number of deliveries one transaction carries.
pub const MAX_BATCH: usize = 512;

/// Webhook batches: a validated delivery aimed at an order per request.
pub struct PaymentBatches {
    /// Connections the batches run on.
    pub pool: DbPool,
}

impl BatchWork for PaymentBatches {
    type Request = PaymentWebhook;
    type Answer = Result<Batched<Order>, DomainError>;
    const SIZE_METRIC: &'static str = "flashsale_payment_batch_size";

    fn lane_key(webhook: &PaymentWebhook) -> u128 {
        match webhook.target {
            PaymentTarget::Order(id) | PaymentTarget::Hold(id) => id.as_u128(),
        }
    }

    /// Sends the first delivery of each order and of each key; the rest, and every
    /// delivery of a batch the database refused as a whole (see
    /// [`rows_or_all_left_alone`]), are left to their callers.
    async fn run(&self, webhooks: Vec<PaymentWebhook>) -> Vec<Self::Answer> {
        let sent = first_of_each_order_and_key(&webhooks);
        let payments: Vec<OrderPayment<'_>> = webhooks
            .iter()
            .zip(&sent)
            .filter_map(|(webhook, sent)| sent.then(|| order_payment(webhook)).flatten())
            .collect();
        let settled =
            match rows_or_all_left_alone(self.apply(&payments).await, "payment", webhooks.len()) {
                Ok(rows) => rows,
                Err(error) => return webhooks.iter().map(|_| Err(error.clone())).collect(),
            };
        tracing::debug!(
            size = webhooks.len(),
            settled = settled.len(),
            "payment batch"
        );
        let mut settled: HashMap<Uuid, Order> =
            settled.into_iter().map(|order| (order.id, order)).collect();
        webhooks
            .iter()
            .zip(sent)
            .map(|(webhook, sent)| {
                let order = match (sent, webhook.target) {
                    (true, PaymentTarget::Order(id)) => settled.remove(&id),
                    _ => None,
                };
                Ok(order.map_or(Batched::LeftAlone, Batched::Done))
            })
            .collect()
    }
}

impl PaymentBatches {
    /// Applies a batch's deliveries in one statement (one round trip, one commit).
    async fn apply(&self, payments: &[OrderPayment<'_>]) -> Result<Vec<Order>, DomainError> {
        if payments.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = crate::db::connection(&self.pool).await?;
        Ok(apply_payments(&mut conn, payments).await?)
    }
}

/// Whether each delivery is the first of the batch for its order and for its key.
fn first_of_each_order_and_key(webhooks: &[PaymentWebhook]) -> Vec<bool> {
    let mut orders = HashSet::new();
    let mut keys = HashSet::new();
    webhooks
        .iter()
        .map(|webhook| {
            let key = (webhook.caller.name(), webhook.idempotency_key.as_str());
            let order_is_new = match webhook.target {
                PaymentTarget::Order(id) => orders.insert(id),
                PaymentTarget::Hold(_) => false,
            };
            // Both sets learn the delivery even when it is not sent, so a later repeat of
            // either is not sent either.
            let key_is_new = keys.insert(key);
            order_is_new && key_is_new
        })
        .collect()
}

/// The delivery as `apply_payments` takes it; `None` for one aimed at a hold.
fn order_payment(webhook: &PaymentWebhook) -> Option<OrderPayment<'_>> {
    match webhook.target {
        PaymentTarget::Order(order_id) => Some(OrderPayment {
            caller: webhook.caller.name(),
            idempotency_key: &webhook.idempotency_key,
            order_id,
            result: webhook.result,
            failure_reason: &webhook.failure_reason,
            amount_cents: webhook.amount_cents,
        }),
        PaymentTarget::Hold(_) => None,
    }
}
