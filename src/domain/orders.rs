//! Orders: a hold becomes at most one order; payment settles it (see [`super::settlement`]).

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::holds::end_holds;
use super::settlement::{apply_deferred_events, order_total_cents};
use super::{Checkout, DomainError};
use crate::db::holds::{lock_hold, set_holds_status};
use crate::db::models::{Hold, HoldStatus, Order};
use crate::db::orders as queries;

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
                        end_holds(conn, std::slice::from_ref(&hold), HoldStatus::Expired).await?;
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
}

/// Writes the order for a locked active hold and marks the hold converted; its units stay
/// reserved, now on behalf of the order. Also returns the product to fold when a deferred
/// payment settled the order on the spot.
async fn convert_hold(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
) -> Result<(Order, Option<Uuid>), DomainError> {
    let total_cents = order_total_cents(conn, hold).await?;
    let order = queries::insert_order(conn, hold, total_cents).await?;
    set_holds_status(conn, &[hold.id], HoldStatus::Converted).await?;
    apply_deferred_events(conn, order).await
}

/// The order a converted hold became.
async fn existing_order(conn: &mut AsyncPgConnection, hold: &Hold) -> Result<Order, DomainError> {
    queries::find_order_by_hold(conn, hold.id)
        .await?
        .ok_or_else(|| DomainError::internal(format!("converted hold {} has no order", hold.id)))
}
