//! Products: catalogue, stock adjustments, listing, and the inventory audit.

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use diesel_async::{AsyncConnection, AsyncPgConnection};
use uuid::Uuid;

use super::{Caller, Checkout, DomainError, check_key, check_text, retryable};
use crate::db::audit::{AuditRow, audit_products};
use crate::db::models::Product;
use crate::db::movements::fold_movements;
use crate::db::products::{self as queries, Requester, SaleTerms, StockChange};
use crate::db::waitlist::{end_waiters, serve_waiters};

/// Largest page ListProducts returns.
pub const MAX_PAGE_SIZE: i64 = 1000;
/// Most products one AuditInventory call may name (none audits them all).
pub const MAX_AUDITED_PRODUCTS: usize = 1000;
/// Page size when the caller asks for none.
pub const DEFAULT_PAGE_SIZE: i64 = 100;
/// Largest stock a product may carry; keeps every sum of counters far from overflow.
pub const MAX_STOCK: i64 = 1_000_000_000_000;
/// Largest price of a unit; the total of the largest hold (see
/// [`super::MAX_QTY_PER_HOLD`]) stays far from overflow.
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;

/// A product to create.
#[derive(Debug, Clone)]
pub struct NewProduct {
    pub name: String,
    pub price_cents: i64,
    pub stock_total: i64,
    /// The per-buyer limit and the sale window.
    pub terms: SaleTerms,
    /// Who asks; its request ids are its own.
    pub caller: Caller,
    /// The caller's retry key: the same key returns the product it created.
    pub request_id: Option<String>,
}

/// Which sale terms UpdateProduct changes: each `Some` replaces the current value.
#[derive(Debug, Clone, Default)]
pub struct TermsUpdate {
    pub max_per_buyer: Option<i64>,
    /// `Some(None)` clears the bound.
    pub sale_starts_at: Option<Option<DateTime<Utc>>>,
    pub sale_ends_at: Option<Option<DateTime<Utc>>>,
}

/// A change of one product's stock to make.
#[derive(Debug, Clone)]
pub struct StockAdjustment {
    pub product_id: Uuid,
    /// Restock (> 0) or withdrawal (< 0).
    pub delta: i64,
    /// Who asks; its request ids are its own.
    pub caller: Caller,
    /// The caller's retry key: the same key changes the stock once.
    pub request_id: Option<String>,
}

/// One page of products.
#[derive(Debug, Clone)]
pub struct ProductPage {
    pub products: Vec<Product>,
    /// Where the next page starts; `None` on the last page.
    pub next_after: Option<Uuid>,
}

impl Checkout {
    /// Creates a product with its initial stock.
    pub async fn create_product(&self, new: NewProduct) -> Result<Product, DomainError> {
        if new.name.trim().is_empty() {
            return Err(DomainError::invalid("name", "must not be empty"));
        }
        check_text("name", &new.name, 200)?;
        if !(0..=MAX_PRICE_CENTS).contains(&new.price_cents) {
            return Err(DomainError::invalid(
                "price_cents",
                format!("must be between 0 and {MAX_PRICE_CENTS}"),
            ));
        }
        if !(0..=MAX_STOCK).contains(&new.stock_total) {
            return Err(DomainError::invalid(
                "stock_total",
                format!("must be between 0 and {MAX_STOCK}"),
            ));
        }
        if let Some(request_id) = &new.request_id {
            check_key("request_id", request_id)?;
        }
        check_terms(&new.terms)?;
        let mut conn = self.conn().await?;
        let mut attempt = 1;
        loop {
            let outcome = conn
                .transaction(async |conn| create_product_once(conn, &new).await)
                .await;
            if !retryable(&outcome, attempt) {
                return outcome;
            }
            attempt += 1;
        }
    }

    /// Changes a product's sale terms as `update` says; watchers see the change.
    pub async fn update_product(
        &self,
        product_id: Uuid,
        update: TermsUpdate,
    ) -> Result<Product, DomainError> {
        let mut conn = self.conn().await?;
        conn.transaction(async |conn| {
            let product = queries::lock_product(conn, product_id)
                .await?
                .ok_or_else(|| DomainError::not_found("product", product_id))?;
            let current = SaleTerms::from(&product);
            let terms = SaleTerms {
                max_per_buyer: update.max_per_buyer.unwrap_or(current.max_per_buyer),
                sale_starts_at: update.sale_starts_at.unwrap_or(current.sale_starts_at),
                sale_ends_at: update.sale_ends_at.unwrap_or(current.sale_ends_at),
            };
            check_terms(&terms)?;
            if terms == current {
                return Ok(product);
            }
            Ok(queries::set_sale_terms(conn, product_id, terms).await?)
        })
        .await
    }

    /// One product, fresh from the database.
    pub async fn get_product(&self, id: Uuid) -> Result<Product, DomainError> {
        let mut conn = self.conn().await?;
        queries::find_product(&mut conn, id)
            .await?
            .ok_or_else(|| DomainError::not_found("product", id))
    }

    /// The products among `ids` (all of them must exist).
    pub async fn get_products(&self, ids: &[Uuid]) -> Result<Vec<Product>, DomainError> {
        let mut conn = self.conn().await?;
        let found = queries::find_products(&mut conn, ids).await?;
        if let Some(missing) = ids.iter().find(|id| !found.iter().any(|p| p.id == **id)) {
            return Err(DomainError::not_found("product", missing));
        }
        Ok(found)
    }

    /// A page of products in creation order; `page_size` 0 means the default.
    pub async fn list_products(
        &self,
        page_size: i64,
        after: Option<Uuid>,
    ) -> Result<ProductPage, DomainError> {
        let limit = page_limit(page_size)?;
        let mut conn = self.conn().await?;
        let mut products = queries::list_products(&mut conn, after, limit + 1).await?;
        let next_after = if products.len() as i64 > limit {
            products.truncate(limit as usize);
            products.last().map(|p| p.id)
        } else {
            None
        };
        Ok(ProductPage {
            products,
            next_after,
        })
    }

    /// Every product (for watchers of all products).
    pub async fn all_products(&self) -> Result<Vec<Product>, DomainError> {
        let mut conn = self.conn().await?;
        Ok(queries::all_products(&mut conn).await?)
    }

    /// Restocks (`delta > 0`) or withdraws (`delta < 0`), never below reserved + sold. A
    /// request id seen before from the same caller changes nothing again and answers with
    /// the product as it is now.
    pub async fn adjust_stock(&self, adjustment: StockAdjustment) -> Result<Product, DomainError> {
        let delta = adjustment.delta;
        if delta == 0 || delta.unsigned_abs() > MAX_STOCK.unsigned_abs() {
            return Err(DomainError::invalid(
                "delta",
                format!("must be non-zero and within ±{MAX_STOCK}"),
            ));
        }
        if let Some(request_id) = &adjustment.request_id {
            check_key("request_id", request_id)?;
        }
        let mut conn = self.conn().await?;
        let mut attempt = 1;
        loop {
            let outcome = conn
                .transaction(async |conn| adjust_stock_once(conn, &adjustment).await)
                .await;
            if !retryable(&outcome, attempt) {
                if let Ok(product) = &outcome {
                    tracing::info!(product_id = %product.id, delta, stock_total = product.stock_total, "stock adjusted");
                }
                return outcome;
            }
            attempt += 1;
        }
    }

    /// Recomputes the counters of `ids` (all products when empty; at most
    /// [`MAX_AUDITED_PRODUCTS`] named) from holds, orders and stock adjustments, in one
    /// snapshot.
    pub async fn audit(&self, ids: &[Uuid]) -> Result<Vec<AuditRow>, DomainError> {
        if ids.len() > MAX_AUDITED_PRODUCTS {
            return Err(DomainError::invalid(
                "product_ids",
                format!("must name at most {MAX_AUDITED_PRODUCTS} products (none audits all)"),
            ));
        }
        let mut conn = self.conn().await?;
        let rows = audit_products(&mut conn, ids).await?;
        let audited: HashSet<Uuid> = rows.iter().map(|row| row.product_id).collect();
        if let Some(missing) = ids.iter().find(|id| !audited.contains(id)) {
            return Err(DomainError::not_found("product", missing));
        }
        Ok(rows)
    }
}

/// One attempt at CreateProduct, in a transaction: a known request id answers with its
/// product; a new one creates the product. A concurrent twin taking the same request id
/// makes the insert fail as a conflict, and the retry finds the twin's product.
async fn create_product_once(
    conn: &mut AsyncPgConnection,
    new: &NewProduct,
) -> Result<Product, DomainError> {
    let by = Requester {
        caller: new.caller.name(),
        request_id: new.request_id.as_deref(),
    };
    if let Some(request_id) = by.request_id
        && let Some((product, initial_stock)) =
            queries::find_product_by_request_id(conn, by.caller, request_id).await?
    {
        let same = product.name == new.name
            && product.price_cents == new.price_cents
            && initial_stock == new.stock_total;
        return match same {
            true => Ok(product),
            false => Err(reused(request_id)),
        };
    }
    queries::insert_product(
        conn,
        &new.name,
        new.price_cents,
        new.stock_total,
        new.terms,
        by,
    )
    .await
    .map_err(|error| taken_request_id(error, "products_request_id_key"))
}

/// One attempt at AdjustStock, in a transaction (see [`create_product_once`] for the
/// request id).
async fn adjust_stock_once(
    conn: &mut AsyncPgConnection,
    adjustment: &StockAdjustment,
) -> Result<Product, DomainError> {
    let (product_id, delta) = (adjustment.product_id, adjustment.delta);
    let by = Requester {
        caller: adjustment.caller.name(),
        request_id: adjustment.request_id.as_deref(),
    };
    if let Some(request_id) = by.request_id
        && let Some(first) =
            queries::find_adjustment_by_request_id(conn, by.caller, request_id).await?
    {
        if first != (product_id, delta) {
            return Err(reused(request_id));
        }
        return queries::find_product(conn, product_id)
            .await?
            .ok_or_else(|| DomainError::not_found("product", product_id));
    }
    // Settled units still pending as movements count as free for a withdrawal.
    fold_movements(conn, &[product_id]).await?;
    let change = StockChange {
        total: delta,
        ..StockChange::default()
    };
    let Some(product) = queries::apply_stock_change(conn, product_id, change).await? else {
        let product = queries::find_product(conn, product_id)
            .await?
            .ok_or_else(|| DomainError::not_found("product", product_id))?;
        return Err(DomainError::StockBelowCommitted {
            product_id,
            requested_total: product.stock_total + delta,
            committed: product.reserved + product.sold,
        });
    };
    if product.stock_total > MAX_STOCK {
        return Err(DomainError::invalid(
            "delta",
            format!("stock_total would exceed {MAX_STOCK}"),
        ));
    }
    queries::insert_adjustment(conn, product_id, delta, by)
        .await
        .map_err(|error| taken_request_id(error, "stock_adjustments_request_id_key"))?;
    // Stock added goes to the waitlist first; stock withdrawn turns the waiters away.
    if delta > 0 {
        serve_waiters(conn, &[product_id]).await?;
    } else {
        end_waiters(conn, &[product_id], "stock_withdrawn").await?;
    }
    Ok(queries::find_product(conn, product_id)
        .await?
        .unwrap_or(product))
}

/// A request id that came back with another request.
fn reused(request_id: &str) -> DomainError {
    DomainError::IdempotencyKeyReused {
        field: "request_id",
        key: request_id.to_owned(),
    }
}

/// A request id a concurrent twin took first (`constraint` refused the insert) is a
/// conflict, retried; any other error stays what it is.
fn taken_request_id(error: impl Into<DomainError>, constraint: &str) -> DomainError {
    match error.into() {
        DomainError::UniqueViolation { constraint: taken } if taken == constraint => {
            DomainError::conflict(format!("request_id taken concurrently ({constraint})"))
        }
        other => other,
    }
}

/// A per-buyer limit within the stock bound, and a window that ends after it starts.
fn check_terms(terms: &SaleTerms) -> Result<(), DomainError> {
    if !(0..=MAX_STOCK).contains(&terms.max_per_buyer) {
        return Err(DomainError::invalid(
            "max_per_buyer",
            format!("must be between 0 (no limit) and {MAX_STOCK}"),
        ));
    }
    if let (Some(starts), Some(ends)) = (terms.sale_starts_at, terms.sale_ends_at)
        && starts >= ends
    {
        return Err(DomainError::invalid(
            "sale_ends_at",
            "must be after sale_starts_at",
        ));
    }
    Ok(())
}

/// How many rows a page of `page_size` holds: 0 means the default, at most
/// [`MAX_PAGE_SIZE`].
pub(super) fn page_limit(page_size: i64) -> Result<i64, DomainError> {
    match page_size {
        0 => Ok(DEFAULT_PAGE_SIZE),
        1..=MAX_PAGE_SIZE => Ok(page_size),
        _ => Err(DomainError::invalid(
            "page_size",
            format!("must be between 0 and {MAX_PAGE_SIZE}"),
        )),
    }
}
