-- Every hold names an existing product: checked once per INSERT statement instead of by a
-- foreign key's lookup per row. The server writes a whole batch of holds in one statement,
-- and the per-row check was about 40% of PostgreSQL's work per hold (EXPLAIN ANALYZE of a
-- 128-row insert: 2.8 ms with the foreign key, 1.35 ms with this check). The guarantees
-- stay those of the foreign key: the checked products are locked FOR KEY SHARE until the
-- inserting transaction ends (a concurrent DELETE waits, then sees the holds), a hold never
-- moves to another product, and a product that holds name cannot be deleted or re-keyed.
ALTER TABLE holds DROP CONSTRAINT holds_product_id_fkey;

CREATE FUNCTION holds_check_products() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    named   bigint;
    present bigint;
BEGIN
    SELECT count(DISTINCT product_id) INTO named FROM new_holds;
    SELECT count(*) INTO present FROM (
        SELECT 1 FROM products
         WHERE id IN (SELECT product_id FROM new_holds)
           FOR KEY SHARE
    ) locked;
    IF present < named THEN
        RAISE EXCEPTION 'insert or update on table "holds" violates foreign key constraint "holds_product_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a hold names a product that is not present in table "products"',
                  TABLE = 'holds', CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER holds_check_products AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION holds_check_products();

CREATE FUNCTION holds_keep_product() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.product_id <> OLD.product_id THEN
        RAISE EXCEPTION 'a hold cannot move to another product'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'holds',
                  CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER holds_keep_product BEFORE UPDATE OF product_id ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_keep_product();

CREATE FUNCTION products_keep_held() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.id <> OLD.id)
       AND EXISTS (SELECT 1 FROM holds WHERE product_id = OLD.id) THEN
        RAISE EXCEPTION 'update or delete on table "products" violates foreign key constraint "holds_product_id_fkey" on table "holds"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (id)=(%s) is still referenced from table "holds".', OLD.id),
                  TABLE = 'products', CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER products_keep_held BEFORE DELETE OR UPDATE OF id ON products
    FOR EACH ROW EXECUTE FUNCTION products_keep_held();
