//! Queries on `holds`.

use std::time::Duration;

use diesel::dsl::{now, sql};
use diesel::pg::data_types::PgInterval;
use diesel::prelude::*;
use diesel::sql_types::{Interval, Timestamptz};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::models::{Hold, HoldStatus};
use super::schema::holds;

/// Inserts an active hold that expires `ttl` from now by the database's clock (one clock
/// for every server process).
pub async fn insert_hold(
    conn: &mut AsyncPgConnection,
    product_id: Uuid,
    qty: i64,
    client_request_id: Option<&str>,
    ttl: Duration,
) -> QueryResult<Hold> {
    let ttl = PgInterval::from_microseconds(i64::try_from(ttl.as_micros()).unwrap_or(i64::MAX));
    diesel::insert_into(holds::table)
        .values((
            holds::id.eq(Uuid::now_v7()),
            holds::product_id.eq(product_id),
            holds::qty.eq(qty),
            holds::status.eq(HoldStatus::Active),
            holds::client_request_id.eq(client_request_id),
            holds::expires_at.eq(sql::<Timestamptz>("now() + ").bind::<Interval, _>(ttl)),
        ))
        .returning(Hold::as_returning())
        .get_result(conn)
        .await
}

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
