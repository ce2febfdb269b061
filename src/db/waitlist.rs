//! Queries on `waiters`: the waitlist's database functions (join_waitlist, leave_waitlist,
//! serve_waiters, end_waiters; `migrations/schema.sql`) and the state of waiters.

use chrono::TimeDelta;
use diesel::QueryableByName;
use diesel::sql_types::{Array, BigInt, Int4, Interval, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;

/// Who joins, for what.
#[derive(Debug, Clone, Copy)]
pub struct NewWaiter<'a> {
    pub product_id: Uuid,
    pub qty: i64,
    pub buyer_id: Option<&'a str>,
    /// The name of the caller's token.
    pub caller: &'a str,
    /// The TTL of the hold the waiter gets.
    pub hold_ttl: TimeDelta,
    /// The advisory-lock key this process holds while it lives.
    pub session: i64,
}

/// One waiter as it is now, with its place in line while it waits.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct WaiterState {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = SqlUuid)]
    pub product_id: Uuid,
    /// 'waiting', 'served', 'left' or 'ended'.
    #[diesel(sql_type = Text)]
    pub status: String,
    /// Why an 'ended' waiter was turned away.
    #[diesel(sql_type = Nullable<Text>)]
    pub end_reason: Option<String>,
    /// A 'served' waiter's hold.
    #[diesel(sql_type = Nullable<SqlUuid>)]
    pub hold_id: Option<Uuid>,
    /// 1 for the next to be served; 0 once no longer waiting.
    #[diesel(sql_type = BigInt)]
    pub position: i64,
}

/// The id join_waitlist answers.
#[derive(QueryableByName)]
struct Joined {
    #[diesel(sql_type = BigInt)]
    value: i64,
}

/// Puts a waiter in line (and serves the line); its id. Refusals are raised by the
/// function: see `join_waitlist` in `migrations/schema.sql`.
pub async fn join_waitlist(
    conn: &mut AsyncPgConnection,
    new: &NewWaiter<'_>,
) -> diesel::QueryResult<i64> {
    let row: Joined = CachedSql::new("SELECT join_waitlist(")
        .bind::<SqlUuid, _>(new.product_id)
        .sql(", ")
        .bind::<BigInt, _>(new.qty)
        .sql(", ")
        .bind::<Nullable<Text>, _>(new.buyer_id)
        .sql(", ")
        .bind::<Text, _>(new.caller)
        .sql(", ")
        .bind::<Interval, _>(new.hold_ttl)
        .sql(", ")
        .bind::<BigInt, _>(new.session)
        .sql(") AS value")
        .get_result(conn)
        .await?;
    Ok(row.value)
}

/// Takes a waiter out of line if it still waits (and serves the line); its state after.
pub async fn leave_waitlist(
    conn: &mut AsyncPgConnection,
    waiter_id: i64,
) -> diesel::QueryResult<Option<WaiterState>> {
    CachedSql::new("SELECT * FROM leave_waitlist(")
        .bind::<BigInt, _>(waiter_id)
        .sql(")")
        .execute(conn)
        .await?;
    Ok(waiter_states(conn, &[waiter_id]).await?.pop())
}

/// The waiters among `ids`, with their places in line.
pub async fn waiter_states(
    conn: &mut AsyncPgConnection,
    ids: &[i64],
) -> diesel::QueryResult<Vec<WaiterState>> {
    CachedSql::new(
        "SELECT w.id, w.product_id, w.status, w.end_reason, w.hold_id, \
         CASE WHEN w.status = 'waiting' THEN (SELECT count(*) FROM waiters q \
              WHERE q.product_id = w.product_id AND q.status = 'waiting' AND q.id <= w.id) \
              ELSE 0 END AS position \
         FROM waiters w WHERE w.id = ANY (",
    )
    .bind::<Array<BigInt>, _>(ids)
    .sql(")")
    .load(conn)
    .await
}

/// Serves the lines of these products from their available units; how many were served.
pub async fn serve_waiters(
    conn: &mut AsyncPgConnection,
    product_ids: &[Uuid],
) -> diesel::QueryResult<()> {
    CachedSql::new("SELECT serve_waiters(")
        .bind::<Array<SqlUuid>, _>(product_ids)
        .sql(")")
        .execute(conn)
        .await
        .map(drop)
}

/// Turns every waiter of these products away, for `reason` ('sale_ended' or
/// 'stock_withdrawn').
pub async fn end_waiters(
    conn: &mut AsyncPgConnection,
    product_ids: &[Uuid],
    reason: &'static str,
) -> diesel::QueryResult<()> {
    CachedSql::new("SELECT end_waiters(")
        .bind::<Array<SqlUuid>, _>(product_ids)
        .sql(", ")
        .bind::<Text, _>(reason)
        .sql(")")
        .execute(conn)
        .await
        .map(drop)
}

/// Turns away the waiters of every product whose sale has ended; how many products.
pub async fn end_waiters_of_ended_sales(conn: &mut AsyncPgConnection) -> diesel::QueryResult<i32> {
    #[derive(QueryableByName)]
    struct Ended {
        #[diesel(sql_type = Int4)]
        products: i32,
    }
    let ended: Ended = CachedSql::new(
        "WITH ended AS (SELECT coalesce(array_agg(id), '{}') AS ids FROM products \
         WHERE waiting > 0 AND sale_ends_at <= now()) \
         SELECT cardinality(ids) AS products, end_waiters(ids, 'sale_ended') FROM ended",
    )
    .get_result(conn)
    .await?;
    Ok(ended.products)
}
