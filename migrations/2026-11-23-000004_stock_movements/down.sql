-- Folds what is pending first, so no settled units are lost with the table.
SELECT fold_stock_movements(ARRAY(SELECT DISTINCT product_id FROM stock_movements));
DROP FUNCTION fold_stock_movements(uuid[]);
DROP TABLE stock_movements;
