-- CreateOrder batches: many holds become orders in one statement.

-- create_orders: turns active holds into pending orders, any number in one statement (the
-- CreateOrder batches).
-- - Locks the named holds FOR UPDATE in id order (holds before orders before products, the
--   order every transaction takes them in), then decides under those locks, in a statement
--   of its own so that it sees every payment committed before the locks were granted.
-- - Converts each hold that is 'active', before its expires_at (by now(), the
--   transaction's clock) and has no payment waiting on it ('deferred' events): inserts its
--   pending order, with the id at the same position of order_ids, the hold's product and
--   qty, the hold's units at the product's price, and payment_due_at now() +
--   payment_ttl; marks the hold 'converted'. Takes no lock on products (the price is read
--   as committed; see the orders table for why).
-- - Leaves every other hold as it was, and unknown ids are skipped: those holds get no
--   order here, and the caller handles each alone (an order made before, an expiry on the
--   spot, waiting payments to apply, a hold not found).
-- - Returns the orders it made. A hold named twice is converted once (its first order id).
-- - Refuses the whole call (nothing of it stays) if a total overflows int8 or order_ids is
--   shorter than hold_ids.
CREATE FUNCTION create_orders(hold_ids uuid[], order_ids uuid[], payment_ttl interval)
RETURNS SETOF orders
LANGUAGE plpgsql AS $$
BEGIN
    IF cardinality(order_ids) < cardinality(hold_ids) THEN
        RAISE EXCEPTION 'create_orders: % holds but % order ids',
            cardinality(hold_ids), cardinality(order_ids)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM 1 FROM holds WHERE id = ANY (hold_ids) ORDER BY id FOR UPDATE;
    RETURN QUERY
    WITH named AS (
        SELECT DISTINCT ON (r.hold_id) r.hold_id, r.order_id
          FROM unnest(hold_ids, order_ids) WITH ORDINALITY AS r(hold_id, order_id, at)
         WHERE r.hold_id IS NOT NULL
         ORDER BY r.hold_id, r.at
    ), eligible AS (
        SELECT n.order_id, h.id AS hold_id, h.product_id, h.qty, h.qty * p.price_cents AS total
          FROM named n
          JOIN holds h ON h.id = n.hold_id
          JOIN products p ON p.id = h.product_id
         WHERE h.status = 'active' AND h.expires_at > now()
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.target_hold_id = h.id AND e.outcome = 'deferred')
    ), made AS (
        INSERT INTO orders (id, hold_id, product_id, qty, total_cents, status, payment_due_at)
        SELECT order_id, hold_id, product_id, qty, total, 'pending', now() + payment_ttl
          FROM eligible
        RETURNING *
    ), converted AS (
        UPDATE holds SET status = 'converted', updated_at = now()
          FROM made WHERE holds.id = made.hold_id
    )
    SELECT * FROM made;
END;
$$;
