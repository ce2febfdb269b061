//! Queries on `orders`.

use diesel::prelude::*;
use diesel::sql_types::{Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::models::{Hold, Order, OrderStatus};
use super::schema::orders;

/// Inserts the pending order for `hold` (the unique `hold_id` refuses a second one).
pub async fn insert_order(
    conn: &mut AsyncPgConnection,
    hold: &Hold,
    total_cents: i64,
) -> QueryResult<Order> {
    diesel::insert_into(orders::table)
        .values((
            orders::id.eq(Uuid::now_v7()),
            orders::hold_id.eq(hold.id),
            orders::product_id.eq(hold.product_id),
            orders::qty.eq(hold.qty),
            orders::total_cents.eq(total_cents),
            orders::status.eq(OrderStatus::Pending),
        ))
        .returning(Order::as_returning())
        .get_result(conn)
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

/// One order by id, row-locked until the transaction ends.
pub async fn lock_order(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Order>> {
    orders::table
        .find(id)
        .select(Order::as_select())
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// Moves an order to a final status (a statement that stays prepared: see [`CachedSql`]).
pub async fn settle_order(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    status: OrderStatus,
    failure_reason: &str,
) -> QueryResult<Order> {
    CachedSql::new("UPDATE orders SET status = ")
        .bind::<Text, _>(status)
        .sql(", failure_reason = ")
        .bind::<Text, _>(failure_reason)
        .sql(", updated_at = now() WHERE id = ")
        .bind::<SqlUuid, _>(id)
        .sql(" RETURNING *")
        .get_result(conn)
        .await
}
