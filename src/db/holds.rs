//! Queries on `holds`.

use chrono::{DateTime, Utc};
use diesel::dsl::now;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::models::{Hold, HoldStatus};
use super::schema::holds;

/// One hold by id.
pub async fn find_hold(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Hold>> {
    holds::table
        .find(id)
        .select(Hold::as_select())
        .first(conn)
        .await
        .optional()
}

/// One hold by id, row-locked until the transaction ends, with whether its TTL has passed
/// by the database's clock.
pub async fn lock_hold(
    conn: &mut AsyncPgConnection,
    id: Uuid,
) -> QueryResult<Option<(Hold, bool)>> {
    holds::table
        .find(id)
        .select((Hold::as_select(), holds::expires_at.le(now)))
        .for_update()
        .first(conn)
        .await
        .optional()
}

/// The hold created with this client request id, if any.
pub async fn find_hold_by_client_request_id(
    conn: &mut AsyncPgConnection,
    client_request_id: &str,
) -> QueryResult<Option<Hold>> {
    holds::table
        .filter(holds::client_request_id.eq(client_request_id))
        .select(Hold::as_select())
        .first(conn)
        .await
        .optional()
}

/// Moves a hold to `status`.
pub async fn set_hold_status(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    status: HoldStatus,
) -> QueryResult<Hold> {
    diesel::update(holds::table.find(id))
        .set((holds::status.eq(status), holds::updated_at.eq(now)))
        .returning(Hold::as_returning())
        .get_result(conn)
        .await
}

/// Claims up to `limit` active holds past their TTL and marks them expired. Holds another
/// transaction has locked (a concurrent CreateOrder, another reaper) are skipped, not waited on.
pub async fn expire_due_holds(conn: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<Hold>> {
    let due: Vec<Uuid> = holds::table
        .filter(holds::status.eq(HoldStatus::Active))
        .filter(holds::expires_at.le(now))
        .order(holds::expires_at)
        .limit(limit)
        .select(holds::id)
        .for_update()
        .skip_locked()
        .load(conn)
        .await?;
    if due.is_empty() {
        return Ok(Vec::new());
    }
    diesel::update(holds::table.filter(holds::id.eq_any(&due)))
        .set((
            holds::status.eq(HoldStatus::Expired),
            holds::updated_at.eq(now),
        ))
        .returning(Hold::as_returning())
        .get_results(conn)
        .await
}

/// A hold to insert with [`insert_holds_and_reserve`].
#[derive(Debug, Clone)]
pub struct NewHoldRow<'a> {
    pub id: Uuid,
    pub product_id: Uuid,
    pub qty: i64,
    pub client_request_id: Option<&'a str>,
}

/// One statement for any number of rows (arrays, not a VALUES list whose length changes the
/// SQL), so PostgreSQL plans it once per connection. It inserts the holds and adds the units
/// of those it inserted to their products' `reserved`, each update guarded like
/// [`super::products::apply_stock_change`]; one statement saves a round trip while the
/// products are locked.
const INSERT_HOLDS_AND_RESERVE_SQL: &str = "
WITH inserted AS (
    INSERT INTO holds (id, product_id, qty, status, client_request_id, expires_at, created_at, updated_at)
    SELECT id, product_id, qty, 'active', client_request_id, $5, $6, $6
    FROM unnest($1::uuid[], $2::uuid[], $3::int8[], $4::text[]) AS row(id, product_id, qty, client_request_id)
    ON CONFLICT DO NOTHING
    RETURNING id, product_id, qty, status, client_request_id, expires_at, created_at, updated_at
), units AS (
    SELECT product_id, sum(qty)::int8 AS total FROM inserted GROUP BY product_id
), reserved AS (
    UPDATE products SET reserved = products.reserved + units.total
    FROM units
    WHERE products.id = units.product_id
      AND products.stock_total - products.reserved - products.sold >= units.total
    RETURNING products.id
)
SELECT inserted.*, (SELECT count(*) FROM units) AS products_held,
       (SELECT count(*) FROM reserved) AS products_reserved
FROM inserted";

/// A hold inserted by [`insert_holds_and_reserve`], with the statement's product counts.
#[derive(QueryableByName)]
struct ReservedHold {
    #[diesel(embed)]
    hold: Hold,
    /// Products the inserted holds name.
    #[diesel(sql_type = BigInt)]
    products_held: i64,
    /// Of those, products whose `reserved` took the units.
    #[diesel(sql_type = BigInt)]
    products_reserved: i64,
}

/// Inserts active holds created at `created_at` and expiring at `expires_at` and reserves
/// their units, in one statement; a row whose client request id is already taken (by a
/// concurrent transaction) is skipped, so only the inserted rows come back. `None` when a
/// product could not take its units (its row was not locked first): roll back then.
pub async fn insert_holds_and_reserve(
    conn: &mut AsyncPgConnection,
    rows: &[NewHoldRow<'_>],
    created_at: DateTime<Utc>,
    expires_at: DateTime<Utc>,
) -> QueryResult<Option<Vec<Hold>>> {
    if rows.is_empty() {
        return Ok(Some(Vec::new()));
    }
    let ids: Vec<Uuid> = rows.iter().map(|row| row.id).collect();
    let product_ids: Vec<Uuid> = rows.iter().map(|row| row.product_id).collect();
    let qtys: Vec<i64> = rows.iter().map(|row| row.qty).collect();
    let keys: Vec<Option<&str>> = rows.iter().map(|row| row.client_request_id).collect();
    let inserted: Vec<ReservedHold> = diesel::sql_query(INSERT_HOLDS_AND_RESERVE_SQL)
        .bind::<Array<SqlUuid>, _>(ids)
        .bind::<Array<SqlUuid>, _>(product_ids)
        .bind::<Array<BigInt>, _>(qtys)
        .bind::<Array<Nullable<Text>>, _>(keys)
        .bind::<Timestamptz, _>(expires_at)
        .bind::<Timestamptz, _>(created_at)
        .load(conn)
        .await?;
    if inserted
        .iter()
        .any(|row| row.products_reserved != row.products_held)
    {
        return Ok(None);
    }
    Ok(Some(inserted.into_iter().map(|row| row.hold).collect()))
}

/// The holds created with any of these client request ids.
pub async fn find_holds_by_client_request_ids(
    conn: &mut AsyncPgConnection,
    client_request_ids: &[&str],
) -> QueryResult<Vec<Hold>> {
    if client_request_ids.is_empty() {
        return Ok(Vec::new());
    }
    holds::table
        .filter(holds::client_request_id.eq_any(client_request_ids))
        .select(Hold::as_select())
        .load(conn)
        .await
}
