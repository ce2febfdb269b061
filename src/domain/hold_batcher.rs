//! Coalesced holds. Concurrent CreateHold calls in one process are gathered into one
//! statement per batch, the database function `reserve_holds`, run as its own transaction:
//! the batch's products are locked once (in id order), stock is granted in arrival order as
//! far as it goes, the granted holds are written in one multi-row insert, the counters in
//! one update per product, and everything commits once, in one round trip. Each caller gets
//! its own answer, only after the commit.
//!
//! Calls are spread over a few lanes by product; each lane runs at most one batch at a
//! time and gathers whatever arrived while the previous batch was in flight, so a lone
//! call goes straight through (a batch of one) and a crowd on one product shares commits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::TimeDelta;
use diesel_async::AsyncPgConnection;
use tokio::sync::oneshot;
use uuid::Uuid;

use super::DomainError;
use super::holds::{NewHold, same_hold_request};
use crate::db::DbPool;
use crate::db::holds::{
    HoldRequestRow, Reservation, find_hold_by_client_request_id, reserve_holds,
};
use crate::db::io_thread::IoThread;
use crate::db::models::Hold;

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

    /// Reserves a batch in one statement (one round trip, one commit); one answer per
    /// request, in order. A repeated client request id is sent once and its repeats answered
    /// like its first.
    async fn reserve(
        &self,
        requests: &[NewHold],
    ) -> Result<Vec<Result<Hold, DomainError>>, DomainError> {
        let mut conn = self.pool.get().await?;
        let first_with_same_key = first_with_same_key(requests);
        let rows: Vec<HoldRequestRow<'_>> = requests
            .iter()
            .zip(&first_with_same_key)
            .filter(|(_, first)| first.is_none())
            .map(|(request, _)| hold_request_row(request))
            .collect();
        let mut reservations = reserve_holds(&mut conn, &rows, self.hold_ttl)
            .await?
            .into_iter();
        let mut answers: Vec<Result<Hold, DomainError>> = Vec::with_capacity(requests.len());
        for (request, first) in requests.iter().zip(first_with_same_key) {
            let answer = match first {
                Some(first) => answers[first]
                    .clone()
                    .and_then(|hold| same_hold_request(hold, request)),
                None => match reservations.next() {
                    Some(reservation) => answer(&mut conn, request, reservation).await,
                    None => Err(DomainError::Internal("hold request left unanswered".into())),
                },
            };
            answers.push(answer);
        }
        Ok(answers)
    }
}

/// For each request, the earlier request of the batch with the same client request id, if any.
fn first_with_same_key(requests: &[NewHold]) -> Vec<Option<usize>> {
    let mut first_with_key: HashMap<&str, usize> = HashMap::new();
    requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let key = request.client_request_id.as_deref()?;
            match first_with_key.get(key) {
                Some(&first) => Some(first),
                None => {
                    first_with_key.insert(key, index);
                    None
                }
            }
        })
        .collect()
}

/// A request as the database function takes it.
fn hold_request_row(request: &NewHold) -> HoldRequestRow<'_> {
    HoldRequestRow {
        id: Uuid::now_v7(),
        product_id: request.product_id,
        qty: request.qty,
        client_request_id: request.client_request_id.as_deref(),
    }
}

/// The caller's answer for what the database did with its request.
async fn answer(
    conn: &mut AsyncPgConnection,
    request: &NewHold,
    reservation: Reservation,
) -> Result<Hold, DomainError> {
    match reservation {
        Reservation::Granted(hold) => Ok(hold),
        Reservation::Existing(hold) => same_hold_request(hold, request),
        Reservation::Insufficient { units_left } => Err(DomainError::InsufficientStock {
            product_id: request.product_id,
            requested: request.qty,
            available: units_left,
        }),
        Reservation::NoProduct => Err(DomainError::not_found("product", request.product_id)),
        Reservation::KeyTaken => taken_key_hold(conn, request).await,
    }
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

/// The hold a concurrent transaction created with this request's key.
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
