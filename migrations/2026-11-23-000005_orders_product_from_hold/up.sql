-- An order's product is its hold's product, checked on the hold's row instead of by a
-- foreign key to products. The foreign key took a KEY SHARE lock on the product's row for
-- every CreateOrder: on a hot product those lockers overlap each other and the hold batches'
-- updates of the row, and PostgreSQL tracks each such set in a MultiXact (5,106 of them in
-- one 4,000-buyer flash-crowd run). The check reads the hold, which CreateOrder has locked
-- already; the hold's own guarantees (migration 2026-11-23-000001) keep its product present
-- and unchanged, so the foreign key's guarantee stands.
ALTER TABLE orders DROP CONSTRAINT orders_product_id_fkey;

CREATE FUNCTION orders_check_product() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM holds WHERE id = NEW.hold_id AND product_id = NEW.product_id) THEN
        RAISE EXCEPTION 'insert or update on table "orders" violates foreign key constraint "orders_product_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'an order names the product of its hold',
                  TABLE = 'orders', CONSTRAINT = 'orders_product_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER orders_check_product BEFORE INSERT OR UPDATE OF hold_id, product_id ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_check_product();
