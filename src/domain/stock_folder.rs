//! Coalesced settlements. A settling order records its counter movement in its own
//! transaction without locking its product's row (`db::movements`); after the commit, the
//! caller asks the folder to fold its product's movements into the counters and waits. Folds
//! asked for while one is in flight are gathered into the next, so a crowd of payments on
//! one product shares a row lock and a commit per batch instead of queueing for one each.
//! When a fold fails (or the process dies first), the movement stays pending and the
//! reaper's next sweep folds it; nothing settled is lost, and until then the product's
//! `available` only understates the truth.

use std::sync::Arc;

use tokio::sync::oneshot;
use uuid::Uuid;

use super::DomainError;
use super::coalesce::Lanes;
use crate::db::DbPool;
use crate::db::io_thread::IoThread;
use crate::db::movements::{fold_movements, products_with_movements};

/// Largest number of fold requests one fold statement answers.
const MAX_BATCH: usize = 512;

/// Products one sweep folds at most.
const SWEEP_PRODUCTS: i64 = 256;

/// A caller waiting for its product's movements to be folded.
struct PendingFold {
    /// The product whose movements must be folded.
    product_id: Uuid,
    /// Where the outcome goes once the fold committed.
    reply: oneshot::Sender<Result<(), DomainError>>,
}

/// Gathers fold requests into shared fold statements.
pub struct StockFolder {
    /// Connections the folds run on.
    pool: DbPool,
    /// One queue: a fold is short and answers many settlements, so one at a time suffices.
    queue: Lanes<PendingFold>,
    /// Where the folds run.
    io: Arc<IoThread>,
}

impl StockFolder {
    /// A folder whose folds run on `io`.
    pub fn new(pool: DbPool, io: Arc<IoThread>) -> Arc<Self> {
        Arc::new(StockFolder {
            pool,
            queue: Lanes::new(1, MAX_BATCH),
            io,
        })
    }

    /// Folds every movement of `product_id` committed before the call; returns once a fold
    /// covering them committed.
    pub async fn fold(self: &Arc<Self>, product_id: Uuid) -> Result<(), DomainError> {
        let (reply, answer) = oneshot::channel();
        if self.queue.push(0, PendingFold { product_id, reply }) {
            let folder = self.clone();
            self.io
                .handle()
                .spawn(async move { folder.queue.drain(0, |batch| folder.run_batch(batch)).await });
        }
        answer
            .await
            .map_err(|_| DomainError::internal("stock fold ended without an answer"))?
    }

    /// Folds the pending movements of up to [`SWEEP_PRODUCTS`] products, whoever left
    /// them (a fold that failed, a process that died); returns how many it folded.
    pub async fn sweep(&self) -> Result<i64, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
        let product_ids = products_with_movements(&mut conn, SWEEP_PRODUCTS).await?;
        if product_ids.is_empty() {
            return Ok(0);
        }
        Ok(fold_movements(&mut conn, &product_ids).await?)
    }

    /// Runs one fold for a batch of requests and answers each.
    async fn run_batch(&self, batch: Vec<PendingFold>) {
        let mut product_ids: Vec<Uuid> = batch.iter().map(|pending| pending.product_id).collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        let outcome = self.fold_now(&product_ids).await;
        tracing::debug!(
            requests = batch.len(),
            products = product_ids.len(),
            ?outcome,
            "stock fold"
        );
        for pending in batch {
            // A caller that went away does not need its answer.
            let _ = pending.reply.send(outcome.clone().map(|_| ()));
        }
    }

    /// One fold statement over `product_ids`.
    async fn fold_now(&self, product_ids: &[Uuid]) -> Result<i64, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
        Ok(fold_movements(&mut conn, product_ids).await?)
    }
}
