//! The waitlist: buyers wait in line, in PostgreSQL, for units of a sold-out product.
//!
//! The line is the `waiters` table; the database functions join, leave and serve it (see
//! `migrations/schema.sql`): units that come back are given to the line in join order
//! before any new hold can take them (`serve_waiters`, run by every fold of units, by
//! restocks and by joins and leaves). This module keeps the streams of the waiters this
//! process serves: a change of a product's line (heard on the change feed) re-reads the
//! state of its local waiters and tells each its new place, its hold, or why it was
//! turned away. A waiter whose stream is dropped leaves the line; a hold made for it that
//! it never received is released at once.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use chrono::TimeDelta;
use diesel::result::{DatabaseErrorKind, Error as DieselError};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use super::{Caller, Checkout, DomainError, check_key};
use crate::db::holds::find_hold;
use crate::db::models::Hold;
use crate::db::waitlist::{self as queries, NewWaiter, WaiterState};

/// Waiters taken out of line at once at shutdown: a few connections, leaving the pool to
/// the calls still draining.
const LEAVES_AT_ONCE: usize = 4;

/// How long shutdown spends taking waiters out of line.
const LEAVE_PATIENCE: Duration = Duration::from_secs(10);

/// A buyer asking to wait.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub product_id: Uuid,
    pub qty: i64,
    /// For the product's max_per_buyer.
    pub buyer_id: Option<String>,
    /// Who asks.
    pub caller: Caller,
}

/// What a waiter's stream tells.
#[derive(Debug, Clone)]
pub enum WaitlistEvent {
    /// Its place in line, 1 for the next to be served.
    Position(i64),
    /// Its turn came: its hold. The last event.
    Served(Hold),
    /// It was turned away (sale ended, stock withdrawn, limit passed, shutdown). The last
    /// event.
    Ended(DomainError),
}

/// The waiters whose streams this process serves.
#[derive(Default)]
pub struct WaitlistHub {
    /// By waiter id.
    waiters: Mutex<HashMap<i64, LocalWaiter>>,
    /// Set at shutdown: no new waiter is registered.
    closed: AtomicBool,
}

/// One waiter's stream.
struct LocalWaiter {
    /// Its product.
    product_id: Uuid,
    /// Where its events go.
    events: mpsc::UnboundedSender<WaitlistEvent>,
    /// The place last told (0: none yet).
    position: i64,
}

impl WaitlistHub {
    /// Locks the waiters.
    fn lock(&self) -> MutexGuard<'_, HashMap<i64, LocalWaiter>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a waiter's stream; `None` once the hub is closed.
    fn register(
        &self,
        id: i64,
        product_id: Uuid,
    ) -> Option<mpsc::UnboundedReceiver<WaitlistEvent>> {
        let (events, received) = mpsc::unbounded_channel();
        let mut waiters = self.lock();
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        waiters.insert(
            id,
            LocalWaiter {
                product_id,
                events,
                position: 0,
            },
        );
        Some(received)
    }

    /// The ids of the local waiters of `product` (all of them for `None`).
    fn ids(&self, product: Option<Uuid>) -> Vec<i64> {
        self.lock()
            .iter()
            .filter(|(_, waiter)| product.is_none_or(|p| p == waiter.product_id))
            .map(|(id, _)| *id)
            .collect()
    }

    /// Tells a waiter its place, if it changed.
    fn tell_position(&self, id: i64, position: i64) {
        if let Some(waiter) = self.lock().get_mut(&id)
            && waiter.position != position
        {
            waiter.position = position;
            let _ = waiter.events.send(WaitlistEvent::Position(position));
        }
    }

    /// Ends a waiter's stream with its last event; whether it was still registered.
    fn finish(&self, id: i64, last: WaitlistEvent) -> bool {
        match self.lock().remove(&id) {
            Some(waiter) => {
                let _ = waiter.events.send(last);
                true
            }
            None => false,
        }
    }

    /// Whether a waiter's stream is still open here.
    fn holds(&self, id: i64) -> bool {
        self.lock().contains_key(&id)
    }

    /// Ends every stream with `SHUTTING_DOWN` and registers no more; the ids of the
    /// waiters whose streams it ended, still in line.
    fn close(&self) -> Vec<i64> {
        let mut waiters = self.lock();
        self.closed.store(true, Ordering::Release);
        waiters
            .drain()
            .map(|(id, waiter)| {
                let _ = waiter
                    .events
                    .send(WaitlistEvent::Ended(DomainError::ShuttingDown));
                id
            })
            .collect()
    }

    /// How many streams are open.
    pub fn open_streams(&self) -> usize {
        self.lock().len()
    }
}

/// A waiter's stream: its events until the last; dropped early, the waiter leaves the line.
pub struct WaitlistStream {
    /// The waiter's events.
    events: mpsc::UnboundedReceiver<WaitlistEvent>,
    /// Leaves the line when the stream is dropped before its last event.
    _leave: LeaveOnDrop,
}

impl Stream for WaitlistStream {
    type Item = WaitlistEvent;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<WaitlistEvent>> {
        let this = self.get_mut();
        match this.events.poll_recv(cx) {
            // The last event closes the stream: nothing follows it.
            Poll::Ready(Some(last @ (WaitlistEvent::Served(_) | WaitlistEvent::Ended(_)))) => {
                this.events.close();
                Poll::Ready(Some(last))
            }
            other => other,
        }
    }
}

/// Takes a waiter out of line when its stream goes away.
struct LeaveOnDrop {
    /// The operations, to leave with.
    checkout: Arc<Checkout>,
    /// The waiter.
    id: i64,
}

impl Drop for LeaveOnDrop {
    fn drop(&mut self) {
        // A finished waiter (served, turned away) is no longer registered: nothing to do.
        if !self.checkout.waitlist.holds(self.id) {
            return;
        }
        self.checkout.waitlist.lock().remove(&self.id);
        let (checkout, id) = (self.checkout.clone(), self.id);
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { checkout.leave_waitlist(id).await });
        }
    }
}

impl Checkout {
    /// Puts a buyer in line for `qty` units: a stream of its place, then its hold (or why
    /// it was turned away). A buyer alone in line with units there is served at once.
    pub async fn join_waitlist(
        self: &Arc<Self>,
        request: JoinRequest,
    ) -> Result<WaitlistStream, DomainError> {
        let max = self.settings.max_qty_per_hold;
        if !(1..=max).contains(&request.qty) {
            return Err(DomainError::invalid(
                "qty",
                format!("must be between 1 and {max}"),
            ));
        }
        if let Some(buyer) = &request.buyer_id {
            check_key("buyer_id", buyer)?;
        }
        let new = NewWaiter {
            product_id: request.product_id,
            qty: request.qty,
            buyer_id: request.buyer_id.as_deref(),
            caller: request.caller.name(),
            hold_ttl: TimeDelta::from_std(self.settings.hold_ttl).unwrap_or(TimeDelta::MAX),
            session: self.session,
        };
        let mut conn = self.conn().await?;
        let id = queries::join_waitlist(&mut conn, &new)
            .await
            .map_err(|error| join_refusal(error, request.product_id, request.qty))?;
        drop(conn);
        let Some(events) = self.waitlist.register(id, request.product_id) else {
            self.leave_waitlist(id).await;
            return Err(DomainError::ShuttingDown);
        };
        let stream = WaitlistStream {
            events,
            _leave: LeaveOnDrop {
                checkout: self.clone(),
                id,
            },
        };
        self.refresh_waiters(Some(request.product_id)).await;
        Ok(stream)
    }

    /// Re-reads the local waiters of `product` (of every product for `None`) and tells each
    /// what changed. A failed read is logged; the reaper's next sweep reads again.
    pub async fn refresh_waiters(&self, product: Option<Uuid>) {
        let ids = self.waitlist.ids(product);
        if ids.is_empty() {
            return;
        }
        if let Err(error) = self.tell_waiters(&ids).await {
            tracing::warn!(%error, "reading waiters failed; the reaper reads them again");
        }
    }

    /// Reads the waiters `ids` and tells each its place, hold or end.
    async fn tell_waiters(&self, ids: &[i64]) -> Result<(), DomainError> {
        let mut conn = self.conn().await?;
        for state in queries::waiter_states(&mut conn, ids).await? {
            let last = match state.status.as_str() {
                "waiting" => {
                    self.waitlist.tell_position(state.id, state.position);
                    continue;
                }
                "served" => {
                    let hold_id = state.hold_id.ok_or_else(|| {
                        DomainError::internal(format!("served waiter {} has no hold", state.id))
                    })?;
                    let hold = find_hold(&mut conn, hold_id)
                        .await?
                        .ok_or_else(|| DomainError::internal(format!("hold {hold_id} vanished")))?;
                    WaitlistEvent::Served(hold)
                }
                _ => WaitlistEvent::Ended(turned_away(&state)),
            };
            self.waitlist.finish(state.id, last);
        }
        Ok(())
    }

    /// Ends every waiter's stream with `SHUTTING_DOWN`, takes them out of line and joins
    /// no more: for shutdown, while the change feed still holds this process's session, so
    /// no other process serves a waiter that is gone. Those a failed leave keeps in line
    /// are skipped once the session ends; so are those left after [`LEAVE_PATIENCE`] (the
    /// database is gone, say).
    pub(super) async fn close_waitlist(&self) {
        let leaving = futures::stream::iter(self.waitlist.close())
            .for_each_concurrent(LEAVES_AT_ONCE, |id| self.leave_waitlist(id));
        if tokio::time::timeout(LEAVE_PATIENCE, leaving).await.is_err() {
            tracing::warn!("waiters still in line at shutdown; skipped once this process is gone");
        }
    }

    /// Turns away the waiters of every product whose sale has ended; how many products.
    pub async fn end_waiters_of_ended_sales(&self) -> Result<i32, DomainError> {
        let mut conn = self.conn().await?;
        Ok(queries::end_waiters_of_ended_sales(&mut conn).await?)
    }

    /// Takes a waiter out of line; a hold made for it that it never received is released.
    async fn leave_waitlist(&self, id: i64) {
        let left = async {
            let mut conn = self.conn().await?;
            let state = queries::leave_waitlist(&mut conn, id).await?;
            drop(conn);
            if let Some(WaiterState {
                hold_id: Some(hold_id),
                ..
            }) = state
            {
                self.release_hold(hold_id).await?;
            }
            Ok::<_, DomainError>(())
        };
        if let Err(error) = left.await {
            tracing::warn!(%error, waiter = id, "leaving the waitlist failed; its process's end will");
        }
    }
}

/// Why a waiter that is no longer waiting, and was not served, was turned away.
fn turned_away(state: &WaiterState) -> DomainError {
    let product_id = state.product_id;
    match state.end_reason.as_deref() {
        Some("sale_ended") => DomainError::SaleEnded { product_id },
        Some("stock_withdrawn") => DomainError::StockWithdrawn { product_id },
        Some("buyer_limit") => DomainError::BuyerLimitExceeded {
            product_id,
            remaining: 0,
        },
        // 'left' while its stream is open here: the database took this process for gone.
        _ => DomainError::Unavailable(Arc::new(std::io::Error::other(
            "the waiter lost its place (its server was taken for gone); join again",
        ))),
    }
}

/// The refusals join_waitlist raises, as domain errors (`qty`: the units asked).
fn join_refusal(error: DieselError, product_id: Uuid, qty: i64) -> DomainError {
    if let DieselError::DatabaseError(DatabaseErrorKind::Unknown, info) = &error {
        let message = info.message();
        if message.starts_with("no product") {
            return DomainError::not_found("product", product_id);
        }
        match message {
            "sale_not_started" => return DomainError::SaleNotStarted { product_id },
            "sale_ended" => return DomainError::SaleEnded { product_id },
            "buyer_required" => {
                return DomainError::invalid(
                    "buyer_id",
                    "is required: the product limits units per buyer",
                );
            }
            _ => {}
        }
        if let Some(stock) = message.strip_prefix("more_than_stock ")
            && let Ok(stock) = stock.parse()
        {
            return DomainError::InsufficientStock {
                product_id,
                requested: qty,
                available: stock,
            };
        }
        if let Some(remaining) = message.strip_prefix("buyer_limit ")
            && let Ok(remaining) = remaining.parse()
        {
            return DomainError::BuyerLimitExceeded {
                product_id,
                remaining,
            };
        }
    }
    error.into()
}
