//! Coalesced releases. Concurrent ReleaseHold calls in one process are gathered into one
//! statement per batch, the database function `release_holds`, run as its own transaction:
//! the batch's holds are locked once (in id order), every active hold with no payment
//! waiting on it is released with its counter movement, and everything commits once, in
//! one round trip. Each caller gets its own answer, only after the commit.
//!
//! What the batch leaves alone (a hold already released, expired or converted, one with
//! payments waiting to be closed, an unknown id) goes back to its caller, which handles it
//! alone on the one-release path ([`super::Checkout::release_hold`]).

use std::collections::HashMap;

use uuid::Uuid;

use super::DomainError;
use super::coalesce::{BatchWork, Batched, rows_or_all_left_alone};
use crate::db::DbPool;
use crate::db::holds::release_holds;
use crate::db::models::Hold;

/// Largest number of calls one transaction carries.
pub const MAX_BATCH: usize = 512;

/// ReleaseHold batches: a hold id per request.
pub struct ReleaseBatches {
    /// Connections the batches run on.
    pub pool: DbPool,
}

impl BatchWork for ReleaseBatches {
    type Request = Uuid;
    type Answer = Result<Batched<Hold>, DomainError>;
    const SIZE_METRIC: &'static str = "flashsale_release_batch_size";

    fn lane_key(hold_id: &Uuid) -> u128 {
        hold_id.as_u128()
    }

    /// A batch the database refused as a whole leaves every hold to its caller (see
    /// [`rows_or_all_left_alone`]). A hold named twice is released once and both callers
    /// get it.
    async fn run(&self, hold_ids: Vec<Uuid>) -> Vec<Self::Answer> {
        let released = match rows_or_all_left_alone(
            self.release(&hold_ids).await,
            "release",
            hold_ids.len(),
        ) {
            Ok(rows) => rows,
            Err(error) => return hold_ids.iter().map(|_| Err(error.clone())).collect(),
        };
        tracing::debug!(
            size = hold_ids.len(),
            released = released.len(),
            "release batch"
        );
        let released: HashMap<Uuid, Hold> =
            released.into_iter().map(|hold| (hold.id, hold)).collect();
        hold_ids
            .iter()
            .map(|hold_id| {
                Ok(match released.get(hold_id) {
                    Some(hold) => Batched::Done(hold.clone()),
                    None => Batched::LeftAlone,
                })
            })
            .collect()
    }
}

impl ReleaseBatches {
    /// Releases the holds of a batch in one statement (one round trip, one commit).
    async fn release(&self, hold_ids: &[Uuid]) -> Result<Vec<Hold>, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
        Ok(release_holds(&mut conn, hold_ids).await?)
    }
}
