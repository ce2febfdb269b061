//! Queries on `holds`.

use chrono::TimeDelta;
use diesel::dsl::now;
use diesel::prelude::*;
use diesel::result::DatabaseErrorKind;
use diesel::sql_types::{Array, BigInt, Bool, Integer, Interval, Nullable, Text, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::models::{Hold, HoldStatus, text_enum};
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

/// The hold `caller` created with this client request id, if any.
pub async fn find_hold_by_client_request_id(
    conn: &mut AsyncPgConnection,
    caller: &str,
    client_request_id: &str,
) -> QueryResult<Option<Hold>> {
    holds::table
        .filter(holds::caller.eq(caller))
        .filter(holds::client_request_id.eq(client_request_id))
        .select(Hold::as_select())
        .first(conn)
        .await
        .optional()
}

/// Releases the active holds of `hold_ids` that have no payment waiting on them, in one
/// statement (the database function `release_holds`): each is marked released and its
/// units go back as a counter movement. Returns the holds released; the others are the
/// caller's to handle one by one.
pub async fn release_holds(
    conn: &mut AsyncPgConnection,
    hold_ids: &[Uuid],
) -> QueryResult<Vec<Hold>> {
    CachedSql::new("SELECT * FROM release_holds(")
        .bind::<Array<SqlUuid>, _>(hold_ids)
        .sql(")")
        .load(conn)
        .await
}

/// Moves holds to `status` in one statement that stays prepared (see [`CachedSql`]): one
/// hold by its id, several (a reaper sweep) by an array; returns them as they are now.
pub async fn set_holds_status(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
    status: HoldStatus,
) -> QueryResult<Vec<Hold>> {
    let statement = CachedSql::new("UPDATE holds SET status = ")
        .bind::<Text, _>(status)
        .sql(", updated_at = now() WHERE id ");
    let statement = match ids {
        [] => return Ok(Vec::new()),
        [one] => statement.sql("= ").bind::<SqlUuid, _>(*one),
        many => statement
            .sql("= ANY(")
            .bind::<Array<SqlUuid>, _>(many)
            .sql(")"),
    };
    statement.sql(" RETURNING *").load(conn).await
}

/// Moves a hold's expiry to `ttl` from now, but not past `max_lifetime` after its
/// creation; returns it as it is now.
pub async fn extend_hold(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    ttl: TimeDelta,
    max_lifetime: TimeDelta,
) -> QueryResult<Hold> {
    CachedSql::new("UPDATE holds SET expires_at = least(now() + ")
        .bind::<Interval, _>(ttl)
        .sql(", created_at + ")
        .bind::<Interval, _>(max_lifetime)
        .sql("), updated_at = now() WHERE id = ")
        .bind::<SqlUuid, _>(id)
        .sql(" RETURNING *")
        .get_result(conn)
        .await
}

/// Up to `limit` active holds past their TTL, oldest expiry first, row-locked until the
/// transaction ends. Holds another transaction has locked (a concurrent CreateOrder,
/// another reaper) are skipped, not waited on.
pub async fn lock_due_holds(conn: &mut AsyncPgConnection, limit: i64) -> QueryResult<Vec<Hold>> {
    holds::table
        .filter(holds::status.eq(HoldStatus::Active))
        .filter(holds::expires_at.le(now))
        .order(holds::expires_at)
        .limit(limit)
        .select(Hold::as_select())
        .for_update()
        .skip_locked()
        .load(conn)
        .await
}

/// Seconds since the oldest active hold past its expiry expired (0 when none).
pub async fn oldest_overdue_hold_age(conn: &mut AsyncPgConnection) -> QueryResult<f64> {
    #[derive(QueryableByName)]
    struct Age {
        #[diesel(sql_type = diesel::sql_types::Double)]
        seconds: f64,
    }
    let age: Age = CachedSql::new(
        "SELECT coalesce(extract(epoch FROM now() - min(expires_at)), 0)::float8 AS seconds \
         FROM holds WHERE status = 'active' AND expires_at <= now()",
    )
    .get_result(conn)
    .await?;
    Ok(age.seconds)
}

/// One request of a batch for [`reserve_holds`].
#[derive(Debug, Clone)]
pub struct HoldRequestRow<'a> {
    /// The id the hold gets if granted.
    pub id: Uuid,
    pub product_id: Uuid,
    pub qty: i64,
    /// The name of the token asking; its client request id is unique among its holds.
    pub caller: &'a str,
    /// At most once per caller per batch.
    pub client_request_id: Option<&'a str>,
    /// The buyer, for its product's max_per_buyer.
    pub buyer_id: Option<&'a str>,
}

/// What [`reserve_holds`] did with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Its caller's client request id already named this hold; nothing was written.
    Existing(Hold),
    /// The new hold.
    Granted(Hold),
    /// Refused: its product had only `units_left` when its turn came.
    Insufficient { units_left: i64 },
    /// Its product does not exist.
    NoProduct,
    /// Its product's sale window has not opened yet.
    SaleNotStarted,
    /// Its product's sale window has closed.
    SaleEnded,
    /// Its product limits units per buyer, and it names no buyer.
    BuyerRequired,
    /// Its buyer may take only `remaining` more units of its product.
    BuyerLimit { remaining: i64 },
    /// A concurrent transaction took its client request id: nothing was written for it.
    KeyTaken,
}

text_enum! {
    /// The `outcome` column of `reserve_holds(...)`.
    enum ReservationOutcome {
        Existing, Granted, Insufficient, NoProduct, SaleNotStarted, SaleEnded, BuyerRequired,
        BuyerLimit, KeyTaken,
    }
}

/// One row of `reserve_holds(...)`.
#[derive(QueryableByName)]
struct ReservationRow {
    /// The request's 1-based position in the call.
    #[diesel(sql_type = Integer)]
    ord: i32,
    #[diesel(sql_type = Text)]
    outcome: ReservationOutcome,
    #[diesel(sql_type = Nullable<BigInt>)]
    units_left: Option<i64>,
    /// Set for `existing` and `granted`.
    #[diesel(embed)]
    hold: Option<Hold>,
}

/// The columns of a `reserve_holds(...) AS r` row (the function: `migrations/schema.sql`).
const RESERVATION_COLUMNS: &str = "
SELECT r.ord, r.outcome, r.units_left,
       r.hold_id AS id, r.hold_product_id AS product_id, r.hold_qty AS qty,
       r.hold_status AS status, r.hold_client_request_id AS client_request_id,
       r.hold_expires_at AS expires_at, r.hold_created_at AS created_at,
       r.hold_updated_at AS updated_at, r.hold_buyer_id AS buyer_id
FROM reserve_holds(";

/// Reserves a batch of hold requests in one statement: locks their products, grants stock
/// in request order as far as it goes, inserts the granted holds expiring after `ttl` and
/// adds their units to `reserved`. One answer per request, in order. Run outside a
/// transaction, it is one round trip and one commit.
///
/// The batch is inserted plainly first; if a concurrent transaction took one of its client
/// request ids after the function looked them up, the whole call fails and is undone, and
/// runs once more skipping taken keys (ON CONFLICT, which costs every row a speculative
/// insertion, so it is kept for this rare case).
pub async fn reserve_holds(
    conn: &mut AsyncPgConnection,
    requests: &[HoldRequestRow<'_>],
    ttl: TimeDelta,
) -> QueryResult<Vec<Reservation>> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    match reserve_holds_once(conn, requests, ttl, false).await {
        Err(diesel::result::Error::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {
            reserve_holds_once(conn, requests, ttl, true).await
        }
        reserved => reserved,
    }
}

/// One call of `reserve_holds`; `skip_taken_keys` chooses ON CONFLICT DO NOTHING over a
/// plain insert that fails on a taken key.
async fn reserve_holds_once(
    conn: &mut AsyncPgConnection,
    requests: &[HoldRequestRow<'_>],
    ttl: TimeDelta,
    skip_taken_keys: bool,
) -> QueryResult<Vec<Reservation>> {
    let ids: Vec<Uuid> = requests.iter().map(|row| row.id).collect();
    let (product_ids, request_products) = index_products(requests);
    let qtys: Vec<i64> = requests.iter().map(|row| row.qty).collect();
    let callers: Vec<&str> = requests.iter().map(|row| row.caller).collect();
    let keys: Vec<Option<&str>> = requests.iter().map(|row| row.client_request_id).collect();
    let buyers: Vec<Option<&str>> = requests.iter().map(|row| row.buyer_id).collect();
    // Arrays rather than a VALUES list, so the statement's text does not depend on the
    // batch size and stays prepared.
    let rows: Vec<ReservationRow> = CachedSql::new(RESERVATION_COLUMNS)
        .bind::<Array<SqlUuid>, _>(ids)
        .sql(", ")
        .bind::<Array<SqlUuid>, _>(product_ids)
        .sql(", ")
        .bind::<Array<Integer>, _>(request_products)
        .sql(", ")
        .bind::<Array<BigInt>, _>(qtys)
        .sql(", ")
        .bind::<Array<Text>, _>(callers)
        .sql(", ")
        .bind::<Array<Nullable<Text>>, _>(keys)
        .sql(", ")
        .bind::<Array<Nullable<Text>>, _>(buyers)
        .sql(", ")
        .bind::<Interval, _>(ttl)
        .sql(", ")
        .bind::<Bool, _>(skip_taken_keys)
        .sql(") AS r")
        .load(conn)
        .await?;
    let mut answers: Vec<Option<Reservation>> = vec![None; requests.len()];
    for row in rows {
        let slot = usize::try_from(row.ord - 1)
            .ok()
            .and_then(|index| answers.get_mut(index))
            .ok_or_else(|| unexpected(format!("reserve_holds answered position {}", row.ord)))?;
        *slot = Some(row.into_reservation()?);
    }
    answers
        .into_iter()
        .map(|answer| answer.ok_or_else(|| unexpected("reserve_holds left a request unanswered")))
        .collect()
}

/// The batch's distinct products in ascending order (the order `reserve_holds` locks them
/// in), and for each request the 1-based index of its product among them.
fn index_products(requests: &[HoldRequestRow<'_>]) -> (Vec<Uuid>, Vec<i32>) {
    let mut product_ids: Vec<Uuid> = requests.iter().map(|row| row.product_id).collect();
    product_ids.sort_unstable();
    product_ids.dedup();
    let request_products = requests
        .iter()
        .map(|row| {
            // Always found; 0 (like any index outside the array) would answer no_product.
            let index = product_ids
                .binary_search(&row.product_id)
                .map_or(0, |at| at + 1);
            i32::try_from(index).unwrap_or(0)
        })
        .collect();
    (product_ids, request_products)
}

impl ReservationRow {
    /// The typed answer.
    fn into_reservation(self) -> QueryResult<Reservation> {
        use ReservationOutcome as Outcome;
        Ok(match (self.outcome, self.hold, self.units_left) {
            (Outcome::Existing, Some(hold), _) => Reservation::Existing(hold),
            (Outcome::Granted, Some(hold), _) => Reservation::Granted(hold),
            (Outcome::Insufficient, None, Some(units_left)) => {
                Reservation::Insufficient { units_left }
            }
            (Outcome::NoProduct, None, _) => Reservation::NoProduct,
            (Outcome::SaleNotStarted, None, _) => Reservation::SaleNotStarted,
            (Outcome::SaleEnded, None, _) => Reservation::SaleEnded,
            (Outcome::BuyerRequired, None, _) => Reservation::BuyerRequired,
            (Outcome::BuyerLimit, None, Some(remaining)) => Reservation::BuyerLimit { remaining },
            (Outcome::KeyTaken, None, _) => Reservation::KeyTaken,
            (outcome, _, _) => {
                return Err(unexpected(format!(
                    "reserve_holds answered {outcome:?} with unexpected fields"
                )));
            }
        })
    }
}

/// A result the database function should never produce.
fn unexpected(message: impl Into<String>) -> diesel::result::Error {
    diesel::result::Error::DeserializationError(message.into().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(product_id: Uuid) -> HoldRequestRow<'static> {
        HoldRequestRow {
            id: Uuid::now_v7(),
            product_id,
            qty: 1,
            caller: "",
            client_request_id: None,
            buyer_id: None,
        }
    }

    #[test]
    fn products_are_listed_once_in_ascending_order_and_each_request_points_at_its_own() {
        let low = Uuid::from_u128(1);
        let high = Uuid::from_u128(2);
        let requests = [request(high), request(low), request(high)];

        let (product_ids, request_products) = index_products(&requests);

        assert_eq!(product_ids, vec![low, high]);
        assert_eq!(request_products, vec![2, 1, 2]);
    }
}
