//! Holds: reserve units for a while, give them back on release.

use chrono::TimeDelta;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::coalesce::Batched;
use super::{Caller, Checkout, DomainError, check_key};
use crate::db::holds as queries;
use crate::db::models::{Hold, HoldStatus};
use crate::db::movements::{NewMovement, fold_movements, insert_movements};
use crate::db::payments::close_deferred_events;
use crate::db::products::StockChange;

/// A hold to create.
#[derive(Debug, Clone)]
pub struct NewHold {
    pub product_id: Uuid,
    pub qty: i64,
    /// Who asks; its keys are its own.
    pub caller: Caller,
    /// The caller's retry key: the same key from the same caller returns the same hold.
    pub client_request_id: Option<String>,
    /// The buyer (opaque to the server), counted against the product's max_per_buyer.
    pub buyer_id: Option<String>,
}

impl Checkout {
    /// Reserves `qty` units of a product for the hold TTL. Concurrent calls share
    /// transactions (see [`super::hold_batcher`]).
    pub async fn create_hold(&self, new: NewHold) -> Result<Hold, DomainError> {
        self.validate_new_hold(&new)?;
        match self.hold_batcher.submit(new).await {
            Some(answer) => answer.result,
            None => Err(DomainError::internal("hold batch ended without an answer")),
        }
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
            check_key("client_request_id", key)?;
        }
        if let Some(buyer) = &new.buyer_id {
            check_key("buyer_id", buyer)?;
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
    /// nothing and answers with it; a converted hold is refused. Concurrent calls share a
    /// transaction (see [`super::release_batcher`]); what their batch leaves alone is
    /// handled here, one hold per transaction.
    pub async fn release_hold(&self, id: Uuid) -> Result<Hold, DomainError> {
        let batched = self.release_batcher.submit(id).await.unwrap_or_else(|| {
            Err(DomainError::internal(
                "release batch ended without an answer",
            ))
        })?;
        match batched {
            Batched::Done(hold) => {
                log_release(&hold);
                self.fold_after_commit(&[hold.product_id]).await;
                Ok(hold)
            }
            Batched::LeftAlone => self.release_hold_alone(id).await,
        }
    }

    /// ReleaseHold for one hold, in a transaction of its own: every case, the rare ones
    /// included (a hold already ended or converted, payments waiting on it to close).
    async fn release_hold_alone(&self, id: Uuid) -> Result<Hold, DomainError> {
        let mut conn = self.conn().await?;
        let (hold, moved) = conn
            .transaction(async |conn| {
                let (hold, _) = queries::lock_hold(conn, id)
                    .await?
                    .ok_or_else(|| DomainError::not_found("hold", id))?;
                match hold.status {
                    HoldStatus::Active => {
                        let mut released = end_holds(conn, &[hold], HoldStatus::Released).await?;
                        let released = released.pop().ok_or_else(|| {
                            DomainError::internal(format!("released hold {id} vanished"))
                        })?;
                        let product = released.product_id;
                        Ok((released, Some(product)))
                    }
                    HoldStatus::Released | HoldStatus::Expired => Ok((hold, None)),
                    HoldStatus::Converted => Err(DomainError::HoldConverted { hold_id: id }),
                }
            })
            .await?;
        drop(conn);
        if moved.is_some() {
            log_release(&hold);
        }
        self.fold_after_commit(moved.as_slice()).await;
        Ok(hold)
    }

    /// Moves an active hold's expiry to now + the hold TTL, but never past the maximum
    /// lifetime after its creation; a hold already at that bound is refused. A hold past its
    /// TTL is expired on the spot (and refused), as by CreateOrder.
    pub async fn extend_hold(&self, id: Uuid) -> Result<Hold, DomainError> {
        let ttl = TimeDelta::from_std(self.settings.hold_ttl).unwrap_or(TimeDelta::MAX);
        let max_lifetime =
            TimeDelta::from_std(self.settings.hold_max_lifetime).unwrap_or(TimeDelta::MAX);
        let mut conn = self.conn().await?;
        // An on-the-spot expiry commits although the call is refused: the refusal rides
        // past the commit inside the result, with the product whose units moved.
        let (extended, moved): (Result<Hold, DomainError>, Option<Uuid>) = conn
            .transaction::<_, DomainError, _>(async |conn| {
                let (hold, past_ttl) = queries::lock_hold(conn, id)
                    .await?
                    .ok_or_else(|| DomainError::not_found("hold", id))?;
                Ok(match hold.status {
                    HoldStatus::Converted => {
                        (Err(DomainError::HoldConverted { hold_id: id }), None)
                    }
                    HoldStatus::Expired => (Err(DomainError::HoldExpired { hold_id: id }), None),
                    HoldStatus::Released => (Err(DomainError::HoldReleased { hold_id: id }), None),
                    HoldStatus::Active if past_ttl => {
                        end_holds(conn, std::slice::from_ref(&hold), HoldStatus::Expired).await?;
                        let product = hold.product_id;
                        (Err(DomainError::HoldExpired { hold_id: id }), Some(product))
                    }
                    HoldStatus::Active if hold.expires_at >= hold.created_at + max_lifetime => {
                        (Err(DomainError::HoldLifetimeExceeded { hold_id: id }), None)
                    }
                    HoldStatus::Active => (
                        Ok(queries::extend_hold(conn, id, ttl, max_lifetime).await?),
                        None,
                    ),
                })
            })
            .await?;
        drop(conn);
        self.fold_after_commit(moved.as_slice()).await;
        extended
    }

    /// The age of the oldest active hold past its expiry (zero when there is none): how far
    /// the reaper is behind.
    pub async fn reaper_lag(&self) -> Result<std::time::Duration, DomainError> {
        let mut conn = self.conn().await?;
        let seconds = queries::oldest_overdue_hold_age(&mut conn).await?;
        Ok(std::time::Duration::from_secs_f64(seconds.max(0.0)))
    }

    /// Expires up to `batch_size` due holds in one transaction and returns how many. Holds
    /// locked elsewhere (a CreateOrder, another reaper) are skipped and left to their owner.
    /// The sweep folds its products' movements in the same transaction: a reader who sees a
    /// hold expired sees its units back.
    pub async fn expire_due_holds(&self, batch_size: i64) -> Result<usize, DomainError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let due = queries::lock_due_holds(conn, batch_size).await?;
            let expired = end_holds(conn, &due, HoldStatus::Expired).await?;
            let mut products: Vec<Uuid> = expired.iter().map(|hold| hold.product_id).collect();
            products.sort_unstable();
            products.dedup();
            if !products.is_empty() {
                fold_movements(conn, &products).await?;
            }
            Ok(expired)
        })
        .await
        .map(|expired: Vec<Hold>| {
            for hold in &expired {
                tracing::debug!(hold_id = %hold.id, product_id = %hold.product_id, "hold expired");
            }
            crate::metrics::holds_expired(expired.len());
            expired.len()
        })
    }
}

/// The one way holds end without an order: locked active holds become `Released` or
/// `Expired`, payments deferred on them are closed (a success as a refund owed, a failure
/// ignored), and their units go back to
/// their products as counter movements (no product lock), which the caller folds after the
/// commit. Returns the holds as they are now.
pub(super) async fn end_holds(
    conn: &mut AsyncPgConnection,
    holds: &[Hold],
    status: HoldStatus,
) -> Result<Vec<Hold>, DomainError> {
    if holds.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = holds.iter().map(|hold| hold.id).collect();
    close_deferred_events(conn, &ids).await?;
    let ended = queries::set_holds_status(conn, &ids, status).await?;
    let movements: Vec<NewMovement> = holds
        .iter()
        .map(|hold| NewMovement {
            hold_id: hold.id,
            product_id: hold.product_id,
            change: StockChange {
                reserved: -hold.qty,
                ..StockChange::default()
            },
        })
        .collect();
    insert_movements(conn, &movements).await?;
    Ok(ended)
}

/// Logs and counts a release that committed.
fn log_release(hold: &Hold) {
    tracing::info!(hold_id = %hold.id, product_id = %hold.product_id, qty = hold.qty, "hold released");
    crate::metrics::hold_released();
}

/// A retried CreateHold gets the original hold; the same key for another request is refused.
pub(super) fn same_hold_request(existing: Hold, new: &NewHold) -> Result<Hold, DomainError> {
    if existing.product_id != new.product_id
        || existing.qty != new.qty
        || existing.buyer_id != new.buyer_id
    {
        return Err(DomainError::IdempotencyKeyReused {
            field: "client_request_id",
            key: existing.client_request_id.unwrap_or_default(),
        });
    }
    Ok(existing)
}
