//! Queries on `stock_movements`: counter movements of settled orders and ended holds,
//! waiting to be folded into their products' counters (`fold_stock_movements`).

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::products::StockChange;
use super::schema::stock_movements;

/// A counter movement to record: a hold's units going back (released, expired, order
/// cancelled) or on to `sold` (order paid).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "the units move only once the movement is recorded"]
pub struct NewMovement {
    /// The hold whose units move.
    pub hold_id: Uuid,
    /// Its product.
    pub product_id: Uuid,
    /// Only ever lowers `reserved` (and may raise `sold` by as much).
    pub change: StockChange,
}

/// Records counter movements without touching their products' rows, in one statement
/// that stays prepared (see [`CachedSql`]): one movement (a settlement, a release) as a
/// plain row, several (a reaper sweep) as arrays.
pub async fn insert_movements(
    conn: &mut AsyncPgConnection,
    movements: &[NewMovement],
) -> QueryResult<()> {
    let statement = match movements {
        [] => return Ok(()),
        [one] => CachedSql::new(
            "INSERT INTO stock_movements (hold_id, product_id, reserved_delta, sold_delta) \
             VALUES (",
        )
        .bind::<SqlUuid, _>(one.hold_id)
        .sql(", ")
        .bind::<SqlUuid, _>(one.product_id)
        .sql(", ")
        .bind::<BigInt, _>(one.change.reserved)
        .sql(", ")
        .bind::<BigInt, _>(one.change.sold)
        .sql(")"),
        many => {
            let column = |get: fn(&NewMovement) -> i64| many.iter().map(get).collect::<Vec<_>>();
            CachedSql::new(
                "INSERT INTO stock_movements (hold_id, product_id, reserved_delta, sold_delta) \
                 SELECT * FROM unnest(",
            )
            .bind::<Array<SqlUuid>, _>(many.iter().map(|m| m.hold_id).collect::<Vec<_>>())
            .sql(", ")
            .bind::<Array<SqlUuid>, _>(many.iter().map(|m| m.product_id).collect::<Vec<_>>())
            .sql(", ")
            .bind::<Array<BigInt>, _>(column(|m| m.change.reserved))
            .sql(", ")
            .bind::<Array<BigInt>, _>(column(|m| m.change.sold))
            .sql(")")
        }
    };
    statement.execute(conn).await.map(|_| ())
}

/// The folded count `fold_stock_movements` returns.
#[derive(QueryableByName)]
struct Folded {
    #[diesel(sql_type = BigInt)]
    folded: i64,
}

/// Folds every movement committed so far for these products into their counters (locking
/// them in id order); run outside a transaction it is one round trip and one commit.
/// Returns how many movements it folded.
pub async fn fold_movements(
    conn: &mut AsyncPgConnection,
    product_ids: &[Uuid],
) -> QueryResult<i64> {
    CachedSql::new("SELECT fold_stock_movements(")
        .bind::<Array<SqlUuid>, _>(product_ids)
        .sql(") AS folded")
        .get_result::<Folded>(conn)
        .await
        .map(|row| row.folded)
}

/// Up to `limit` products with movements waiting to be folded.
pub async fn products_with_movements(
    conn: &mut AsyncPgConnection,
    limit: i64,
) -> QueryResult<Vec<Uuid>> {
    stock_movements::table
        .select(stock_movements::product_id)
        .distinct()
        .limit(limit)
        .load(conn)
        .await
}
