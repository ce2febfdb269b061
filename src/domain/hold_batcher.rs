//! Coalesced holds. Concurrent CreateHold calls in one process are gathered into one
//! transaction per batch: the batch's products are locked once (in id order), stock is
//! granted in arrival order as far as it goes, the granted holds are written in one
//! multi-row insert, the counters in one update, and everything commits once. Each caller
//! gets its own answer, only after the commit.
//!
//! Calls are spread over a few lanes by product; each lane runs at most one batch at a
//! time and gathers whatever arrived while the previous batch was in flight, so a lone
//! call goes straight through (a batch of one) and a crowd on one product shares commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::TimeDelta;
use diesel_async::{AsyncConnection, AsyncPgConnection};
use tokio::sync::oneshot;
use uuid::Uuid;

use super::DomainError;
use super::holds::{NewHold, same_hold_request};
use crate::db::DbPool;
use crate::db::holds::{
    NewHoldRow, find_hold_by_client_request_id, find_holds_by_client_request_ids,
    insert_holds_and_reserve,
};
use crate::db::io_thread::IoThread;
use crate::db::models::{Hold, Product};
use crate::db::products::lock_products;

/// Largest number of calls one transaction carries.
const MAX_BATCH: usize = 512;

/// A caller waiting for its hold.
struct PendingHold {
    /// What the caller asked for (already validated).
    request: NewHold,
    /// Where its answer goes once the batch committed.
    reply: oneshot::Sender<Result<Hold, DomainError>>,
}

/// One lane's queue.
#[derive(Default)]
struct Lane {
    /// Calls that arrived while a batch was in flight.
    pending: Vec<PendingHold>,
    /// Whether a task is draining this lane.
    draining: bool,
}

/// Gathers concurrent hold requests into shared transactions.
pub struct HoldBatcher {
    /// Connections the batches run on.
    pool: DbPool,
    /// How long a hold reserves its units.
    hold_ttl: TimeDelta,
    /// Independent queues; a product always maps to the same lane.
    lanes: Vec<Mutex<Lane>>,
    /// Where the batches run.
    io: Arc<IoThread>,
}

/// What one request of a batch comes to inside the transaction.
enum Answer {
    /// Not decided yet: the grant step decides.
    Undecided,
    /// Settled: a hold (new or existing) or a refusal.
    Done(Result<Hold, DomainError>),
    /// Same client request id as an earlier request of this batch: answered like it.
    SameKeyAs(usize),
    /// Its client request id was taken by a concurrent transaction: look it up after commit.
    KeyTaken,
}

impl HoldBatcher {
    /// A batcher with `lanes` queues (at least one) whose batches run on `io`.
    pub fn new(pool: DbPool, hold_ttl: Duration, lanes: usize, io: Arc<IoThread>) -> Arc<Self> {
        Arc::new(HoldBatcher {
            pool,
            hold_ttl: TimeDelta::from_std(hold_ttl).unwrap_or(TimeDelta::MAX),
            lanes: (0..lanes.max(1)).map(|_| Mutex::default()).collect(),
            io,
        })
    }

    /// Queues a (validated) request and waits for its answer.
    pub async fn submit(self: &Arc<Self>, request: NewHold) -> Result<Hold, DomainError> {
        let lane = (request.product_id.as_u128() % self.lanes.len() as u128) as usize;
        let (reply, answer) = oneshot::channel();
        let start_draining = {
            let mut state = self.lane(lane);
            state.pending.push(PendingHold { request, reply });
            !std::mem::replace(&mut state.draining, true)
        };
        if start_draining {
            self.io.handle().spawn(self.clone().drain(lane));
        }
        answer
            .await
            .map_err(|_| DomainError::Internal("hold batch ended without an answer".into()))?
    }

    /// Locks one lane's queue.
    fn lane(&self, lane: usize) -> std::sync::MutexGuard<'_, Lane> {
        self.lanes[lane]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs batches for one lane until its queue is empty.
    async fn drain(self: Arc<Self>, lane: usize) {
        let mut guard = DrainGuard {
            batcher: &self,
            lane,
            armed: true,
        };
        loop {
            let batch: Vec<PendingHold> = {
                let mut state = self.lane(lane);
                if state.pending.is_empty() {
                    state.draining = false;
                    guard.armed = false;
                    return;
                }
                let take = state.pending.len().min(MAX_BATCH);
                state.pending.drain(..take).collect()
            };
            self.run_batch(batch).await;
        }
    }

    /// Runs one batch and answers every caller in it.
    async fn run_batch(&self, batch: Vec<PendingHold>) {
        let started = std::time::Instant::now();
        let (requests, replies): (Vec<NewHold>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.request, pending.reply))
            .unzip();
        let outcome = self.reserve(&requests).await;
        tracing::debug!(size = requests.len(), elapsed = ?started.elapsed(), "hold batch");
        match outcome {
            Ok(answers) => {
                for (reply, answer) in replies.into_iter().zip(answers) {
                    // A caller that went away does not need its answer.
                    let _ = reply.send(answer);
                }
            }
            Err(error) => {
                for reply in replies {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }

    /// Reserves a batch in one transaction; one answer per request, in order.
    async fn reserve(
        &self,
        requests: &[NewHold],
    ) -> Result<Vec<Result<Hold, DomainError>>, DomainError> {
        let mut conn = self.pool.get().await?;
        let answers = conn
            .transaction(async |conn| self.reserve_in_transaction(conn, requests).await)
            .await?;
        let mut resolved: Vec<Result<Hold, DomainError>> = Vec::with_capacity(requests.len());
        for (request, answer) in requests.iter().zip(answers) {
            let result = match answer {
                Answer::Done(result) => result,
                Answer::SameKeyAs(first) => resolved[first]
                    .clone()
                    .and_then(|hold| same_hold_request(hold, request)),
                Answer::KeyTaken => taken_key_hold(&mut conn, request).await,
                Answer::Undecided => {
                    Err(DomainError::Internal("hold request left undecided".into()))
                }
            };
            resolved.push(result);
        }
        Ok(resolved)
    }

    /// Inside the transaction: answers known keys, locks the products, grants stock in
    /// arrival order, writes the granted holds and the counters (one statement).
    async fn reserve_in_transaction(
        &self,
        conn: &mut AsyncPgConnection,
        requests: &[NewHold],
    ) -> Result<Vec<Answer>, DomainError> {
        let mut answers = answer_known_keys(conn, requests).await?;
        let mut product_ids: Vec<Uuid> =
            requests.iter().map(|request| request.product_id).collect();
        product_ids.sort_unstable();
        product_ids.dedup();
        let (products, now) = lock_products(conn, &product_ids).await?;
        let granted = grant_in_arrival_order(requests, &products, &mut answers);
        let rows = hold_rows(requests, &granted);
        let Some(inserted) =
            insert_holds_and_reserve(conn, &rows, now, now + self.hold_ttl).await?
        else {
            return Err(DomainError::Internal(
                "locked products refused a granted reservation".into(),
            ));
        };
        let mut inserted: HashMap<Uuid, Hold> =
            inserted.into_iter().map(|hold| (hold.id, hold)).collect();
        for (index, row) in granted.iter().zip(&rows) {
            answers[*index] = match inserted.remove(&row.id) {
                Some(hold) => Answer::Done(Ok(hold)),
                None => Answer::KeyTaken,
            };
        }
        Ok(answers)
    }
}

/// The rows of the granted requests.
fn hold_rows<'a>(requests: &'a [NewHold], granted: &[usize]) -> Vec<NewHoldRow<'a>> {
    granted
        .iter()
        .map(|&index| {
            let request = &requests[index];
            NewHoldRow {
                id: Uuid::now_v7(),
                product_id: request.product_id,
                qty: request.qty,
                client_request_id: request.client_request_id.as_deref(),
            }
        })
        .collect()
}

/// Resets a lane's `draining` flag if its task dies mid-batch (a panic), so the next call
/// starts a new drain instead of waiting forever.
struct DrainGuard<'a> {
    /// The batcher owning the lane.
    batcher: &'a HoldBatcher,
    /// The lane being drained.
    lane: usize,
    /// Cleared when the drain ends normally (it reset the flag itself).
    armed: bool,
}

impl Drop for DrainGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.batcher.lane(self.lane).draining = false;
        }
    }
}

/// Answers requests whose client request id already has a hold, and marks repeats of a key
/// within the batch; everything else is left for the grant step.
async fn answer_known_keys(
    conn: &mut AsyncPgConnection,
    requests: &[NewHold],
) -> Result<Vec<Answer>, DomainError> {
    let keys: Vec<&str> = requests
        .iter()
        .filter_map(|r| r.client_request_id.as_deref())
        .collect();
    let existing: HashMap<String, Hold> = find_holds_by_client_request_ids(conn, &keys)
        .await?
        .into_iter()
        .filter_map(|hold| Some((hold.client_request_id.clone()?, hold)))
        .collect();
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    let answers = requests
        .iter()
        .enumerate()
        .map(
            |(index, request)| match request.client_request_id.as_deref() {
                Some(key) if existing.contains_key(key) => {
                    Answer::Done(same_hold_request(existing[key].clone(), request))
                }
                Some(key) => match first_with_key.get(key) {
                    Some(&first) => Answer::SameKeyAs(first),
                    None => {
                        first_with_key.insert(key, index);
                        Answer::Undecided
                    }
                },
                None => Answer::Undecided,
            },
        )
        .collect();
    Ok(answers)
}

/// Grants the still unanswered requests in arrival order while stock lasts; refusals are
/// answered in place. Returns the indexes of the granted requests.
fn grant_in_arrival_order(
    requests: &[NewHold],
    products: &[Product],
    answers: &mut [Answer],
) -> Vec<usize> {
    let mut available: HashMap<Uuid, i64> =
        products.iter().map(|p| (p.id, p.available())).collect();
    let mut granted = Vec::new();
    for (index, request) in requests.iter().enumerate() {
        if !matches!(answers[index], Answer::Undecided) {
            continue;
        }
        let Some(left) = available.get_mut(&request.product_id) else {
            answers[index] =
                Answer::Done(Err(DomainError::not_found("product", request.product_id)));
            continue;
        };
        if *left >= request.qty {
            *left -= request.qty;
            granted.push(index);
        } else {
            answers[index] = Answer::Done(Err(DomainError::InsufficientStock {
                product_id: request.product_id,
                requested: request.qty,
                available: *left,
            }));
        }
    }
    granted
}

/// After commit: the hold a concurrent transaction created with this request's key.
async fn taken_key_hold(
    conn: &mut AsyncPgConnection,
    request: &NewHold,
) -> Result<Hold, DomainError> {
    let key = request.client_request_id.as_deref().unwrap_or_default();
    let existing = find_hold_by_client_request_id(conn, key)
        .await?
        .ok_or_else(|| DomainError::Conflict(format!("client_request_id {key:?} raced; retry")))?;
    same_hold_request(existing, request)
}
