//! Queries on `products` and `stock_adjustments`. The stock counters change in three
//! places, each under the product's row lock: [`apply_stock_change`] (a guarded `UPDATE`:
//! restocks and withdrawals), hold batches (`super::holds::reserve_holds`) and
//! folds of counter movements (`super::movements::fold_movements`).

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

use super::cached_sql::CachedSql;
use super::models::Product;
use super::schema::{products, stock_adjustments};

/// A change to one product's counters, applied atomically.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StockChange {
    /// Added to `stock_total` (restock > 0, withdrawal < 0).
    pub total: i64,
    /// Added to `reserved` (hold > 0, release or settlement < 0).
    pub reserved: i64,
    /// Added to `sold` (payment succeeded > 0).
    pub sold: i64,
}

impl StockChange {
    /// Units that must be available for the change to keep `available >= 0`.
    fn units_needed(self) -> i64 {
        self.reserved + self.sold - self.total
    }
}

/// Who asked for a write, and the retry key they gave it.
#[derive(Debug, Clone, Copy)]
pub struct Requester<'a> {
    /// The name of the caller's token (`""` on a server without tokens).
    pub caller: &'a str,
    /// The caller's retry key, if any.
    pub request_id: Option<&'a str>,
}

/// The terms a product is sold on: a per-buyer limit and a sale window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SaleTerms {
    /// Most units per buyer; 0: no limit.
    pub max_per_buyer: i64,
    /// Holds are granted from here (if set)...
    pub sale_starts_at: Option<DateTime<Utc>>,
    /// ...until before here (if set).
    pub sale_ends_at: Option<DateTime<Utc>>,
}

impl From<&Product> for SaleTerms {
    fn from(product: &Product) -> Self {
        SaleTerms {
            max_per_buyer: product.max_per_buyer,
            sale_starts_at: product.sale_starts_at,
            sale_ends_at: product.sale_ends_at,
        }
    }
}

/// Inserts a product and records its initial stock as its first adjustment.
pub async fn insert_product(
    conn: &mut AsyncPgConnection,
    name: &str,
    price_cents: i64,
    stock_total: i64,
    terms: SaleTerms,
    by: Requester<'_>,
) -> QueryResult<Product> {
    let product: Product = diesel::insert_into(products::table)
        .values((
            products::id.eq(Uuid::now_v7()),
            products::name.eq(name),
            products::price_cents.eq(price_cents),
            products::stock_total.eq(stock_total),
            products::caller.eq(by.caller),
            products::request_id.eq(by.request_id),
            products::max_per_buyer.eq(terms.max_per_buyer),
            products::sale_starts_at.eq(terms.sale_starts_at),
            products::sale_ends_at.eq(terms.sale_ends_at),
        ))
        .returning(Product::as_returning())
        .get_result(conn)
        .await?;
    let initial = Requester {
        caller: by.caller,
        request_id: None,
    };
    insert_adjustment(conn, product.id, stock_total, initial).await?;
    Ok(product)
}

/// Records a change of `stock_total` for the audit, with who asked for it.
pub async fn insert_adjustment(
    conn: &mut AsyncPgConnection,
    product_id: Uuid,
    delta: i64,
    by: Requester<'_>,
) -> QueryResult<()> {
    diesel::insert_into(stock_adjustments::table)
        .values((
            stock_adjustments::product_id.eq(product_id),
            stock_adjustments::delta.eq(delta),
            stock_adjustments::caller.eq(by.caller),
            stock_adjustments::request_id.eq(by.request_id),
        ))
        .execute(conn)
        .await
        .map(|_| ())
}

/// The product `caller` created with this request id, and the initial stock it was
/// created with (its first adjustment).
pub async fn find_product_by_request_id(
    conn: &mut AsyncPgConnection,
    caller: &str,
    request_id: &str,
) -> QueryResult<Option<(Product, i64)>> {
    let initial_stock = stock_adjustments::table
        .filter(stock_adjustments::product_id.eq(products::id))
        .order(stock_adjustments::id)
        .select(stock_adjustments::delta)
        .limit(1)
        .single_value()
        .assume_not_null();
    products::table
        .filter(products::caller.eq(caller))
        .filter(products::request_id.eq(request_id))
        .select((Product::as_select(), initial_stock))
        .first(conn)
        .await
        .optional()
}

/// The product and delta of the stock change `caller` made with this request id.
pub async fn find_adjustment_by_request_id(
    conn: &mut AsyncPgConnection,
    caller: &str,
    request_id: &str,
) -> QueryResult<Option<(Uuid, i64)>> {
    stock_adjustments::table
        .filter(stock_adjustments::caller.eq(caller))
        .filter(stock_adjustments::request_id.eq(request_id))
        .select((stock_adjustments::product_id, stock_adjustments::delta))
        .first(conn)
        .await
        .optional()
}

/// One product by id, row-locked until the transaction ends.
pub async fn lock_product(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Product>> {
    products::table
        .find(id)
        .select(Product::as_select())
        .for_no_key_update()
        .first(conn)
        .await
        .optional()
}

/// Sets a product's sale terms (its version grows and watchers are told, by trigger).
pub async fn set_sale_terms(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    terms: SaleTerms,
) -> QueryResult<Product> {
    diesel::update(products::table.find(id))
        .set((
            products::max_per_buyer.eq(terms.max_per_buyer),
            products::sale_starts_at.eq(terms.sale_starts_at),
            products::sale_ends_at.eq(terms.sale_ends_at),
        ))
        .returning(Product::as_returning())
        .get_result(conn)
        .await
}

/// One product by id.
pub async fn find_product(conn: &mut AsyncPgConnection, id: Uuid) -> QueryResult<Option<Product>> {
    products::table
        .find(id)
        .select(Product::as_select())
        .first(conn)
        .await
        .optional()
}

/// The products among `ids` that exist, in id order.
pub async fn find_products(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> QueryResult<Vec<Product>> {
    products::table
        .filter(products::id.eq_any(ids))
        .order(products::id)
        .select(Product::as_select())
        .load(conn)
        .await
}

/// Up to `limit` products with ids after `after`, in id (creation) order.
pub async fn list_products(
    conn: &mut AsyncPgConnection,
    after: Option<Uuid>,
    limit: i64,
) -> QueryResult<Vec<Product>> {
    let mut query = products::table
        .order(products::id)
        .limit(limit)
        .select(Product::as_select())
        .into_boxed();
    if let Some(after) = after {
        query = query.filter(products::id.gt(after));
    }
    query.load(conn).await
}

/// How many products [`all_products`] reads per query.
const ALL_PRODUCTS_PAGE: i64 = 1000;

/// Every product, in id order, read page by page.
pub async fn all_products(conn: &mut AsyncPgConnection) -> QueryResult<Vec<Product>> {
    let mut all: Vec<Product> = Vec::new();
    loop {
        let page = list_products(conn, all.last().map(|p| p.id), ALL_PRODUCTS_PAGE).await?;
        let done = (page.len() as i64) < ALL_PRODUCTS_PAGE;
        all.extend(page);
        if done {
            return Ok(all);
        }
    }
}

/// Applies `change` if the product would keep `available >= 0`; `None` if it would not (or
/// the product does not exist). Takes the product's row lock until the transaction ends. A
/// statement that stays prepared (see [`CachedSql`]).
pub async fn apply_stock_change(
    conn: &mut AsyncPgConnection,
    id: Uuid,
    change: StockChange,
) -> QueryResult<Option<Product>> {
    CachedSql::new("UPDATE products SET stock_total = stock_total + ")
        .bind::<BigInt, _>(change.total)
        .sql(", reserved = reserved + ")
        .bind::<BigInt, _>(change.reserved)
        .sql(", sold = sold + ")
        .bind::<BigInt, _>(change.sold)
        .sql(" WHERE id = ")
        .bind::<SqlUuid, _>(id)
        .sql(" AND stock_total - reserved - sold >= ")
        .bind::<BigInt, _>(change.units_needed())
        .sql(" RETURNING *")
        .get_result(conn)
        .await
        .optional()
}
