DROP TRIGGER orders_check_product ON orders;
DROP FUNCTION orders_check_product();
ALTER TABLE orders ADD CONSTRAINT orders_product_id_fkey
    FOREIGN KEY (product_id) REFERENCES products (id);
