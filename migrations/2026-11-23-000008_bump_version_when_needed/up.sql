-- products_bump_version runs only for updates that need it: one that changes the counters
-- without bumping the version and change time itself. The hold batches and folds touch many
-- products per statement and bump them in the statement, so they skip one PL/pgSQL call per
-- product; every other update still cannot forget the bump.
DROP TRIGGER products_bump_version ON products;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW
    WHEN ((NEW.stock_total, NEW.reserved, NEW.sold) IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold)
          AND (NEW.version, NEW.updated_at) IS DISTINCT FROM (OLD.version + 1, now()))
    EXECUTE FUNCTION products_bump_version();

-- Folds bump their products in the statement too (see migration 2026-11-23-000004).
CREATE OR REPLACE FUNCTION fold_stock_movements(product_ids uuid[]) RETURNS int8
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
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold,
                              version = p.version + 1, updated_at = now()
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 FROM sums;
$$;
