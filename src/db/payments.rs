//! Queries on `payment_events`.

use chrono::{DateTime, TimeDelta, Utc};
use diesel::dsl::{now, sql};
use diesel::prelude::*;
use diesel::sql_types::{
    Array, BigInt, Bool, Interval, Nullable, Text, Timestamptz, Uuid as SqlUuid,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::models::{EventOutcome, Order, OrderStatus, PaymentEvent, PaymentResult};
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

/// One delivery for [`apply_payments`], reporting a payment for an order.
#[derive(Debug, Clone, Copy)]
pub struct OrderPayment<'a> {
    /// The name of the token that delivered it.
    pub caller: &'a str,
    pub idempotency_key: &'a str,
    pub order_id: Uuid,
    pub result: PaymentResult,
    pub failure_reason: &'a str,
    pub amount_cents: i64,
}

/// Settles the pending orders of `payments` in one statement (the database function
/// `apply_payments`): each delivery with a new key for a pending order before its deadline,
/// whose amount agrees, pays or cancels its order and is stored 'applied'. Returns the
/// orders settled; the deliveries it left alone are the caller's to handle one by one.
pub async fn apply_payments(
    conn: &mut AsyncPgConnection,
    payments: &[OrderPayment<'_>],
) -> QueryResult<Vec<Order>> {
    let callers: Vec<&str> = payments.iter().map(|payment| payment.caller).collect();
    let keys: Vec<&str> = payments
        .iter()
        .map(|payment| payment.idempotency_key)
        .collect();
    let results: Vec<&str> = payments
        .iter()
        .map(|payment| match payment.result {
            PaymentResult::Success => "success",
            PaymentResult::Failure => "failure",
        })
        .collect();
    let reasons: Vec<&str> = payments
        .iter()
        .map(|payment| payment.failure_reason)
        .collect();
    let order_ids: Vec<Uuid> = payments.iter().map(|payment| payment.order_id).collect();
    let amounts: Vec<i64> = payments
        .iter()
        .map(|payment| payment.amount_cents)
        .collect();
    CachedSql::new("SELECT * FROM apply_payments(")
        .bind::<Array<Text>, _>(callers)
        .sql(", ")
        .bind::<Array<Text>, _>(keys)
        .sql(", ")
        .bind::<Array<SqlUuid>, _>(order_ids)
        .sql(", ")
        .bind::<Array<Text>, _>(results)
        .sql(", ")
        .bind::<Array<Text>, _>(reasons)
        .sql(", ")
        .bind::<Array<BigInt>, _>(amounts)
        .sql(")")
        .load(conn)
        .await
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

/// Closes every event deferred on these holds (they will never become orders): a success
/// becomes a refund owed, a failure is ignored. A statement that stays prepared (see
/// [`CachedSql`]).
pub async fn close_deferred_events(
    conn: &mut AsyncPgConnection,
    hold_ids: &[Uuid],
) -> QueryResult<usize> {
    CachedSql::new(
        "UPDATE payment_events \
         SET outcome = CASE result WHEN 'success' THEN 'refund_required' ELSE 'ignored' END, \
             processed_at = now() \
         WHERE outcome = 'deferred' AND target_hold_id = ANY (",
    )
    .bind::<Array<SqlUuid>, _>(hold_ids)
    .sql(")")
    .execute(conn)
    .await
}

/// Where a page of refunds owed starts: after this event (its arrival time and key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefundCursor {
    pub received_at: DateTime<Utc>,
    pub caller: String,
    pub idempotency_key: String,
}

/// Up to `limit` refunds still owed, oldest first, after `after` if given.
pub async fn list_refunds_owed(
    conn: &mut AsyncPgConnection,
    after: Option<&RefundCursor>,
    limit: i64,
) -> QueryResult<Vec<PaymentEvent>> {
    let mut query = payment_events::table
        .filter(payment_events::outcome.eq(EventOutcome::RefundRequired))
        .filter(payment_events::refunded_at.is_null())
        .order((
            payment_events::received_at,
            payment_events::caller,
            payment_events::idempotency_key,
        ))
        .limit(limit)
        .select(PaymentEvent::as_select())
        .into_boxed();
    if let Some(after) = after {
        let later = sql::<Bool>("(received_at, caller, idempotency_key) > (")
            .bind::<Timestamptz, _>(after.received_at)
            .sql(", ")
            .bind::<Text, _>(after.caller.clone())
            .sql(", ")
            .bind::<Text, _>(after.idempotency_key.clone())
            .sql(")");
        query = query.filter(later);
    }
    query.load(conn).await
}

/// Marks a refund owed as made (keeping the first time it was marked); the event as it is
/// now, if `caller` stored one under `key`.
pub async fn mark_refunded(
    conn: &mut AsyncPgConnection,
    caller: &str,
    key: &str,
) -> QueryResult<Option<PaymentEvent>> {
    diesel::update(
        payment_events::table
            .find((caller, key))
            .filter(payment_events::outcome.eq(EventOutcome::RefundRequired)),
    )
    .set(
        payment_events::refunded_at
            .eq(sql::<Nullable<Timestamptz>>("coalesce(refunded_at, now())")),
    )
    .returning(PaymentEvent::as_returning())
    .get_result(conn)
    .await
    .optional()
}

/// Deletes up to `limit` events received longer than `retention` ago, oldest first:
/// neither those still waiting on their hold nor refunds still owed. Returns how many.
pub async fn delete_expired_events(
    conn: &mut AsyncPgConnection,
    retention: TimeDelta,
    limit: i64,
) -> QueryResult<usize> {
    CachedSql::new(
        "DELETE FROM payment_events WHERE (caller, idempotency_key) IN (\
         SELECT caller, idempotency_key FROM payment_events \
         WHERE received_at < now() - ",
    )
    .bind::<Interval, _>(retention)
    .sql(
        " AND outcome <> 'deferred' \
         AND NOT (outcome = 'refund_required' AND refunded_at IS NULL) \
         ORDER BY received_at LIMIT ",
    )
    .bind::<BigInt, _>(limit)
    .sql(" FOR UPDATE SKIP LOCKED)")
    .execute(conn)
    .await
}
