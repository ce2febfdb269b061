-- Settlements and releases off the hot row. A settling order (or a released hold) used to
-- update its product's counters in its own transaction, so every payment of a hot product
-- queued on that row's lock for one commit each. Now it records its counter movement here
-- (no product lock) and movements are folded into the product's counters many at a time
-- (fold_stock_movements).
--
-- A movement only ever lowers `reserved` (paid: the units move on to `sold`; failed,
-- released or expired: they become available again), so while movements wait to be folded
-- the product's row overstates what is held and understates what is available: no hold
-- can oversell. The audit counts pending movements with the row.
CREATE TABLE stock_movements (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- no foreign key: its check would lock the product's row, which is what this table
    -- avoids; the hold names the product, and a product with holds cannot be deleted
    product_id     UUID NOT NULL,
    -- the hold whose units move: a settled order's hold, or a hold released or expired
    hold_id        UUID NOT NULL REFERENCES holds (id),
    reserved_delta BIGINT NOT NULL CHECK (reserved_delta < 0),
    sold_delta     BIGINT NOT NULL CHECK (sold_delta >= 0 AND sold_delta <= -reserved_delta),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX stock_movements_product_id ON stock_movements (product_id);

-- Folds the pending movements of these products into their counters. One statement: run
-- alone it is one transaction and one round trip. The products are locked first, in id
-- order like reserve_holds does, so folds and hold batches never deadlock; the movements
-- are then read with a snapshot taken after the locks, so every movement committed before
-- the call is folded. Concurrent folds of one product serialize on its lock, and a
-- movement is deleted as it is folded: folded exactly once. Returns how many it folded.
CREATE FUNCTION fold_stock_movements(product_ids uuid[]) RETURNS int8
LANGUAGE sql AS $$
    SELECT count(*) FROM (
        SELECT 1 FROM products WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE
    ) locked;
    WITH moved AS (
        DELETE FROM stock_movements WHERE product_id = ANY (product_ids)
        RETURNING product_id, reserved_delta, sold_delta
    ), sums AS (
        SELECT product_id, sum(reserved_delta)::int8 AS reserved, sum(sold_delta)::int8 AS sold,
               count(*) AS movements
          FROM moved GROUP BY product_id
    ), folded AS (
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 FROM sums;
$$;
