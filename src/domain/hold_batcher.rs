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

use chrono::TimeDelta;
use diesel_async::AsyncPgConnection;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::DomainError;
use super::coalesce::BatchWork;
use super::holds::{NewHold, same_hold_request};
use crate::db::DbPool;
use crate::db::holds::{
    HoldRequestRow, Reservation, find_hold_by_client_request_id, reserve_holds,
};
use crate::db::models::Hold;

/// Largest number of calls one transaction carries.
pub const MAX_BATCH: usize = 512;

/// What a hold batch answers one request.
pub struct HoldAnswer {
    /// The hold, or why there is none.
    pub result: Result<Hold, DomainError>,
    /// Whether this batch granted the hold (rather than found it by its key).
    granted: bool,
    /// How many requests of the batch were answered with this hold (a key repeated in a
    /// batch shares one hold).
    shares: usize,
}

/// CreateHold batches: a validated request per call.
pub struct HoldBatches {
    /// Connections the batches run on.
    pub pool: DbPool,
    /// How long a hold reserves its units.
    pub hold_ttl: TimeDelta,
    /// Holds granted to callers that went away before their answer (deadline passed, call
    /// cancelled): to be released at once (by [`super::Checkout::release_orphaned_holds`]).
    pub orphans: mpsc::UnboundedSender<Uuid>,
}

/// What a batch answered: one result per request, and the holds it created.
struct Answers {
    /// One per request, in order.
    results: Vec<Result<Hold, DomainError>>,
    /// The ids of the holds the batch granted (not those it found by key).
    granted: Vec<Uuid>,
}

impl BatchWork for HoldBatches {
    type Request = NewHold;
    type Answer = HoldAnswer;
    const SIZE_METRIC: &'static str = "flashsale_hold_batch_size";

    /// A product always maps to the same lane.
    fn lane_key(request: &NewHold) -> u128 {
        request.product_id.as_u128()
    }

    async fn run(&self, requests: Vec<NewHold>) -> Vec<HoldAnswer> {
        let started = std::time::Instant::now();
        let Answers { results, granted } = self.answer(&requests).await;
        crate::metrics::holds_created(granted.len());
        tracing::debug!(size = requests.len(), elapsed = ?started.elapsed(), "hold batch");
        let granted: HashSet<Uuid> = granted.into_iter().collect();
        // Only a client request id repeated within the batch makes requests share a hold.
        let mut shares: HashMap<Uuid, usize> = HashMap::new();
        for (request, result) in requests.iter().zip(&results) {
            if let (Some(_), Ok(hold)) = (&request.client_request_id, result) {
                *shares.entry(hold.id).or_default() += 1;
            }
        }
        results
            .into_iter()
            .map(|result| {
                if let Err(refusal) = &result {
                    crate::metrics::hold_rejected(refusal.reason());
                }
                let hold_id = result.as_ref().ok().map(|hold| hold.id);
                HoldAnswer {
                    granted: hold_id.is_some_and(|id| granted.contains(&id)),
                    shares: hold_id.map_or(0, |id| shares.get(&id).copied().unwrap_or(1)),
                    result,
                }
            })
            .collect()
    }

    /// A hold this batch granted that none of its requests' callers received is released
    /// at once: nobody will ever use it.
    fn unheard(&self, answers: Vec<HoldAnswer>) {
        let mut unheard: HashMap<Uuid, usize> = HashMap::new();
        for answer in answers.iter().filter(|answer| answer.granted) {
            if let Ok(hold) = &answer.result {
                *unheard.entry(hold.id).or_default() += 1;
            }
        }
        for answer in answers {
            let Ok(hold) = answer.result else { continue };
            if answer.granted && unheard.remove(&hold.id) == Some(answer.shares) {
                tracing::info!(hold_id = %hold.id, "hold granted to a caller that went away; releasing it");
                let _ = self.orphans.send(hold.id);
            }
        }
    }
}

impl HoldBatches {
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
