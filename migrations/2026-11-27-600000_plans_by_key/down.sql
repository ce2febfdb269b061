-- Back to plans chosen by the statistics and decisions that join the locked tables again.

CREATE OR REPLACE FUNCTION create_orders(hold_ids uuid[], order_ids uuid[], payment_ttl interval)
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

CREATE OR REPLACE FUNCTION apply_payments(callers text[], keys text[], order_ids uuid[],
    results text[], failure_reasons text[], amounts int8[])
RETURNS SETOF orders
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM orders WHERE id = ANY (order_ids) ORDER BY id FOR UPDATE;
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
          JOIN orders o ON o.id = a.order_id
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

CREATE OR REPLACE FUNCTION release_holds(hold_ids uuid[])
RETURNS SETOF holds
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM holds WHERE id = ANY (hold_ids) ORDER BY id FOR UPDATE;
    RETURN QUERY
    WITH released AS (
        UPDATE holds h SET status = 'released', updated_at = now()
         WHERE h.id = ANY (hold_ids) AND h.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.target_hold_id = h.id AND e.outcome = 'deferred')
        RETURNING h.*
    ), moved AS (
        INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
        SELECT r.product_id, r.id, -r.qty, 0 FROM released r
    )
    SELECT * FROM released;
END;
$$;

ALTER FUNCTION reserve_holds(uuid[], uuid[], int4[], int8[], text[], text[], text[], interval, bool)
    RESET enable_seqscan;
ALTER FUNCTION fold_stock_movements(uuid[]) RESET enable_seqscan;
