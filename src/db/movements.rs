//! Queries on `stock_movements`: counter movements of settled orders and released holds,
//! waiting to be folded into their products' counters (migration 2026-11-23-000004).

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::products::StockChange;
use super::schema::stock_movements;

/// Records the counter movement of a hold's units without touching its product's row.
pub async fn insert_movement(
    conn: &mut AsyncPgConnection,
    hold_id: Uuid,
    product_id: Uuid,
    change: StockChange,
) -> QueryResult<()> {
    diesel::insert_into(stock_movements::table)
        .values((
            stock_movements::product_id.eq(product_id),
            stock_movements::hold_id.eq(hold_id),
            stock_movements::reserved_delta.eq(change.reserved),
            stock_movements::sold_delta.eq(change.sold),
        ))
        .execute(conn)
        .await
        .map(|_| ())
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
