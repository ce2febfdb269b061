//! Payment webhooks: one idempotency key, one effect; payments that overtake their order
//! wait on the hold and apply when it converts; a success that cannot be applied is a
//! refund owed, said in the answer and kept until an operator marks it refunded.

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::coalesce::Batched;
use super::settlement::{cancel_orders, final_order_outcome, order_total_cents, settle};
use super::{Caller, Checkout, DomainError, check_key, check_text, retryable};
use crate::db::holds::lock_hold;
use crate::db::models::{
    CancelReason, EventOutcome, HoldStatus, Order, OrderStatus, PaymentEvent, PaymentResult,
};
use crate::db::orders::{find_order_by_hold, lock_order};
use crate::db::payments::{NewPaymentEvent, find_event, insert_event};

/// What a payment webhook is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentTarget {
    /// The order being paid.
    Order(Uuid),
    /// The hold, when payment started before the order existed.
    Hold(Uuid),
}

/// A payment provider's webhook, as forwarded by the payment adapter.
#[derive(Debug, Clone)]
pub struct PaymentWebhook {
    /// Who delivers it (the payment adapter's token); its keys are its own.
    pub caller: Caller,
    /// The provider's event id: one key per caller, one effect.
    pub idempotency_key: String,
    pub target: PaymentTarget,
    pub result: PaymentResult,
    pub failure_reason: String,
    /// What the provider charged: required for a success (it must equal the order's total),
    /// 0 when not reported for a failure.
    pub amount_cents: i64,
}

/// What a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookOutcome {
    /// This delivery changed the order.
    Applied,
    /// The key was seen before: nothing changed.
    Duplicate,
    /// Stored until the hold becomes an order.
    Deferred,
    /// Recorded, but the order was already final (or the hold will never be an order).
    Ignored,
    /// A success that cannot be applied (its order was cancelled, its hold ended): the
    /// money must be refunded. Every redelivery answers the same.
    RefundRequired,
}

/// The answer to a webhook delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookReceipt {
    pub idempotency_key: String,
    /// The order the event concerns; `None` while deferred or when its hold died.
    pub order_id: Option<Uuid>,
    pub order_status: Option<OrderStatus>,
    pub outcome: WebhookOutcome,
}

impl Checkout {
    /// Handles one webhook delivery. Unknown targets are `NotFound` and store nothing, so
    /// the provider's retry can succeed later.
    pub async fn handle_payment_webhook(
        &self,
        webhook: PaymentWebhook,
    ) -> Result<WebhookReceipt, DomainError> {
        validate_webhook(&webhook)?;
        if let PaymentTarget::Order(_) = webhook.target {
            let batched = self
                .payment_batcher
                .submit(webhook.clone())
                .await
                .unwrap_or_else(|| {
                    Err(DomainError::internal(
                        "payment batch ended without an answer",
                    ))
                })?;
            if let Batched::Done(order) = batched {
                return Ok(self.applied_in_batch(&webhook, order).await);
            }
        }
        self.handle_payment_webhook_alone(webhook).await
    }

    /// The answer to a delivery its batch applied, once the units it moved are folded.
    async fn applied_in_batch(&self, webhook: &PaymentWebhook, order: Order) -> WebhookReceipt {
        let receipt = WebhookReceipt {
            idempotency_key: webhook.idempotency_key.clone(),
            order_id: Some(order.id),
            order_status: Some(order.status),
            outcome: WebhookOutcome::Applied,
        };
        log_receipt(&receipt);
        crate::metrics::orders_final(order.status.into(), 1);
        self.fold_after_commit(&[order.product_id]).await;
        receipt
    }

    /// One delivery in a transaction of its own: every case, the rare ones included (a key
    /// seen before, an order final or overdue, a payment before its order).
    async fn handle_payment_webhook_alone(
        &self,
        webhook: PaymentWebhook,
    ) -> Result<WebhookReceipt, DomainError> {
        let mut conn = self.conn().await?;
        let mut attempt = 1;
        let (receipt, settled_product) = loop {
            let outcome = conn
                .transaction(async |conn| process_webhook(conn, &webhook).await)
                .await;
            if !retryable(&outcome, attempt) {
                break outcome?;
            }
            attempt += 1;
        };
        drop(conn);
        log_receipt(&receipt);
        // A payment that changed the order, or one found past its deadline, ended it.
        if let (Some(status), Some(_)) = (receipt.order_status, settled_product)
            && status.is_final()
        {
            crate::metrics::orders_final(status.into(), 1);
        }
        self.fold_after_commit(settled_product.as_slice()).await;
        Ok(receipt)
    }
}

/// Logs a delivery's answer and counts it.
fn log_receipt(receipt: &WebhookReceipt) {
    tracing::info!(
        idempotency_key = %receipt.idempotency_key,
        outcome = ?receipt.outcome,
        order_id = ?receipt.order_id,
        order_status = ?receipt.order_status,
        "webhook handled"
    );
    crate::metrics::webhook(receipt.outcome.name());
}

/// Checks the fields a webhook must carry before touching the database.
fn validate_webhook(webhook: &PaymentWebhook) -> Result<(), DomainError> {
    if webhook.idempotency_key.is_empty() {
        return Err(DomainError::invalid("idempotency_key", "must not be empty"));
    }
    check_key("idempotency_key", &webhook.idempotency_key)?;
    check_text("failure_reason", &webhook.failure_reason, 1000)?;
    if webhook.amount_cents < 0 {
        return Err(DomainError::invalid("amount_cents", "must not be negative"));
    }
    if webhook.result == PaymentResult::Success && webhook.amount_cents == 0 {
        return Err(DomainError::invalid(
            "amount_cents",
            "a successful payment must report the amount charged (the order's total)",
        ));
    }
    Ok(())
}

/// One delivery, in one transaction: a known key answers from the stored event; a new key
/// locks its target, decides, applies and is stored. Also returns the product whose counter
/// movement it recorded, to fold after the commit.
async fn process_webhook(
    conn: &mut AsyncPgConnection,
    webhook: &PaymentWebhook,
) -> Result<(WebhookReceipt, Option<Uuid>), DomainError> {
    if let Some(event) = find_event(conn, webhook.caller.name(), &webhook.idempotency_key).await? {
        return Ok((duplicate_receipt(event, webhook)?, None));
    }
    let Decision {
        outcome,
        order,
        settled_product,
    } = match webhook.target {
        PaymentTarget::Order(order_id) => {
            let (order, past_due) = lock_order(conn, order_id)
                .await?
                .ok_or_else(|| DomainError::not_found("order", order_id))?;
            apply_to_order(conn, webhook, order, past_due).await?
        }
        PaymentTarget::Hold(hold_id) => apply_to_hold(conn, webhook, hold_id).await?,
    };
    let (order_id, order_status) = (
        order.as_ref().map(|o| o.id),
        order.as_ref().map(|o| o.status),
    );
    let stored = insert_event(conn, &new_event(webhook, outcome, order_id, order_status)).await?;
    if !stored {
        // A concurrent delivery of the same key committed first: roll back and answer as a duplicate.
        return Err(DomainError::conflict("idempotency key stored concurrently"));
    }
    let receipt = WebhookReceipt {
        idempotency_key: webhook.idempotency_key.clone(),
        order_id,
        order_status,
        outcome: outcome.into(),
    };
    Ok((receipt, settled_product))
}

/// What a new delivery does.
struct Decision {
    /// How the event is stored and answered.
    outcome: EventOutcome,
    /// The order it concerns, as it ends up; `None` while deferred or when its hold died.
    order: Option<Order>,
    /// The product whose units it moved (to fold after the commit), if it settled the order.
    settled_product: Option<Uuid>,
}

impl Decision {
    /// A delivery that moves no units.
    fn without_stock(outcome: EventOutcome, order: Option<Order>) -> Self {
        Decision {
            outcome,
            order,
            settled_product: None,
        }
    }
}

/// Settles a locked order unless it is already final. A pending order past its payment
/// deadline is cancelled on the spot first (the deadline holds whether or not the reaper
/// got to it), so a success then is a refund owed.
async fn apply_to_order(
    conn: &mut AsyncPgConnection,
    webhook: &PaymentWebhook,
    order: Order,
    past_due: bool,
) -> Result<Decision, DomainError> {
    check_amount(webhook.amount_cents, order.total_cents)?;
    if order.status == OrderStatus::Pending && past_due {
        let mut cancelled = cancel_orders(conn, &[order], CancelReason::PaymentTimeout).await?;
        let order = cancelled
            .pop()
            .ok_or_else(|| DomainError::internal("a cancelled order vanished"))?;
        let outcome = final_order_outcome(webhook.result, order.status);
        return Ok(Decision {
            outcome,
            settled_product: Some(order.product_id),
            order: Some(order),
        });
    }
    if order.status.is_final() {
        let outcome = final_order_outcome(webhook.result, order.status);
        return Ok(Decision::without_stock(outcome, Some(order)));
    }
    let settled = settle(conn, &order, webhook.result, &webhook.failure_reason).await?;
    Ok(Decision {
        outcome: EventOutcome::Applied,
        settled_product: Some(settled.product_id),
        order: Some(settled),
    })
}

/// A webhook aimed at a hold: applies to its order if it has one, waits for it if it may
/// still get one; if it never will, a success is a refund owed and a failure is ignored.
async fn apply_to_hold(
    conn: &mut AsyncPgConnection,
    webhook: &PaymentWebhook,
    hold_id: Uuid,
) -> Result<Decision, DomainError> {
    let (hold, past_ttl) = lock_hold(conn, hold_id)
        .await?
        .ok_or_else(|| DomainError::not_found("hold", hold_id))?;
    match hold.status {
        HoldStatus::Converted => {
            let order_id = find_order_by_hold(conn, hold_id)
                .await?
                .ok_or_else(|| {
                    DomainError::internal(format!("converted hold {hold_id} has no order"))
                })?
                .id;
            let (order, past_due) = lock_order(conn, order_id)
                .await?
                .ok_or_else(|| DomainError::internal(format!("order {order_id} vanished")))?;
            apply_to_order(conn, webhook, order, past_due).await
        }
        HoldStatus::Active if !past_ttl => {
            check_amount(webhook.amount_cents, order_total_cents(conn, &hold).await?)?;
            Ok(Decision::without_stock(EventOutcome::Deferred, None))
        }
        HoldStatus::Active | HoldStatus::Expired | HoldStatus::Released => {
            let outcome = match webhook.result {
                PaymentResult::Success => EventOutcome::RefundRequired,
                PaymentResult::Failure => EventOutcome::Ignored,
            };
            Ok(Decision::without_stock(outcome, None))
        }
    }
}

/// A reported amount (always there for a success, see [`validate_webhook`]) must equal
/// what the order costs.
fn check_amount(reported: i64, expected: i64) -> Result<(), DomainError> {
    if reported != 0 && reported != expected {
        return Err(DomainError::AmountMismatch { expected, reported });
    }
    Ok(())
}

/// The answer for a key seen before: the same answer if the payload matches, a refusal if
/// not. A payment still waiting on its hold answers `Deferred`, a refund owed
/// `RefundRequired`; anything else was settled by the first delivery: `Duplicate`.
fn duplicate_receipt(
    event: PaymentEvent,
    webhook: &PaymentWebhook,
) -> Result<WebhookReceipt, DomainError> {
    let (target_order_id, target_hold_id) = target_ids(webhook.target);
    let same_payload = event.target_order_id == target_order_id
        && event.target_hold_id == target_hold_id
        && event.result == webhook.result
        && event.failure_reason == webhook.failure_reason
        && event.amount_cents == webhook.amount_cents;
    if !same_payload {
        return Err(DomainError::IdempotencyKeyReused {
            field: "idempotency_key",
            key: event.idempotency_key,
        });
    }
    let outcome = match event.outcome {
        EventOutcome::Deferred => WebhookOutcome::Deferred,
        EventOutcome::RefundRequired => WebhookOutcome::RefundRequired,
        EventOutcome::Applied | EventOutcome::Ignored => WebhookOutcome::Duplicate,
    };
    Ok(WebhookReceipt {
        idempotency_key: event.idempotency_key,
        order_id: event.order_id,
        order_status: event.order_status,
        outcome,
    })
}

/// The stored form of a delivery.
fn new_event(
    webhook: &PaymentWebhook,
    outcome: EventOutcome,
    order_id: Option<Uuid>,
    order_status: Option<OrderStatus>,
) -> NewPaymentEvent<'_> {
    let (target_order_id, target_hold_id) = target_ids(webhook.target);
    NewPaymentEvent {
        caller: webhook.caller.name(),
        idempotency_key: &webhook.idempotency_key,
        target_order_id,
        target_hold_id,
        result: webhook.result,
        failure_reason: &webhook.failure_reason,
        amount_cents: webhook.amount_cents,
        outcome,
        order_id,
        order_status,
        processed_at: (outcome != EventOutcome::Deferred).then(chrono::Utc::now),
    }
}

/// The target split into the two stored columns.
fn target_ids(target: PaymentTarget) -> (Option<Uuid>, Option<Uuid>) {
    match target {
        PaymentTarget::Order(id) => (Some(id), None),
        PaymentTarget::Hold(id) => (None, Some(id)),
    }
}

impl WebhookOutcome {
    /// Its name in metrics: the proto enum's value without its prefix, lowercase.
    pub fn name(self) -> &'static str {
        match self {
            WebhookOutcome::Applied => "applied",
            WebhookOutcome::Duplicate => "duplicate",
            WebhookOutcome::Deferred => "deferred",
            WebhookOutcome::Ignored => "ignored",
            WebhookOutcome::RefundRequired => "refund_required",
        }
    }
}

impl From<EventOutcome> for WebhookOutcome {
    fn from(outcome: EventOutcome) -> Self {
        match outcome {
            EventOutcome::Applied => WebhookOutcome::Applied,
            EventOutcome::Deferred => WebhookOutcome::Deferred,
            EventOutcome::Ignored => WebhookOutcome::Ignored,
            EventOutcome::RefundRequired => WebhookOutcome::RefundRequired,
        }
    }
}
