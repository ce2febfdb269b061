//! The reaper: expires holds nobody converted in time ([`Checkout::expire_due_holds`], which
//! ends them the way every hold ends) and cancels orders nobody paid by their deadline
//! ([`Checkout::cancel_overdue_orders`]), in batches, exactly once, safely alongside other
//! server processes doing the same; folds counter movements nobody folded (a failed fold,
//! a process that died after its commit; see `stock_folder`); and deletes webhook keys
//! past their retention.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::{Checkout, DomainError};

/// How the reaper paces itself.
#[derive(Debug, Clone, Copy)]
pub struct ReaperSettings {
    /// Pause between sweeps when there is nothing (more) to expire.
    pub interval: Duration,
    /// Holds expired, orders cancelled or webhook keys deleted per transaction.
    pub batch_size: i64,
    /// How long webhook idempotency keys are kept.
    pub webhook_key_retention: Duration,
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
            _ = ticker.tick() => sweep(&checkout, &settings, &shutdown).await,
        }
    }
    tracing::info!("reaper stopped");
}

/// Expires due holds and cancels overdue orders, batch after batch, folds stranded counter
/// movements, and deletes webhook keys past their retention.
async fn sweep(checkout: &Checkout, settings: &ReaperSettings, shutdown: &CancellationToken) {
    let batch = settings.batch_size;
    in_batches("expire holds", batch, shutdown, || {
        checkout.expire_due_holds(batch)
    })
    .await;
    in_batches("cancel overdue orders", batch, shutdown, || {
        checkout.cancel_overdue_orders(batch)
    })
    .await;
    match checkout.fold_stranded_movements().await {
        Ok(0) => {}
        Ok(folded) => tracing::info!(folded, "reaper folded stranded stock movements"),
        Err(error) => tracing::warn!(%error, "folding stranded stock movements failed"),
    }
    match checkout.end_waiters_of_ended_sales().await {
        Ok(0) => {}
        Ok(products) => tracing::info!(products, "reaper ended the waitlists of ended sales"),
        Err(error) => tracing::warn!(%error, "ending the waitlists of ended sales failed"),
    }
    match checkout.reaper_lag().await {
        Ok(lag) => crate::metrics::reaper_lag(lag),
        Err(error) => tracing::debug!(%error, "reading the reaper's lag failed"),
    }
    // A safety net for waitlist changes the change feed missed.
    checkout.refresh_waiters(None).await;
    let retention = settings.webhook_key_retention;
    in_batches("delete expired webhook keys", batch, shutdown, || {
        checkout.delete_expired_webhook_keys(retention, batch)
    })
    .await;
}

/// Runs `step` (one transaction handling up to `batch_size` rows) until a batch comes back
/// short, fails (logged; the next tick retries) or shutdown begins.
async fn in_batches<F, Fut>(what: &str, batch_size: i64, shutdown: &CancellationToken, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<usize, DomainError>>,
{
    while !shutdown.is_cancelled() {
        match step().await {
            Ok(done) => {
                if done > 0 {
                    tracing::debug!(done, "reaper: {what}");
                }
                if (done as i64) < batch_size {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reaper failed to {what}");
                return;
            }
        }
    }
}
