-- Back to the foreign key from a movement to its hold.
DROP TRIGGER stock_movements_check_hold ON stock_movements;
DROP FUNCTION stock_movements_check_hold();
ALTER TABLE stock_movements
    ADD CONSTRAINT stock_movements_hold_id_fkey FOREIGN KEY (hold_id) REFERENCES holds (id);
