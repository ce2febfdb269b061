//! Coalescing queues shared by the batched operations (holds, stock folds). Requests queue
//! on a lane; one task at a time drains a lane, batch after batch, each batch taking
//! whatever arrived while the previous one ran. A lone request is a batch of one and waits
//! for nothing; a crowd shares one round trip and one commit per batch.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// One lane's queue.
struct Lane<T> {
    /// Requests that arrived while a batch was in flight.
    pending: Vec<T>,
    /// Whether a task is draining this lane.
    draining: bool,
}

/// Independent queues of requests of type `T`.
pub struct Lanes<T> {
    /// The queues; a caller picks the lane (e.g. by product, so a product's batches never
    /// overlap).
    lanes: Vec<Mutex<Lane<T>>>,
    /// Largest number of requests one batch carries.
    max_batch: usize,
}

impl<T> Lanes<T> {
    /// `count` lanes (at least one) whose batches carry at most `max_batch` requests.
    pub fn new(count: usize, max_batch: usize) -> Self {
        let lane = || {
            Mutex::new(Lane {
                pending: Vec::new(),
                draining: false,
            })
        };
        Lanes {
            lanes: (0..count.max(1)).map(|_| lane()).collect(),
            max_batch: max_batch.max(1),
        }
    }

    /// The lane a key maps to, always the same for the same key.
    pub fn lane_for(&self, key: u128) -> usize {
        (key % self.lanes.len() as u128) as usize
    }

    /// Queues `request` on `lane`. `true` when no task is draining the lane: the caller must
    /// then start one running [`Lanes::drain`].
    pub fn push(&self, lane: usize, request: T) -> bool {
        let mut state = self.lock(lane);
        state.pending.push(request);
        !std::mem::replace(&mut state.draining, true)
    }

    /// Runs `run` on batch after batch of `lane` until the lane is empty.
    pub async fn drain<F, Fut>(&self, lane: usize, mut run: F)
    where
        F: FnMut(Vec<T>) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut guard = DrainGuard {
            lanes: self,
            lane,
            armed: true,
        };
        loop {
            let batch: Vec<T> = {
                let mut state = self.lock(lane);
                if state.pending.is_empty() {
                    state.draining = false;
                    guard.armed = false;
                    return;
                }
                let take = state.pending.len().min(self.max_batch);
                state.pending.drain(..take).collect()
            };
            run(batch).await;
        }
    }

    /// Locks one lane's queue.
    fn lock(&self, lane: usize) -> MutexGuard<'_, Lane<T>> {
        self.lanes[lane]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Resets a lane's `draining` flag if its task dies mid-batch (a panic), so the next request
/// starts a new drain instead of waiting forever.
struct DrainGuard<'a, T> {
    /// The queues owning the lane.
    lanes: &'a Lanes<T>,
    /// The lane being drained.
    lane: usize,
    /// Cleared when the drain ends normally (it reset the flag itself).
    armed: bool,
}

impl<T> Drop for DrainGuard<'_, T> {
    fn drop(&mut self) {
        if self.armed {
            self.lanes.lock(self.lane).draining = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_queued_during_a_batch_make_the_next_batch() {
        let lanes: Lanes<u32> = Lanes::new(1, 2);
        assert!(lanes.push(0, 1), "the first request starts a drain");
        assert!(!lanes.push(0, 2), "a drain is already due");
        let mut batches = Vec::new();
        lanes
            .drain(0, |batch| {
                if batch == [1, 2] {
                    lanes.push(0, 3);
                }
                batches.push(batch);
                async {}
            })
            .await;
        assert_eq!(batches, vec![vec![1, 2], vec![3]]);
        assert!(lanes.push(0, 4), "an emptied lane needs a new drain");
    }
}
