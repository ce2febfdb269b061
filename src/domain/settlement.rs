//! The one way an order settles: a locked pending order becomes `Paid` (its units move on
//! to `sold`) or `Cancelled` (they go back, for a failed payment, a missed payment
//! deadline or a buyer who gave up), recorded as a counter movement in the same
//! transaction, folded into the product's counters after the commit. Used by the payment
//! webhook, by CreateOrder (payments that arrived for the hold before the order), by
//! CancelOrder and by the reaper (orders past their payment deadline).

use diesel_async::AsyncPgConnection;
use uuid::Uuid;

use super::DomainError;
use crate::db::models::{CancelReason, EventOutcome, Hold, Order, OrderStatus, PaymentResult};
use crate::db::movements::{NewMovement, insert_movements};
use crate::db::orders::{cancel_orders as cancel_order_rows, settle_order};
use crate::db::payments::{lock_deferred_events, resolve_event};
use crate::db::products::{StockChange, find_product};

/// Settles a locked pending order by a payment: success sells its units, failure gives
/// them back (`PaymentFailed`).
pub(super) async fn settle(
    conn: &mut AsyncPgConnection,
    order: &Order,
    result: PaymentResult,
    failure_reason: &str,
) -> Result<Order, DomainError> {
    let (status, sold, reason, cancel_reason) = match result {
        PaymentResult::Success => (OrderStatus::Paid, order.qty, "", None),
        PaymentResult::Failure => (
            OrderStatus::Cancelled,
            0,
            failure_reason,
            Some(CancelReason::PaymentFailed),
        ),
    };
    let settled = settle_order(conn, order.id, status, reason, cancel_reason).await?;
    insert_movements(conn, &[movement(order, sold)]).await?;
    Ok(settled)
}

/// Cancels locked pending orders for `reason`, in one statement however many: their units
/// go back. Returns them as they are now.
pub(super) async fn cancel_orders(
    conn: &mut AsyncPgConnection,
    orders: &[Order],
    reason: CancelReason,
) -> Result<Vec<Order>, DomainError> {
    if orders.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = orders.iter().map(|order| order.id).collect();
    let cancelled = cancel_order_rows(conn, &ids, reason).await?;
    let movements: Vec<NewMovement> = orders.iter().map(|order| movement(order, 0)).collect();
    insert_movements(conn, &movements).await?;
    Ok(cancelled)
}

/// The movement that ends an order's reservation, `sold` of its units on to `sold`.
fn movement(order: &Order, sold: i64) -> NewMovement {
    NewMovement {
        hold_id: order.hold_id,
        product_id: order.product_id,
        change: StockChange {
            reserved: -order.qty,
            sold,
            ..StockChange::default()
        },
    }
}

/// Applies the payments deferred on a hold to the order it just became, in arrival order:
/// the first settles it, later ones find it final (see [`final_order_outcome`]). Returns
/// the order as it ends up, and its product if it settled (to fold after the commit).
pub(super) async fn apply_deferred_events(
    conn: &mut AsyncPgConnection,
    mut order: Order,
) -> Result<(Order, Option<Uuid>), DomainError> {
    let mut settled_product = None;
    for event in lock_deferred_events(conn, order.hold_id).await? {
        let outcome = if order.status.is_final() {
            final_order_outcome(event.result, order.status)
        } else {
            order = settle(conn, &order, event.result, &event.failure_reason).await?;
            settled_product = Some(order.product_id);
            EventOutcome::Applied
        };
        resolve_event(conn, &event, outcome, Some(order.id), Some(order.status)).await?;
    }
    Ok((order, settled_product))
}

/// What a payment does to an order that is already final: a success for a cancelled order
/// took money for no goods (a refund is owed); anything else is recorded and ignored (a
/// failure changes nothing final, and a paid order was paid through another event).
pub(super) fn final_order_outcome(result: PaymentResult, status: OrderStatus) -> EventOutcome {
    match (result, status) {
        (PaymentResult::Success, OrderStatus::Cancelled) => EventOutcome::RefundRequired,
        _ => EventOutcome::Ignored,
    }
}

/// What the order for `hold` costs: its units at the product's price.
pub(super) async fn order_total_cents(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
) -> Result<i64, DomainError> {
    let product = find_product(conn, hold.product_id)
        .await?
        .ok_or_else(|| DomainError::not_found("product", hold.product_id))?;
    product
        .price_cents
        .checked_mul(hold.qty)
        .ok_or_else(|| DomainError::internal(format!("total of hold {} overflows", hold.id)))
}
