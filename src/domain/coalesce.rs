//! Coalescing queues shared by the batched operations (holds, orders, payments, stock
//! folds). Requests queue on a lane; one task at a time drains a lane, batch after batch,
//! each batch taking whatever arrived while the previous one ran. A lone request is a batch
//! of one and waits for nothing; a crowd shares one round trip and one commit per batch.
//! [`Batcher`] is the whole pattern for work that answers each request once: queue, drain
//! on the database i/o thread, answer.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::oneshot;

use super::DomainError;
use crate::db::io_thread::IoThread;

/// Work done a batch at a time: one call per batch, one answer per request, in order.
pub trait BatchWork: Send + Sync + 'static {
    /// What a caller asks.
    type Request: Send + 'static;
    /// What a caller gets back.
    type Answer: Send + 'static;

    /// The histogram of this work's batch sizes (requests per transaction), e.g.
    /// `flashsale_hold_batch_size`.
    const SIZE_METRIC: &'static str;

    /// Which lane a request queues on (the same key, the same lane).
    fn lane_key(request: &Self::Request) -> u128;

    /// Runs one batch; exactly one answer per request, in order. Callers get their answers
    /// only when it returns, so everything it commits is committed before anyone hears.
    fn run(&self, requests: Vec<Self::Request>) -> impl Future<Output = Vec<Self::Answer>> + Send;

    /// Takes the answers of a batch whose callers went away before they could be given
    /// (deadline passed, call cancelled); by default they are dropped.
    fn unheard(&self, answers: Vec<Self::Answer>) {
        drop(answers);
    }
}

/// What a batch did for one call.
pub enum Batched<T> {
    /// It did the call's work (committed); this is the result.
    Done(T),
    /// It left the call alone: the caller handles it on its own.
    LeftAlone,
}

/// The rows of a batch statement whose rare cases go back to their callers, one by one: a
/// statement refused as a whole (for a reason one call alone gets its own answer to) leaves
/// every call alone and is logged; an unreachable database or a lost race is every
/// caller's error.
pub fn rows_or_all_left_alone<T>(
    outcome: Result<Vec<T>, DomainError>,
    batch: &str,
    size: usize,
) -> Result<Vec<T>, DomainError> {
    match outcome {
        Ok(rows) => Ok(rows),
        Err(error @ (DomainError::Unavailable(_) | DomainError::Conflict(_))) => Err(error),
        Err(error) => {
            tracing::warn!(%error, size, batch, "batch refused; its calls go one by one");
            Ok(Vec::new())
        }
    }
}

/// A caller waiting in a [`Batcher`]'s queue.
struct Waiting<W: BatchWork> {
    /// What it asked.
    request: W::Request,
    /// Where its answer goes.
    reply: oneshot::Sender<W::Answer>,
}

/// Gathers concurrent requests for `W` into batches run on the database i/o thread.
pub struct Batcher<W: BatchWork> {
    /// What a batch does.
    work: W,
    /// Independent queues.
    queue: Lanes<Waiting<W>>,
    /// Where the batches run.
    io: Arc<IoThread>,
}

impl<W: BatchWork> Batcher<W> {
    /// `lanes` queues (at least one) whose batches carry at most `max_batch` requests and
    /// run on `io`.
    pub fn new(work: W, lanes: usize, max_batch: usize, io: Arc<IoThread>) -> Arc<Self> {
        Arc::new(Batcher {
            work,
            queue: Lanes::new(lanes, max_batch),
            io,
        })
    }

    /// Queues `request` and waits for its answer; `None` if its batch ended without one
    /// (the batch's task died).
    pub async fn submit(self: &Arc<Self>, request: W::Request) -> Option<W::Answer> {
        let lane = self.queue.lane_for(W::lane_key(&request));
        let (reply, answer) = oneshot::channel();
        if self.queue.push(lane, Waiting { request, reply }) {
            let batcher = self.clone();
            self.io.handle().spawn(async move {
                batcher
                    .queue
                    .drain(lane, |batch| batcher.run_batch(batch))
                    .await
            });
        }
        answer.await.ok()
    }

    /// Runs one batch, leaving out callers that went away while they queued (deadline
    /// passed, call cancelled), answers the others, and hands the answers that found nobody
    /// to [`BatchWork::unheard`].
    async fn run_batch(&self, mut batch: Vec<Waiting<W>>) {
        batch.retain(|waiting| !waiting.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let (requests, replies): (Vec<W::Request>, Vec<_>) = batch
            .into_iter()
            .map(|waiting| (waiting.request, waiting.reply))
            .unzip();
        crate::metrics::batch_size(W::SIZE_METRIC, requests.len());
        let answers = self.work.run(requests).await;
        let unheard: Vec<W::Answer> = replies
            .into_iter()
            .zip(answers)
            .filter_map(|(reply, answer)| reply.send(answer).err())
            .collect();
        if !unheard.is_empty() {
            self.work.unheard(unheard);
        }
    }
}

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
