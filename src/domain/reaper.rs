//! The reaper: expires holds nobody converted in time ([`Checkout::expire_due_holds`], which
//! ends them the way every hold ends), in batches, exactly once, safely alongside other
//! server processes doing the same; and folds counter movements nobody folded (a failed
//! fold, a process that died after its commit; see `stock_folder`).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Checkout;

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
