//! Queries on `payment_events`.

use diesel::dsl::now;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::models::{EventOutcome, OrderStatus, PaymentEvent, PaymentResult};
use super::schema::payment_events;

/// A payment event as first recorded.
#[derive(Debug, Clone)]
pub struct NewPaymentEvent<'a> {
    /// The name of the token that delivered it.
    pub caller: &'a str,
    pub idempotency_key: &'a str,
    pub target_order_id: Option<Uuid>,
    pub target_hold_id: Option<Uuid>,
    pub result: PaymentResult,
    pub failure_reason: &'a str,
    pub amount_cents: i64,
    pub outcome: EventOutcome,
    pub order_id: Option<Uuid>,
    pub order_status: Option<OrderStatus>,
    pub processed_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// The event `caller` stored under this idempotency key, if any.
pub async fn find_event(
    conn: &mut AsyncPgConnection,
    caller: &str,
    key: &str,
) -> QueryResult<Option<PaymentEvent>> {
    payment_events::table
        .find((caller, key))
        .select(PaymentEvent::as_select())
        .first(conn)
        .await
        .optional()
}

/// Stores an event; `false` if its caller's key is already taken (by a concurrent delivery).
pub async fn insert_event(
    conn: &mut AsyncPgConnection,
    event: &NewPaymentEvent<'_>,
) -> QueryResult<bool> {
    // Columns as a tuple: from the struct, diesel would write `DEFAULT` for each `None`,
    // and such inserts are never kept prepared.
    let inserted = diesel::insert_into(payment_events::table)
        .values((
            payment_events::caller.eq(event.caller),
            payment_events::idempotency_key.eq(event.idempotency_key),
            payment_events::target_order_id.eq(event.target_order_id),
            payment_events::target_hold_id.eq(event.target_hold_id),
            payment_events::result.eq(event.result),
            payment_events::failure_reason.eq(event.failure_reason),
            payment_events::amount_cents.eq(event.amount_cents),
            payment_events::outcome.eq(event.outcome),
            payment_events::order_id.eq(event.order_id),
            payment_events::order_status.eq(event.order_status),
            payment_events::processed_at.eq(event.processed_at),
        ))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(inserted == 1)
}

/// The events deferred on `hold_id`, oldest first, row-locked until the transaction ends.
pub async fn lock_deferred_events(
    conn: &mut AsyncPgConnection,
    hold_id: Uuid,
) -> QueryResult<Vec<PaymentEvent>> {
    payment_events::table
        .filter(payment_events::target_hold_id.eq(hold_id))
        .filter(payment_events::outcome.eq(EventOutcome::Deferred))
        .order((
            payment_events::received_at,
            payment_events::caller,
            payment_events::idempotency_key,
        ))
        .select(PaymentEvent::as_select())
        .for_update()
        .load(conn)
        .await
}

/// Resolves a deferred event: it was applied to (or ignored by) `order_id`.
pub async fn resolve_event(
    conn: &mut AsyncPgConnection,
    event: &PaymentEvent,
    outcome: EventOutcome,
    order_id: Option<Uuid>,
    order_status: Option<OrderStatus>,
) -> QueryResult<()> {
    diesel::update(payment_events::table.find((&event.caller, &event.idempotency_key)))
        .set((
            payment_events::outcome.eq(outcome),
            payment_events::order_id.eq(order_id),
            payment_events::order_status.eq(order_status),
            payment_events::processed_at.eq(now),
        ))
        .execute(conn)
        .await
        .map(|_| ())
}

/// Closes as ignored every event deferred on these holds (they will never become orders).
pub async fn ignore_deferred_events(
    conn: &mut AsyncPgConnection,
    hold_ids: &[Uuid],
) -> QueryResult<usize> {
    diesel::update(
        payment_events::table
            .filter(payment_events::target_hold_id.eq_any(hold_ids))
            .filter(payment_events::outcome.eq(EventOutcome::Deferred)),
    )
    .set((
        payment_events::outcome.eq(EventOutcome::Ignored),
        payment_events::processed_at.eq(now),
    ))
    .execute(conn)
    .await
}
