-- A movement's hold is checked by a trigger that reads it without locking it, in place of
-- the foreign key whose check locked it FOR KEY SHARE (see stock_movements_check_hold);
-- the trigger also checks that the movement's product is its hold's.
ALTER TABLE stock_movements DROP CONSTRAINT stock_movements_hold_id_fkey;

-- stock_movements_check_hold: a movement names an existing hold and that hold's product.
-- Refuses the row otherwise with the error of a foreign key "stock_movements_hold_id_fkey"
-- (SQLSTATE 23503). Reads the hold's row without locking it: a foreign key's check would
-- lock it FOR KEY SHARE, and a settlement (payment, cancellation, the reaper's deadline)
-- records its movement while holding its order's lock, so it would wait for a hold that a
-- payment aimed at the hold had locked before asking for that order: a deadlock, broken by
-- PostgreSQL after deadlock_timeout. Sound without the lock: nothing deletes a hold, and a
-- hold never changes product (holds_keep_product).
CREATE FUNCTION stock_movements_check_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM holds WHERE id = NEW.hold_id AND product_id = NEW.product_id) THEN
        RAISE EXCEPTION 'insert or update on table "stock_movements" violates foreign key constraint "stock_movements_hold_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a movement names an existing hold and that hold''s product',
                  TABLE = 'stock_movements', CONSTRAINT = 'stock_movements_hold_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each insert into stock_movements and each update that sets hold_id or
-- product_id.
CREATE TRIGGER stock_movements_check_hold
    BEFORE INSERT OR UPDATE OF hold_id, product_id ON stock_movements
    FOR EACH ROW EXECUTE FUNCTION stock_movements_check_hold();
