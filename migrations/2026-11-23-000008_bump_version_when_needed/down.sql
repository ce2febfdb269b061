DROP TRIGGER products_bump_version ON products;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_bump_version();

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
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 FROM sums;
$$;
