-- Holds are no longer indexed by product. Every hold of a hot product carries the same key,
-- and keeping that index cost about a fifth of PostgreSQL's time per hold batch (pgbench,
-- one client, synchronous_commit off, a 100-hold reserve_holds call: 3.1 ms with it, 2.45
-- ms without). Its one reader was the audit, which now sums active holds per product in one
-- pass over holds_active_expires_at: active holds number at most the units reserved, which
-- never exceed the stock.
DROP INDEX holds_product_id_active;
