//! Orders: a hold becomes at most one order; payment settles it.

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::holds::close_hold;
use super::payments::apply_deferred_events;
use super::{Checkout, DomainError};
use crate::db::holds::{lock_hold, set_hold_status};
use crate::db::models::{Hold, HoldStatus, Order, OrderStatus, PaymentResult};
use crate::db::movements::insert_movement;
use crate::db::orders as queries;
use crate::db::products::{StockChange, find_product};

impl Checkout {
    /// Turns an active hold into a pending order; calling it again for the same hold returns
    /// the same order. A hold past its TTL is expired on the spot and never becomes an order.
    /// Payments that arrived for the hold before the order are applied right away.
    pub async fn create_order(&self, hold_id: Uuid) -> Result<Order, DomainError> {
        let mut conn = self.conn().await?;
        // The transaction commits an on-the-spot expiry even though the call is refused, so the
        // inner result carries the refusal past the commit, with the product whose units moved.
        let (converted, moved_product): (Result<Order, DomainError>, Option<Uuid>) = conn
            .transaction::<_, DomainError, _>(async |conn| {
                let (hold, past_ttl) = lock_hold(conn, hold_id)
                    .await?
                    .ok_or_else(|| DomainError::not_found("hold", hold_id))?;
                match hold.status {
                    HoldStatus::Converted => Ok((Ok(existing_order(conn, &hold).await?), None)),
                    HoldStatus::Expired => Ok((Err(DomainError::HoldExpired { hold_id }), None)),
                    HoldStatus::Released => Ok((Err(DomainError::HoldReleased { hold_id }), None)),
                    HoldStatus::Active if past_ttl => {
                        close_hold(conn, &hold, HoldStatus::Expired).await?;
                        let expired = Err(DomainError::HoldExpired { hold_id });
                        Ok((expired, Some(hold.product_id)))
                    }
                    HoldStatus::Active => {
                        let (order, moved_product) = convert_hold(conn, &hold).await?;
                        Ok((Ok(order), moved_product))
                    }
                }
            })
            .await?;
        drop(conn);
        self.fold_after_commit(moved_product).await;
        converted
    }

    /// One order by id.
    pub async fn get_order(&self, id: Uuid) -> Result<Order, DomainError> {
        let mut conn = self.conn().await?;
        queries::find_order(&mut conn, id)
            .await?
            .ok_or_else(|| DomainError::not_found("order", id))
    }
}

/// Writes the order for a locked active hold and marks the hold converted; its units stay
/// reserved, now on behalf of the order. Also returns the product to fold when a deferred
/// payment settled the order on the spot.
async fn convert_hold(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
) -> Result<(Order, Option<Uuid>), DomainError> {
    let total_cents = hold_total_cents(conn, hold).await?;
    let order = queries::insert_order(conn, hold, total_cents).await?;
    set_hold_status(conn, hold.id, HoldStatus::Converted).await?;
    apply_deferred_events(conn, order).await
}

/// What the order for `hold` costs: its units at the product's price.
pub(super) async fn hold_total_cents(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
) -> Result<i64, DomainError> {
    let product = find_product(conn, hold.product_id)
        .await?
        .ok_or_else(|| DomainError::not_found("product", hold.product_id))?;
    product
        .price_cents
        .checked_mul(hold.qty)
        .ok_or_else(|| DomainError::Internal(format!("total of hold {} overflows", hold.id)))
}

/// The order a converted hold became.
async fn existing_order(conn: &mut AsyncPgConnection, hold: &Hold) -> Result<Order, DomainError> {
    queries::find_order_by_hold(conn, hold.id)
        .await?
        .ok_or_else(|| DomainError::Internal(format!("converted hold {} has no order", hold.id)))
}

/// A settlement's stock change, to be recorded as a counter movement (no product lock) and
/// folded into the product's counters after the commit.
#[must_use = "the settlement's units move only when the change is recorded"]
pub(super) struct PendingStock {
    /// The hold of the order whose units move.
    hold_id: Uuid,
    /// Its product.
    product_id: Uuid,
    /// Paid: reserved to sold; failed: reserved back to available.
    change: StockChange,
}

/// Settles a locked pending order: success will sell its units, failure give them back.
/// Writes the order now; the returned stock change must be recorded before commit.
pub(super) async fn settle(
    conn: &mut AsyncPgConnection,
    order: &Order,
    result: PaymentResult,
    failure_reason: &str,
) -> Result<(Order, PendingStock), DomainError> {
    let (status, change, reason) = match result {
        PaymentResult::Success => (
            OrderStatus::Paid,
            StockChange {
                reserved: -order.qty,
                sold: order.qty,
                ..StockChange::default()
            },
            "",
        ),
        PaymentResult::Failure => (
            OrderStatus::Cancelled,
            StockChange {
                reserved: -order.qty,
                ..StockChange::default()
            },
            failure_reason,
        ),
    };
    let settled = queries::settle_order(conn, order.id, status, reason).await?;
    let pending = PendingStock {
        hold_id: order.hold_id,
        product_id: order.product_id,
        change,
    };
    Ok((settled, pending))
}

/// Records a settled order's counter movement without locking its product's row; returns
/// the product, whose movements the caller folds after the commit.
pub(super) async fn record_pending_stock(
    conn: &mut AsyncPgConnection,
    pending: PendingStock,
) -> Result<Uuid, DomainError> {
    insert_movement(conn, pending.hold_id, pending.product_id, pending.change).await?;
    Ok(pending.product_id)
}
