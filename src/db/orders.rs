//! Queries on `orders`.

use chrono::TimeDelta;
use diesel::dsl::now;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Interval, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::models::{CancelReason, Hold, Order, OrderStatus};
use super::schema::orders;

/// Inserts the pending order for `hold`, due for payment `payment_ttl` from now by the
/// database's clock (the unique `hold_id` refuses a second order). A statement that stays
/// prepared (see [`CachedSql`]).
pub async fn insert_order(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
    total_cents: i64,
    payment_ttl: TimeDelta,
) -> QueryResult<Order> {
    CachedSql::new(
        "INSERT INTO orders (id, hold_id, product_id, qty, total_cents, status, payment_due_at) \
         VALUES (",
    )
    .bind::<SqlUuid, _>(Uuid::now_v7())
    .sql(", ")
    .bind::<SqlUuid, _>(hold.id)
    .sql(", ")
    .bind::<SqlUuid, _>(hold.product_id)
    .sql(", ")
    .bind::<BigInt, _>(hold.qty)
    .sql(", ")
    .bind::<BigInt, _>(total_cents)
    .sql(", 'pending', now() + ")
    .bind::<Interval, _>(payment_ttl)
    .sql(") RETURNING *")
    .get_result(conn)
    .await
}

/// Turns the active holds of `hold_ids` (within their TTL, no payment waiting on them) into
/// pending orders with the ids at the same positions of `order_ids`, in one statement (the
/// database function `create_orders`); returns the orders made. The holds it leaves alone
/// are the caller's to handle one by one.
pub async fn create_orders(
    conn: &mut AsyncPgConnection,
    hold_ids: &[Uuid],
    order_ids: &[Uuid],
    payment_ttl: TimeDelta,
) -> QueryResult<Vec<Order>> {
    CachedSql::new("SELECT * FROM create_orders(")
        .bind::<Array<SqlUuid>, _>(hold_ids)
        .sql(", ")
        .bind::<Array<SqlUuid>, _>(order_ids)
        .sql(", ")
        .bind::<Interval, _>(payment_ttl)
        .sql(")")
        .load(conn)
        .await
}

/// One order by id.
pub async fn find_order(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Order>> {
    orders::table
        .find(id)
        .select(Order::as_select())
        .first(conn)
        .await
        .optional()
}

/// The order made from `hold_id`, if any.
pub async fn find_order_by_hold(
    conn: &mut AsyncPgConnection,
    hold_id: Uuid,
) -> QueryResult<Option<Order>> {
    orders::table
        .filter(orders::hold_id.eq(hold_id))
        .select(Order::as_select())
        .first(conn)
        .await
        .optional()
}

/// One order by id, row-locked until the transaction ends, with whether its payment
/// deadline has passed by the database's clock.
pub async fn lock_order(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> QueryResult<Option<(Order, bool)>> {
    orders::table
        .find(id)
        .select((Order::as_select(), orders::payment_due_at.le(now)))
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Up to `limit` pending orders past their payment deadline, oldest deadline first,
/// row-locked; orders locked elsewhere (a webhook, CancelOrder, another reaper) are skipped.
pub async fn lock_overdue_orders(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> QueryResult<Vec<Order>> {
    orders::table
        .filter(orders::status.eq(OrderStatus::Pending))
        .filter(orders::payment_due_at.le(now))
        .order(orders::payment_due_at)
        .limit(limit)
        .select(Order::as_select())
        .for_update()
        .skip_locked()
        .load(conn)
        .await
}

/// Moves an order to a final status (a statement that stays prepared: see [`CachedSql`]);
/// `cancel_reason` is set exactly for `Cancelled`.
pub async fn settle_order(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    status: OrderStatus,
    failure_reason: &str,
    cancel_reason: Option<CancelReason>,
) -> QueryResult<Order> {
    CachedSql::new("UPDATE orders SET status = ")
        .bind::<Text, _>(status)
        .sql(", failure_reason = ")
        .bind::<Text, _>(failure_reason)
        .sql(", cancel_reason = ")
        .bind::<Nullable<Text>, _>(cancel_reason)
        .sql(", updated_at = now() WHERE id = ")
        .bind::<SqlUuid, _>(id)
        .sql(" RETURNING *")
        .get_result(conn)
        .await
}

/// Cancels pending orders for `reason` in one statement; returns them as they are now.
pub async fn cancel_orders(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    reason: CancelReason,
) -> QueryResult<Vec<Order>> {
    CachedSql::new("UPDATE orders SET status = 'cancelled', cancel_reason = ")
        .bind::<Text, _>(reason)
        .sql(", updated_at = now() WHERE id = ANY (")
        .bind::<Array<SqlUuid>, _>(ids)
        .sql(") RETURNING *")
        .load(conn)
        .await
}
