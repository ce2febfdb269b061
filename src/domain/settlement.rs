//! The one way an order settles: a locked pending order becomes `Paid` (its units move on
//! to `sold`) or `Cancelled` (they go back), recorded as a counter movement in the same
//! transaction, folded into the product's counters after the commit. Used by the payment
//! webhook (a payment for an order) and by CreateOrder (payments that arrived for the hold
//! before the order).

use diesel_async::AsyncPgConnection;
use uuid::Uuid;

use super::DomainError;
use crate::db::models::{EventOutcome, Hold, Order, OrderStatus, PaymentResult};
use crate::db::movements::{NewMovement, insert_movements};
use crate::db::orders::settle_order;
use crate::db::payments::{lock_deferred_events, resolve_event};
use crate::db::products::{StockChange, find_product};

/// Settles a locked pending order: success sells its units, failure gives them back.
pub(super) async fn settle(
    conn: &mut AsyncPgConnection,
    order: &Order,
    result: PaymentResult,
    failure_reason: &str,
) -> Result<Order, DomainError> {
    let (status, sold, reason) = match result {
        PaymentResult::Success => (OrderStatus::Paid, order.qty, ""),
        PaymentResult::Failure => (OrderStatus::Cancelled, 0, failure_reason),
    };
    let settled = settle_order(conn, order.id, status, reason).await?;
    let movement = NewMovement {
        hold_id: order.hold_id,
        product_id: order.product_id,
        change: StockChange {
            reserved: -order.qty,
            sold,
            ..StockChange::default()
        },
    };
    insert_movements(conn, &[movement]).await?;
    Ok(settled)
}

/// Applies the payments deferred on a hold to the order it just became: the first settles
/// it, later ones find it final and are ignored. Returns the order as it ends up, and its
/// product if it settled (to fold after the commit).
pub(super) async fn apply_deferred_events(
    conn: &mut AsyncPgConnection,
    mut order: Order,
) -> Result<(Order, Option<Uuid>), DomainError> {
    let mut settled_product = None;
    for event in lock_deferred_events(conn, order.hold_id).await? {
        let outcome = if order.status.is_final() {
            EventOutcome::Ignored
        } else {
            order = settle(conn, &order, event.result, &event.failure_reason).await?;
            settled_product = Some(order.product_id);
            EventOutcome::Applied
        };
        resolve_event(conn, &event, outcome, Some(order.id), Some(order.status)).await?;
    }
    Ok((order, settled_product))
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
