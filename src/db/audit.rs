//! The inventory audit: stored counters next to counters recomputed from the rows.

use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Uuid as SqlUuid};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use uuid::Uuid;

/// One product's stored and recomputed counters. The stored `reserved` and `sold` include
/// the counter movements (settled orders, released holds) not yet folded into the row.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName)]
pub struct AuditRow {
    #[diesel(sql_type = SqlUuid)]
    pub product_id: Uuid,
    #[diesel(sql_type = BigInt)]
    pub stock_total: i64,
    #[diesel(sql_type = BigInt)]
    pub reserved: i64,
    #[diesel(sql_type = BigInt)]
    pub sold: i64,
    /// Sum of the product's stock adjustments (the initial stock included).
    #[diesel(sql_type = BigInt)]
    pub recomputed_stock_total: i64,
    /// Units of active holds plus units of pending orders.
    #[diesel(sql_type = BigInt)]
    pub recomputed_reserved: i64,
    /// Units of paid orders.
    #[diesel(sql_type = BigInt)]
    pub recomputed_sold: i64,
    /// Buyers in the waitlist, as stored.
    #[diesel(sql_type = BigInt)]
    pub waiting: i64,
    /// The units they wait for, as stored.
    #[diesel(sql_type = BigInt)]
    pub owed: i64,
    /// Waiters whose status is 'waiting'.
    #[diesel(sql_type = BigInt)]
    pub recomputed_waiting: i64,
    /// Their units.
    #[diesel(sql_type = BigInt)]
    pub recomputed_owed: i64,
    /// Pending orders past their payment deadline (the reaper's backlog).
    #[diesel(sql_type = BigInt)]
    pub overdue_orders: i64,
    /// Refunds still owed for payments of the product's holds and orders.
    #[diesel(sql_type = BigInt)]
    pub refunds_owed: i64,
}

/// One statement, so one snapshot: counters and rows are read as of the same instant.
const AUDIT_SQL: &str = "
SELECT p.id AS product_id, p.stock_total,
    (p.reserved + COALESCE(m.reserved_delta, 0))::int8 AS reserved,
    (p.sold + COALESCE(m.sold_delta, 0))::int8 AS sold,
    COALESCE((SELECT sum(a.delta) FROM stock_adjustments a WHERE a.product_id = p.id), 0)::int8
        AS recomputed_stock_total,
    (COALESCE(active.qty, 0)
     + COALESCE((SELECT sum(o.qty) FROM orders o WHERE o.product_id = p.id AND o.status = 'pending'), 0))::int8
        AS recomputed_reserved,
    COALESCE((SELECT sum(o.qty) FROM orders o WHERE o.product_id = p.id AND o.status = 'paid'), 0)::int8
        AS recomputed_sold,
    p.waiting, p.owed,
    COALESCE(line.waiting, 0)::int8 AS recomputed_waiting,
    COALESCE(line.owed, 0)::int8 AS recomputed_owed,
    (SELECT count(*) FROM orders o
      WHERE o.product_id = p.id AND o.status = 'pending' AND o.payment_due_at <= now())::int8
        AS overdue_orders,
    COALESCE(owed.refunds, 0)::int8 AS refunds_owed
FROM products p
LEFT JOIN (
    -- all active holds in one pass (holds are not indexed by product: see the holds table
    -- in migrations/schema.sql)
    SELECT product_id, sum(qty) AS qty FROM holds WHERE status = 'active' GROUP BY product_id
) active ON active.product_id = p.id
LEFT JOIN (
    SELECT product_id, sum(reserved_delta) AS reserved_delta, sum(sold_delta) AS sold_delta
    FROM stock_movements GROUP BY product_id
) m ON m.product_id = p.id
LEFT JOIN (
    -- every refund owed in one pass (payment_events_refunds_owed), by its target's product
    SELECT coalesce(o.product_id, h.product_id) AS product_id, count(*) AS refunds
    FROM payment_events e
    LEFT JOIN orders o ON o.id = e.target_order_id
    LEFT JOIN holds h ON h.id = e.target_hold_id
    WHERE e.outcome = 'refund_required' AND e.refunded_at IS NULL
    GROUP BY 1
) owed ON owed.product_id = p.id
LEFT JOIN (
    -- every waitlist in one pass (waiters_queue)
    SELECT product_id, count(*) AS waiting, sum(qty) AS owed
    FROM waiters WHERE status = 'waiting' GROUP BY product_id
) line ON line.product_id = p.id
WHERE cardinality($1::uuid[]) = 0 OR p.id = ANY($1::uuid[])
ORDER BY p.id";

/// Audits the products in `ids` (all products when empty).
pub async fn audit_products(
    conn: &mut AsyncPgConnection,
    ids: &[Uuid],
) -> QueryResult<Vec<AuditRow>> {
    diesel::sql_query(AUDIT_SQL)
        .bind::<Array<SqlUuid>, _>(ids)
        .load(conn)
        .await
}

impl AuditRow {
    /// Stored equals recomputed, and nothing is oversold.
    pub fn consistent(&self) -> bool {
        self.stock_total == self.recomputed_stock_total
            && self.reserved == self.recomputed_reserved
            && self.sold == self.recomputed_sold
            && self.waiting == self.recomputed_waiting
            && self.owed == self.recomputed_owed
            && self.reserved + self.sold <= self.stock_total
    }
}
