//! Holds: reserve units for a while, give them back on release.

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::{Checkout, DomainError, check_text_len};
use crate::db::holds as queries;
use crate::db::models::{Hold, HoldStatus};
use crate::db::movements::insert_movement;
use crate::db::payments::ignore_deferred_events;
use crate::db::products::StockChange;

/// A hold to create.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub product_id: Uuid,
    pub qty: i64,
    /// The caller's retry key: the same key returns the same hold.
    pub client_request_id: Option<String>,
}

impl Checkout {
    /// Reserves `qty` units of a product for the hold TTL. Concurrent calls share
    /// transactions (see [`super::hold_batcher`]).
    pub async fn create_hold(&self, new: NewHold) -> Result<Hold, DomainError> {
        self.validate_new_hold(&new)?;
        self.hold_batcher.submit(new).await
    }

    /// Checks qty and the client request id before touching the database.
    fn validate_new_hold(&self, new: &NewHold) -> Result<(), DomainError> {
        let max = self.settings.max_qty_per_hold;
        if !(1..=max).contains(&new.qty) {
            return Err(DomainError::invalid(
                "qty",
                format!("must be between 1 and {max}"),
            ));
        }
        if let Some(key) = &new.client_request_id {
            check_text_len("client_request_id", key, 255)?;
        }
        Ok(())
    }

    /// One hold by id.
    pub async fn get_hold(&self, id: Uuid) -> Result<Hold, DomainError> {
        let mut conn = self.conn().await?;
        queries::find_hold(&mut conn, id)
            .await?
            .ok_or_else(|| DomainError::not_found("hold", id))
    }

    /// Gives an active hold's units back now. Releasing a released or expired hold changes
    /// nothing and answers with it; a converted hold is refused.
    pub async fn release_hold(&self, id: Uuid) -> Result<Hold, DomainError> {
        let mut conn = self.conn().await?;
        let (hold, moved_product) = conn
            .transaction(async |conn| {
                let (hold, _) = queries::lock_hold(conn, id)
                    .await?
                    .ok_or_else(|| DomainError::not_found("hold", id))?;
                match hold.status {
                    HoldStatus::Active => {
                        let released = close_hold(conn, &hold, HoldStatus::Released).await?;
                        Ok((released, Some(hold.product_id)))
                    }
                    HoldStatus::Released | HoldStatus::Expired => Ok((hold, None)),
                    HoldStatus::Converted => Err(DomainError::HoldConverted { hold_id: id }),
                }
            })
            .await?;
        drop(conn);
        self.fold_after_commit(moved_product).await;
        Ok(hold)
    }
}

/// Ends a locked active hold without an order (`Released` or `Expired`): payments deferred
/// on it are closed as ignored and its units go back to the product as a counter movement
/// (no product lock), which the caller folds after the commit.
pub(super) async fn close_hold(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
    status: HoldStatus,
) -> Result<Hold, DomainError> {
    ignore_deferred_events(conn, &[hold.id]).await?;
    let closed = queries::set_hold_status(conn, hold.id, status).await?;
    let change = StockChange {
        reserved: -hold.qty,
        ..StockChange::default()
    };
    insert_movement(conn, hold.id, hold.product_id, change).await?;
    Ok(closed)
}

/// A retried CreateHold gets the original hold; the same key for another request is refused.
pub(super) fn same_hold_request(existing: Hold, new: &NewHold) -> Result<Hold, DomainError> {
    if existing.product_id != new.product_id || existing.qty != new.qty {
        return Err(DomainError::IdempotencyKeyReused {
            field: "client_request_id",
            key: existing.client_request_id.unwrap_or_default(),
        });
    }
    Ok(existing)
}
