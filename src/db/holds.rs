//! Queries on `holds`.

use chrono::{DateTime, Utc};
use diesel::dsl::now;
use diesel::prelude::*;
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

/// A hold row to insert, with its timestamps fixed by the caller (from the database clock).
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = holds)]
pub struct NewHoldRow<'a> {
    pub id: Uuid,
    pub product_id: Uuid,
    pub qty: i64,
    pub status: HoldStatus,
    pub client_request_id: Option<&'a str>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Inserts many holds in one statement; a row whose client request id is already taken (by
/// a concurrent transaction) is skipped, so only the inserted rows come back.
pub async fn insert_holds(
    conn: &mut AsyncPgConnection,
    rows: &[NewHoldRow<'_>],
) -> QueryResult<Vec<Hold>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    diesel::insert_into(holds::table)
        .values(rows)
        .on_conflict_do_nothing()
        .returning(Hold::as_returning())
        .get_results(conn)
        .await
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
