-- The batch functions of the hot paths reach rows by key only, whatever a table's
-- statistics say (see schema.sql's introduction): enable_seqscan off, and create_orders,
-- apply_payments and release_holds decide on the rows their locks returned.

-- create_orders: turns active holds into pending orders, any number in one statement (the
-- CreateOrder batches).
-- - Locks the named holds FOR UPDATE in id order (holds before orders before products, the
--   order every transaction takes them in), then decides on the holds as locked (their
--   latest version) in a statement of its own, so that it sees every payment committed
--   before the locks were granted.
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
CREATE OR REPLACE FUNCTION create_orders(hold_ids uuid[], order_ids uuid[], payment_ttl interval)
RETURNS SETOF orders
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked holds[];
BEGIN
    IF cardinality(order_ids) < cardinality(hold_ids) THEN
        RAISE EXCEPTION 'create_orders: % holds but % order ids',
            cardinality(hold_ids), cardinality(order_ids)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    locked := ARRAY(SELECT h FROM holds h WHERE h.id = ANY (hold_ids) ORDER BY h.id FOR UPDATE);
    RETURN QUERY
    WITH named AS (
        SELECT DISTINCT ON (r.hold_id) r.hold_id, r.order_id
          FROM unnest(hold_ids, order_ids) WITH ORDINALITY AS r(hold_id, order_id, at)
         WHERE r.hold_id IS NOT NULL
         ORDER BY r.hold_id, r.at
    ), eligible AS (
        SELECT n.order_id, h.id AS hold_id, h.product_id, h.qty, h.qty * p.price_cents AS total
          FROM named n
          JOIN unnest(locked) h ON h.id = n.hold_id
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

-- apply_payments: settles pending orders by payment webhooks, any number in one statement
-- (the HandlePaymentWebhook batches). Request i is the delivery of key keys[i] by caller
-- callers[i], reporting results[i] ('success' or 'failure', with failure_reasons[i] and
-- amounts[i]) for order order_ids[i].
-- - Locks the named orders FOR UPDATE in id order (it locks no hold and no product: the
--   order every transaction takes them in), then decides on the orders as locked (their
--   latest version) in a statement of its own, so it sees every delivery committed before
--   its locks were granted.
-- - Applies a request when its key is new (no event of that caller and key), its order is
--   'pending' and before its payment_due_at (by now(), the transaction's clock), its
--   amount agrees (a success's equals the order's total; a failure's is 0 or the total),
--   and no earlier request of the call names the same order: the order becomes 'paid' (its
--   units move on to sold) or 'cancelled' with cancel_reason 'payment_failed' and the
--   failure reason (they go back), as one counter movement each, folded later; the event
--   is stored 'applied' with the order's new status.
-- - Leaves every other request alone, for the caller to handle one by one: a key seen
--   before, an order already final or past its deadline, an amount that disagrees, an
--   unknown order, a second request for one order.
-- - Returns the orders it settled, as they are now.
-- - Stores the events in key order, so two calls storing the same keys wait for each
--   other in one order, never in a cycle. A key named twice, or stored by a transaction
--   that committed after this one looked, fails the call with unique_violation; nothing of
--   it stays.
CREATE OR REPLACE FUNCTION apply_payments(callers text[], keys text[], order_ids uuid[],
    results text[], failure_reasons text[], amounts int8[])
RETURNS SETOF orders
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked orders[];
BEGIN
    locked := ARRAY(SELECT o FROM orders o WHERE o.id = ANY (order_ids) ORDER BY o.id FOR UPDATE);
    RETURN QUERY
    WITH asked AS (
        SELECT DISTINCT ON (r.order_id) r.*
          FROM unnest(callers, keys, order_ids, results, failure_reasons, amounts)
               WITH ORDINALITY AS r(caller, key, order_id, result, failure_reason, amount, at)
         WHERE r.order_id IS NOT NULL
         ORDER BY r.order_id, r.at
    ), applied AS (
        SELECT a.caller, a.key, a.order_id, a.result, a.failure_reason, a.amount,
               o.hold_id, o.product_id, o.qty
          FROM asked a
          JOIN unnest(locked) o ON o.id = a.order_id
         WHERE o.status = 'pending' AND o.payment_due_at > now()
           AND CASE a.result WHEN 'success' THEN a.amount = o.total_cents
                             ELSE a.amount IN (0, o.total_cents) END
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.caller = a.caller AND e.idempotency_key = a.key)
    ), settled AS (
        UPDATE orders o
           SET status = CASE p.result WHEN 'success' THEN 'paid' ELSE 'cancelled' END,
               failure_reason = CASE p.result WHEN 'success' THEN '' ELSE p.failure_reason END,
               cancel_reason = CASE p.result WHEN 'success' THEN NULL ELSE 'payment_failed' END,
               updated_at = now()
          FROM applied p
         WHERE o.id = p.order_id
        RETURNING o.*
    ), moved AS (
        INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
        SELECT p.product_id, p.hold_id, -p.qty,
               CASE p.result WHEN 'success' THEN p.qty ELSE 0 END
          FROM applied p
    ), stored AS (
        INSERT INTO payment_events (caller, idempotency_key, target_order_id, result,
                                    failure_reason, amount_cents, outcome, order_id,
                                    order_status, processed_at)
        SELECT p.caller, p.key, p.order_id, p.result, p.failure_reason, p.amount, 'applied',
               p.order_id, CASE p.result WHEN 'success' THEN 'paid' ELSE 'cancelled' END, now()
          FROM applied p
         ORDER BY p.caller, p.key
    )
    SELECT * FROM settled;
END;
$$;

-- release_holds: gives active holds' units back, any number in one statement (the
-- ReleaseHold batches).
-- - Locks the named holds FOR UPDATE in id order (it locks no order and no product: the
--   order every transaction takes them in), then decides on the holds as locked (their
--   latest version) in a statement of its own, so it sees every payment committed before
--   its locks were granted.
-- - Releases each hold that is 'active' (whatever its expiry: a release before the reaper
--   gets there is still a release) and has no payment waiting on it ('deferred' events):
--   marks it 'released' and records its units going back as one counter movement, folded
--   later. A hold named twice is released once.
-- - Leaves every other hold as it was, and unknown ids are skipped: the caller handles
--   each alone (a hold already released, expired or converted, payments waiting to be
--   closed, a hold not found).
-- - Returns the holds it released, as they are now.
CREATE OR REPLACE FUNCTION release_holds(hold_ids uuid[])
RETURNS SETOF holds
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked holds[];
BEGIN
    locked := ARRAY(SELECT h FROM holds h WHERE h.id = ANY (hold_ids) ORDER BY h.id FOR UPDATE);
    RETURN QUERY
    WITH releasable AS (
        SELECT l.id FROM unnest(locked) l
         WHERE l.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.target_hold_id = l.id AND e.outcome = 'deferred')
    ), released AS (
        UPDATE holds h SET status = 'released', updated_at = now()
          FROM releasable r WHERE h.id = r.id
        RETURNING h.*
    ), moved AS (
        INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
        SELECT r.product_id, r.id, -r.qty, 0 FROM released r
    )
    SELECT * FROM released;
END;
$$;

ALTER FUNCTION reserve_holds(uuid[], uuid[], int4[], int8[], text[], text[], text[], interval, bool)
    SET enable_seqscan = off;
ALTER FUNCTION fold_stock_movements(uuid[]) SET enable_seqscan = off;
