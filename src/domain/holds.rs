//! Holds: reserve units for a while, give them back on release.

use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::{Checkout, DomainError, check_text_len};
use crate::db::holds as queries;
use crate::db::models::{Hold, HoldStatus};
use crate::db::payments::ignore_deferred_events;
use crate::db::products::{StockChange, apply_stock_change, find_product};

/// Name of the unique index that makes one client request id one hold.
const CLIENT_REQUEST_ID_INDEX: &str = "holds_client_request_id_key";

/// A hold to create.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub product_id: Uuid,
    pub qty: i64,
    /// The caller's retry key: the same key returns the same hold.
    pub client_request_id: Option<String>,
}

impl Checkout {
    /// Reserves `qty` units of a product for the hold TTL.
    pub async fn create_hold(&self, new: NewHold) -> Result<Hold, DomainError> {
        self.validate_new_hold(&new)?;
        let mut conn = self.conn().await?;
        if let Some(key) = &new.client_request_id
            && let Some(existing) = queries::find_hold_by_client_request_id(&mut conn, key).await?
        {
            return same_hold_request(existing, &new);
        }
        let created = conn
            .transaction(async |conn| self.reserve_and_insert(conn, &new).await)
            .await;
        match (created, &new.client_request_id) {
            // A concurrent call with the same client request id won the race: answer with its hold.
            (Err(DomainError::UniqueViolation { constraint }), Some(key))
                if constraint == CLIENT_REQUEST_ID_INDEX =>
            {
                let existing = queries::find_hold_by_client_request_id(&mut conn, key)
                    .await?
                    .ok_or_else(|| DomainError::Conflict("client request id race".into()))?;
                same_hold_request(existing, &new)
            }
            (created, _) => created,
        }
    }

    /// Takes the units off the product (row lock) and writes the hold, in the caller's transaction.
    async fn reserve_and_insert(
        &self,
        conn: &mut AsyncPgConnection,
        new: &NewHold,
    ) -> Result<Hold, DomainError> {
        let change = StockChange {
            reserved: new.qty,
            ..StockChange::default()
        };
        if apply_stock_change(conn, new.product_id, change)
            .await?
            .is_none()
        {
            return Err(stock_shortfall(conn, new.product_id, new.qty).await);
        }
        let key = new.client_request_id.as_deref();
        Ok(
            queries::insert_hold(conn, new.product_id, new.qty, key, self.settings.hold_ttl)
                .await?,
        )
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
        conn.transaction(async |conn| {
            let (hold, _) = queries::lock_hold(conn, id)
                .await?
                .ok_or_else(|| DomainError::not_found("hold", id))?;
            match hold.status {
                HoldStatus::Active => close_hold(conn, &hold, HoldStatus::Released).await,
                HoldStatus::Released | HoldStatus::Expired => Ok(hold),
                HoldStatus::Converted => Err(DomainError::HoldConverted { hold_id: id }),
            }
        })
        .await
    }
}

/// Ends a locked active hold without an order (`Released` or `Expired`): its units go back
/// to the product and payments deferred on it are closed as ignored.
pub(super) async fn close_hold(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
    status: HoldStatus,
) -> Result<Hold, DomainError> {
    let change = StockChange {
        reserved: -hold.qty,
        ..StockChange::default()
    };
    apply_stock_change(conn, hold.product_id, change)
        .await?
        .ok_or_else(|| {
            DomainError::Internal(format!(
                "product {} vanished under hold {}",
                hold.product_id, hold.id
            ))
        })?;
    ignore_deferred_events(conn, &[hold.id]).await?;
    Ok(queries::set_hold_status(conn, hold.id, status).await?)
}

/// Why a reservation matched no row: the product is missing, or short of stock.
async fn stock_shortfall(
    conn: &mut AsyncPgConnection,
    product_id: Uuid,
    requested: i64,
) -> DomainError {
    match find_product(conn, product_id).await {
        Ok(Some(product)) => DomainError::InsufficientStock {
            product_id,
            requested,
            available: product.available(),
        },
        Ok(None) => DomainError::not_found("product", product_id),
        Err(error) => error.into(),
    }
}

/// A retried CreateHold gets the original hold; the same key for another request is refused.
fn same_hold_request(existing: Hold, new: &NewHold) -> Result<Hold, DomainError> {
    if existing.product_id != new.product_id || existing.qty != new.qty {
        return Err(DomainError::IdempotencyKeyReused {
            field: "client_request_id",
            key: existing.client_request_id.unwrap_or_default(),
        });
    }
    Ok(existing)
}
