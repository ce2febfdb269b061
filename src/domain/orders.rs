//! Orders: a hold becomes at most one order; payment settles it (see [`super::settlement`])
//! before its payment deadline, or it is cancelled: by the buyer (CancelOrder) or, past the
//! deadline, by the reaper.

use chrono::TimeDelta;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::coalesce::Batched;
use super::holds::end_holds;
use super::settlement::{apply_deferred_events, cancel_orders, order_total_cents};
use super::{Checkout, DomainError};
use crate::db::holds::{lock_hold, set_holds_status};
use crate::db::models::{CancelReason, Hold, HoldStatus, Order, OrderStatus};
use crate::db::movements::fold_movements;
use crate::db::orders as queries;

impl Checkout {
    /// Turns an active hold into a pending order; calling it again for the same hold returns
    /// the same order. A hold past its TTL is expired on the spot and never becomes an order.
    /// Payments that arrived for the hold before the order are applied right away.
    /// Concurrent calls share a transaction (see [`super::order_batcher`]); what their
    /// batch leaves alone is handled here, one hold per transaction.
    pub async fn create_order(&self, hold_id: Uuid) -> Result<Order, DomainError> {
        let batched = self
            .order_batcher
            .submit(hold_id)
            .await
            .unwrap_or_else(|| Err(DomainError::internal("order batch ended without an answer")))?;
        match batched {
            Batched::Done(order) => {
                tracing::info!(order_id = %order.id, hold_id = %order.hold_id, status = ?order.status, "order created");
                Ok(order)
            }
            Batched::LeftAlone => self.create_order_alone(hold_id).await,
        }
    }

    /// CreateOrder for one hold, in a transaction of its own: every case, the rare ones
    /// included (an order made before, an expiry on the spot, payments waiting on the hold).
    async fn create_order_alone(&self, hold_id: Uuid) -> Result<Order, DomainError> {
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
                        end_holds(conn, std::slice::from_ref(&hold), HoldStatus::Expired).await?;
                        let expired = Err(DomainError::HoldExpired { hold_id });
                        Ok((expired, Some(hold.product_id)))
                    }
                    HoldStatus::Active => {
                        let (order, moved_product) =
                            convert_hold(conn, &hold, self.payment_ttl()).await?;
                        Ok((Ok(order), moved_product))
                    }
                }
            })
            .await?;
        drop(conn);
        if let Ok(order) = &converted {
            tracing::info!(order_id = %order.id, hold_id = %order.hold_id, status = ?order.status, "order created");
            // Payments that waited on the hold may have settled it at once.
            if moved_product.is_some() && order.status.is_final() {
                crate::metrics::orders_final(order.status.into(), 1);
            }
        }
        self.fold_after_commit(moved_product.as_slice()).await;
        converted
    }

    /// One order by id.
    pub async fn get_order(&self, id: Uuid) -> Result<Order, DomainError> {
        let mut conn = self.conn().await?;
        queries::find_order(&mut conn, id)
            .await?
            .ok_or_else(|| DomainError::not_found("order", id))
    }

    /// Cancels a pending order for a buyer who gives up (`BuyerCancelled`; past its payment
    /// deadline, `PaymentTimeout`), and its units go back. A cancelled order is returned as it
    /// is; a paid one is refused.
    pub async fn cancel_order(&self, id: Uuid) -> Result<Order, DomainError> {
        let mut conn = self.conn().await?;
        let (order, moved) = conn
            .transaction(async |conn| {
                let (order, past_due) = queries::lock_order(conn, id)
                    .await?
                    .ok_or_else(|| DomainError::not_found("order", id))?;
                match order.status {
                    OrderStatus::Cancelled => Ok((order, None)),
                    OrderStatus::Paid => Err(DomainError::OrderPaid { order_id: id }),
                    OrderStatus::Pending => {
                        let reason = match past_due {
                            true => CancelReason::PaymentTimeout,
                            false => CancelReason::BuyerCancelled,
                        };
                        let mut cancelled = cancel_orders(conn, &[order], reason).await?;
                        let order = cancelled
                            .pop()
                            .ok_or_else(|| DomainError::internal("a cancelled order vanished"))?;
                        let product = order.product_id;
                        Ok((order, Some(product)))
                    }
                }
            })
            .await?;
        drop(conn);
        if moved.is_some() {
            tracing::info!(order_id = %order.id, reason = ?order.cancel_reason, "order cancelled");
            crate::metrics::orders_final("cancelled", 1);
        }
        self.fold_after_commit(moved.as_slice()).await;
        Ok(order)
    }

    /// Cancels up to `batch_size` pending orders past their payment deadline
    /// (`PaymentTimeout`) in one transaction and returns how many. Orders locked elsewhere
    /// (a webhook, CancelOrder, another reaper) are skipped and left to their owner. Like the
    /// hold sweep, it folds its products' movements in the same transaction.
    pub async fn cancel_overdue_orders(&self, batch_size: i64) -> Result<usize, DomainError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let overdue = queries::lock_overdue_orders(conn, batch_size).await?;
            let cancelled = cancel_orders(conn, &overdue, CancelReason::PaymentTimeout).await?;
            let mut products: Vec<Uuid> = cancelled.iter().map(|order| order.product_id).collect();
            products.sort_unstable();
            products.dedup();
            if !products.is_empty() {
                fold_movements(conn, &products).await?;
            }
            Ok(cancelled)
        })
        .await
        .map(|cancelled: Vec<Order>| {
            for order in &cancelled {
                tracing::info!(order_id = %order.id, reason = "payment_timeout", "order cancelled");
            }
            crate::metrics::orders_final("cancelled", cancelled.len());
            cancelled.len()
        })
    }

    /// The payment TTL as the database takes it.
    fn payment_ttl(&self) -> TimeDelta {
        TimeDelta::from_std(self.settings.payment_ttl).unwrap_or(TimeDelta::MAX)
    }
}

/// Writes the order for a locked active hold and marks the hold converted; its units stay
/// reserved, now on behalf of the order. Also returns the product to fold when a deferred
/// payment settled the order on the spot.
async fn convert_hold(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
    payment_ttl: TimeDelta,
) -> Result<(Order, Option<Uuid>), DomainError> {
    let total_cents = order_total_cents(conn, hold).await?;
    let order = queries::insert_order(conn, hold, total_cents, payment_ttl).await?;
    set_holds_status(conn, &[hold.id], HoldStatus::Converted).await?;
    apply_deferred_events(conn, order).await
}

/// The order a converted hold became.
async fn existing_order(conn: &mut AsyncPgConnection, hold: &Hold) -> Result<Order, DomainError> {
    queries::find_order_by_hold(conn, hold.id)
        .await?
        .ok_or_else(|| DomainError::internal(format!("converted hold {} has no order", hold.id)))
}
