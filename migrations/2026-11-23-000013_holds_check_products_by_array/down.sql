-- Back to the check of migration 2026-11-23-000001.
CREATE OR REPLACE FUNCTION holds_check_products() RETURNS trigger LANGUAGE plpgsql AS $$
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
