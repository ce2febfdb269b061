DROP TRIGGER products_keep_held ON products;
DROP FUNCTION products_keep_held();
DROP TRIGGER holds_keep_product ON holds;
DROP FUNCTION holds_keep_product();
DROP TRIGGER holds_check_products ON holds;
DROP FUNCTION holds_check_products();
ALTER TABLE holds ADD CONSTRAINT holds_product_id_fkey
    FOREIGN KEY (product_id) REFERENCES products (id);
