//! The reaper: expires holds nobody converted in time, in batches, exactly once, safely
//! alongside other server processes doing the same; and folds settled orders' counter
//! movements nobody folded (see `stock_folder`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use diesel_async::AsyncConnection;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{Checkout, DomainError};
use crate::db::holds::expire_due_holds;
use crate::db::payments::ignore_deferred_events;
use crate::db::products::{StockChange, apply_stock_change};

impl Checkout {
    /// Expires up to `batch_size` due holds in one transaction and returns how many. Holds
    /// locked elsewhere (a CreateOrder, another reaper) are skipped and left to their owner.
    pub async fn expire_due_holds(&self, batch_size: i64) -> Result<usize, DomainError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let expired = expire_due_holds(conn, batch_size).await?;
            let mut units_by_product: BTreeMap<Uuid, i64> = BTreeMap::new();
            for hold in &expired {
                *units_by_product.entry(hold.product_id).or_default() += hold.qty;
            }
            // Products are locked in id order, so two reapers never deadlock each other.
            for (product_id, units) in units_by_product {
                let change = StockChange {
                    reserved: -units,
                    ..StockChange::default()
                };
                apply_stock_change(conn, product_id, change)
                    .await?
                    .ok_or_else(|| {
                        DomainError::Internal(format!(
                            "expiring holds of {product_id} broke its counters"
                        ))
                    })?;
            }
            let ids: Vec<Uuid> = expired.iter().map(|hold| hold.id).collect();
            ignore_deferred_events(conn, &ids).await?;
            Ok(expired.len())
        })
        .await
    }
}

/// How the reaper paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// Pause between sweeps when there is nothing (more) to expire.
    pub interval: Duration,
    /// Holds expired per transaction.
    pub batch_size: i64,
}

/// Sweeps every `interval` until `shutdown` is cancelled; a full batch is followed at once by
/// another. Database errors are logged and retried on the next tick.
pub async fn run_reaper(
    checkout: Arc<Checkout>,
    settings: ReaperSettings,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = ticker.tick() => sweep(&checkout, settings.batch_size, &shutdown).await,
        }
    }
    tracing::info!("reaper stopped");
}

/// Expires batches until one comes back short (or shutdown begins), then folds stranded
/// counter movements.
async fn sweep(checkout: &Checkout, batch_size: i64, shutdown: &CancellationToken) {
    expire_holds(checkout, batch_size, shutdown).await;
    match checkout.fold_stranded_movements().await {
        Ok(0) => {}
        Ok(folded) => tracing::info!(folded, "reaper folded stranded stock movements"),
        Err(error) => tracing::warn!(%error, "folding stranded stock movements failed"),
    }
}

/// Expires batches until one comes back short (or shutdown begins).
async fn expire_holds(checkout: &Checkout, batch_size: i64, shutdown: &CancellationToken) {
    while !shutdown.is_cancelled() {
        match checkout.expire_due_holds(batch_size).await {
            Ok(expired) => {
                if expired > 0 {
                    tracing::debug!(expired, "reaper expired holds");
                }
                if (expired as i64) < batch_size {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reaper sweep failed");
                return;
            }
        }
    }
}
