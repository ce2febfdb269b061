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

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::TimeDelta;
use diesel_async::AsyncPgConnection;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use super::DomainError;
use super::coalesce::Lanes;
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

/// Gathers concurrent hold requests into shared transactions.
pub struct HoldBatcher {
    /// Connections the batches run on.
    pool: DbPool,
    /// How long a hold reserves its units.
    hold_ttl: TimeDelta,
    /// Independent queues; a product always maps to the same lane.
    queue: Lanes<PendingHold>,
    /// Where the batches run.
    io: Arc<IoThread>,
    /// Holds granted to callers that went away before their answer (deadline passed, call
    /// cancelled): to be released at once (by [`super::Checkout::release_orphaned_holds`]).
    orphans: mpsc::UnboundedSender<Uuid>,
}

/// What a batch answered: one result per request, and the holds it created.
struct Answers {
    /// One per request, in order.
    results: Vec<Result<Hold, DomainError>>,
    /// The ids of the holds the batch granted (not those it found by key).
    granted: Vec<Uuid>,
}

impl HoldBatcher {
    /// A batcher with `lanes` queues (at least one) whose batches run on `io`; holds whose
    /// callers went away are sent to `orphans`.
    pub fn new(
        pool: DbPool,
        hold_ttl: Duration,
        lanes: usize,
        io: Arc<IoThread>,
        orphans: mpsc::UnboundedSender<Uuid>,
    ) -> Arc<Self> {
        Arc::new(HoldBatcher {
            pool,
            hold_ttl: TimeDelta::from_std(hold_ttl).unwrap_or(TimeDelta::MAX),
            queue: Lanes::new(lanes, MAX_BATCH),
            io,
            orphans,
        })
    }

    /// Queues a (validated) request and waits for its answer.
    pub async fn submit(self: &Arc<Self>, request: NewHold) -> Result<Hold, DomainError> {
        let lane = self.queue.lane_for(request.product_id.as_u128());
        let (reply, answer) = oneshot::channel();
        if self.queue.push(lane, PendingHold { request, reply }) {
            let batcher = self.clone();
            self.io.handle().spawn(async move {
                batcher
                    .queue
                    .drain(lane, |batch| batcher.run_batch(batch))
                    .await
            });
        }
        answer
            .await
            .map_err(|_| DomainError::internal("hold batch ended without an answer"))?
    }

    /// Runs one batch and answers every caller in it. Callers that went away while they
    /// queued (deadline passed, call cancelled) are left out before anything is sent; a hold
    /// granted to callers who all went away before their answer is released at once.
    async fn run_batch(&self, mut batch: Vec<PendingHold>) {
        batch.retain(|pending| !pending.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        let (requests, replies): (Vec<NewHold>, Vec<_>) = batch
            .into_iter()
            .map(|pending| (pending.request, pending.reply))
            .unzip();
        let Answers { results, granted } = self.answer(&requests).await;
        crate::metrics::hold_batch(requests.len());
        crate::metrics::holds_created(granted.len());
        tracing::debug!(size = requests.len(), elapsed = ?started.elapsed(), "hold batch");
        // Holds some caller received, and holds some caller never did (rare: only then is
        // anything looked up).
        let (mut delivered, mut undelivered) = (Vec::with_capacity(requests.len()), Vec::new());
        for (reply, answer) in replies.into_iter().zip(results) {
            if let Err(refusal) = &answer {
                crate::metrics::hold_rejected(refusal.reason());
            }
            let hold_id = answer.as_ref().ok().map(|hold| hold.id);
            match reply.send(answer) {
                Ok(()) => delivered.extend(hold_id),
                Err(_) => undelivered.extend(hold_id),
            }
        }
        if !undelivered.is_empty() {
            self.release_orphans(&granted, &delivered, undelivered);
        }
    }

    /// Hands the holds this batch granted that no caller received to the releaser (a key
    /// repeated in the batch shares one hold: it is an orphan only if nobody got it).
    fn release_orphans(&self, granted: &[Uuid], delivered: &[Uuid], undelivered: Vec<Uuid>) {
        let delivered: HashSet<&Uuid> = delivered.iter().collect();
        let mut orphans: HashSet<Uuid> = undelivered.into_iter().collect();
        orphans.retain(|id| granted.contains(id) && !delivered.contains(id));
        for orphan in orphans {
            tracing::info!(hold_id = %orphan, "hold granted to a caller that went away; releasing it");
            let _ = self.orphans.send(orphan);
        }
    }

    /// One answer per request. A batch the database refused as a whole (for a reason other
    /// than being unreachable) may have been refused because of one request: each request
    /// then runs alone, so that request gets its error and the others are served.
    async fn answer(&self, requests: &[NewHold]) -> Answers {
        let error = match self.reserve(requests).await {
            Ok(answers) => return answers,
            Err(error) => error,
        };
        // Unreachable, too slow or kept waiting on a lock: one by one would fare no better.
        if requests.len() == 1
            || matches!(
                error,
                DomainError::Unavailable(_) | DomainError::Conflict(_)
            )
        {
            return Answers {
                results: vec![Err(error); requests.len()],
                granted: Vec::new(),
            };
        }
        tracing::warn!(%error, size = requests.len(), "hold batch refused; serving its requests one by one");
        let mut answers = Answers {
            results: Vec::with_capacity(requests.len()),
            granted: Vec::new(),
        };
        for request in requests {
            match self.reserve(std::slice::from_ref(request)).await {
                Ok(mut alone) => {
                    answers.granted.append(&mut alone.granted);
                    answers.results.push(alone.results.pop().unwrap_or_else(|| {
                        Err(DomainError::internal("hold request left unanswered"))
                    }));
                }
                Err(error) => answers.results.push(Err(error)),
            }
        }
        answers
    }

    /// Reserves a batch in one statement (one round trip, one commit); one answer per
    /// request, in order. A client request id repeated within the batch is sent once; each
    /// repeat is checked against the hold its first request got or found.
    async fn reserve(&self, requests: &[NewHold]) -> Result<Answers, DomainError> {
        let mut conn = crate::db::connection(&self.pool).await?;
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
        // Per request: the hold its key names (or why there is none); repeats of a key are
        // checked against the hold of its first request.
        let mut keyed_holds: Vec<Result<Hold, DomainError>> = Vec::with_capacity(requests.len());
        let mut answers = Vec::with_capacity(requests.len());
        let mut granted = Vec::new();
        for (request, first) in requests.iter().zip(first_with_same_key) {
            let keyed_hold = match first {
                Some(first) => keyed_holds[first].clone(),
                None => match reservations.next() {
                    Some(reservation) => {
                        if let Reservation::Granted(hold) = &reservation {
                            tracing::debug!(hold_id = %hold.id, product_id = %hold.product_id, qty = hold.qty, "hold created");
                            granted.push(hold.id);
                        }
                        resolve(&mut conn, request, reservation).await
                    }
                    None => Err(DomainError::internal("hold request left unanswered")),
                },
            };
            answers.push(
                keyed_hold
                    .clone()
                    .and_then(|hold| same_hold_request(hold, request)),
            );
            keyed_holds.push(keyed_hold);
        }
        Ok(Answers {
            results: answers,
            granted,
        })
    }
}

/// For each request, the earlier request of the batch with the same caller and client
/// request id, if any.
fn first_with_same_key(requests: &[NewHold]) -> Vec<Option<usize>> {
    let mut first_with_key: HashMap<(&str, &str), usize> = HashMap::new();
    requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let key = (request.caller.name(), request.client_request_id.as_deref()?);
            match first_with_key.get(&key) {
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
        caller: request.caller.name(),
        client_request_id: request.client_request_id.as_deref(),
        buyer_id: request.buyer_id.as_deref(),
    }
}

/// The hold the database granted or found for a request, or why there is none. The caller
/// still checks that a found hold matches its request.
async fn resolve(
    conn: &mut AsyncPgConnection,
    request: &NewHold,
    reservation: Reservation,
) -> Result<Hold, DomainError> {
    match reservation {
        Reservation::Granted(hold) | Reservation::Existing(hold) => Ok(hold),
        Reservation::Insufficient { units_left } => Err(DomainError::InsufficientStock {
            product_id: request.product_id,
            requested: request.qty,
            available: units_left,
        }),
        Reservation::NoProduct => Err(DomainError::not_found("product", request.product_id)),
        Reservation::SaleNotStarted => Err(DomainError::SaleNotStarted {
            product_id: request.product_id,
        }),
        Reservation::SaleEnded => Err(DomainError::SaleEnded {
            product_id: request.product_id,
        }),
        Reservation::BuyerRequired => Err(DomainError::invalid(
            "buyer_id",
            "is required: the product limits units per buyer",
        )),
        Reservation::BuyerLimit { remaining } => Err(DomainError::BuyerLimitExceeded {
            product_id: request.product_id,
            remaining,
        }),
        Reservation::KeyTaken => taken_key_hold(conn, request).await,
    }
}

/// The hold a concurrent transaction created with this request's key.
async fn taken_key_hold(
    conn: &mut AsyncPgConnection,
    request: &NewHold,
) -> Result<Hold, DomainError> {
    let key = request.client_request_id.as_deref().unwrap_or_default();
    find_hold_by_client_request_id(conn, request.caller.name(), key)
        .await?
        .ok_or_else(|| DomainError::conflict(format!("client_request_id {key:?} raced; retry")))
}
