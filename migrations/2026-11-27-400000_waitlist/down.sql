-- Back to no waitlist.
DROP FUNCTION end_waiters(uuid[], text);
DROP FUNCTION leave_waitlist(int8);
DROP FUNCTION join_waitlist(uuid, int8, text, text, interval, int8);
DROP FUNCTION fold_stock_movements(uuid[]);
DROP FUNCTION serve_waiters(uuid[]);
DROP FUNCTION waiter_alive(int8);

CREATE FUNCTION fold_stock_movements(product_ids uuid[]) RETURNS int8
LANGUAGE sql AS $$
    SELECT count(*) FROM (
        SELECT 1 FROM products WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE
    ) locked;
    WITH moved AS (
        DELETE FROM stock_movements WHERE product_id = ANY (product_ids)
        RETURNING product_id, reserved_delta, sold_delta
    ), sums AS (
        SELECT product_id, sum(reserved_delta)::int8 AS reserved, sum(sold_delta)::int8 AS sold,
               count(*) AS movements
          FROM moved GROUP BY product_id
    ), folded AS (
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold,
                              version = p.version + 1, updated_at = now()
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 FROM sums;
$$;

CREATE OR REPLACE FUNCTION reserve_holds(
    request_ids uuid[], product_ids uuid[], request_products int4[], request_qtys int8[],
    request_callers text[], request_keys text[], request_buyers text[], ttl interval,
    skip_taken_keys bool
) RETURNS TABLE (ord int4, outcome text, units_left int8, hold_id uuid,
                hold_product_id uuid, hold_qty int8, hold_status text,
                hold_client_request_id text, hold_expires_at timestamptz,
                hold_created_at timestamptz, hold_updated_at timestamptz,
                hold_buyer_id text)
LANGUAGE plpgsql AS $$
DECLARE
    decided     bool[] := array_fill(false, ARRAY[cardinality(request_ids)]);
    locked_ids  uuid[];
    -- whether locked_ids is product_ids, so a request's product index is its lock's
    in_order    bool;
    lefts       int8[];
    limits      int8[];
    starts      timestamptz[];
    ends        timestamptz[];
    -- units each (product, buyer) of the batch holds, as far as counted: parallel arrays
    buyer_keys  text[] := '{}';
    units_held int8[] := '{}';
    buyer_at    int4;
    granted     int4[] := '{}';
    known       record;
    at          int4;
    i           int4;
BEGIN
    -- Known keys answer with their hold and take no stock.
    FOR known IN
        SELECT r.at::int4 AS at, h.id, h.product_id, h.qty, h.status, h.client_request_id,
               h.expires_at, h.created_at, h.updated_at, h.buyer_id
          FROM unnest(request_callers, request_keys) WITH ORDINALITY AS r(caller, key, at)
          JOIN holds h ON h.caller = r.caller AND h.client_request_id = r.key
         WHERE r.key IS NOT NULL
    LOOP
        decided[known.at] := true;
        RETURN QUERY SELECT known.at, 'existing'::text, NULL::int8, known.id, known.product_id,
                            known.qty, known.status, known.client_request_id,
                            known.expires_at, known.created_at, known.updated_at,
                            known.buyer_id;
    END LOOP;

    -- Row locks in id order, so concurrent batches never deadlock. NO KEY UPDATE, like an
    -- UPDATE of the counters: foreign key checks (an order naming the product) pass.
    SELECT coalesce(array_agg(p.id ORDER BY p.id), '{}'),
           coalesce(array_agg(p.stock_total - p.reserved - p.sold ORDER BY p.id), '{}'),
           coalesce(array_agg(p.max_per_buyer ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_starts_at ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_ends_at ORDER BY p.id), '{}')
      INTO locked_ids, lefts, limits, starts, ends
      FROM (SELECT id, stock_total, reserved, sold, max_per_buyer, sale_starts_at, sale_ends_at
              FROM products
             WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE) p;
    in_order := locked_ids = product_ids;

    FOR i IN 1 .. coalesce(cardinality(request_ids), 0) LOOP
        CONTINUE WHEN decided[i];
        at := request_products[i];
        IF NOT in_order THEN
            at := array_position(locked_ids, product_ids[at]);
        END IF;
        buyer_at := NULL;
        IF lefts[at] IS NOT NULL AND limits[at] > 0 AND request_buyers[i] IS NOT NULL THEN
            buyer_at := array_position(buyer_keys, locked_ids[at] || '/' || request_buyers[i]);
            IF buyer_at IS NULL THEN
                buyer_keys := buyer_keys || (locked_ids[at] || '/' || request_buyers[i]);
                units_held := units_held || buyer_units(locked_ids[at], request_buyers[i]);
                buyer_at := cardinality(buyer_keys);
            END IF;
        END IF;
        IF lefts[at] IS NULL THEN
            RETURN QUERY SELECT i, 'no_product'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF now() < starts[at] THEN
            RETURN QUERY SELECT i, 'sale_not_started'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF now() >= ends[at] THEN
            RETURN QUERY SELECT i, 'sale_ended'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF limits[at] > 0 AND request_buyers[i] IS NULL THEN
            RETURN QUERY SELECT i, 'buyer_required'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF buyer_at IS NOT NULL AND units_held[buyer_at] + request_qtys[i] > limits[at] THEN
            RETURN QUERY SELECT i, 'buyer_limit'::text,
                                greatest(limits[at] - units_held[buyer_at], 0)::int8,
                                NULL::uuid, NULL::uuid, NULL::int8, NULL::text, NULL::text,
                                NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
                                NULL::text;
        ELSIF request_qtys[i] <= lefts[at] THEN
            lefts[at] := lefts[at] - request_qtys[i];
            IF buyer_at IS NOT NULL THEN
                units_held[buyer_at] := units_held[buyer_at] + request_qtys[i];
            END IF;
            granted := granted || i;
        ELSE
            RETURN QUERY SELECT i, 'insufficient'::text, lefts[at], NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        END IF;
    END LOOP;

    -- The granted holds in one insert and their units in one update per product, in one
    -- statement. The products are locked and the grants fit, so the update needs no guard of
    -- its own: were it ever to oversell, products_never_oversold would fail the whole call.
    IF NOT skip_taken_keys THEN
        RETURN QUERY
        WITH rows AS (
            INSERT INTO holds (id, product_id, qty, status, caller, client_request_id,
                               buyer_id, expires_at, created_at, updated_at)
            SELECT r.id, product_ids[r.product], r.qty, 'active', r.caller, r.key, r.buyer,
                   now() + ttl, now(), now()
              FROM unnest(request_ids, request_products, request_qtys, request_callers,
                          request_keys, request_buyers)
                   WITH ORDINALITY AS r(id, product, qty, caller, key, buyer, at)
              JOIN unnest(granted) AS g ON g = r.at
            RETURNING *
        ), units AS (
            SELECT rows.product_id, sum(rows.qty)::int8 AS total FROM rows GROUP BY rows.product_id
        ), reserved AS (
            UPDATE products p SET reserved = p.reserved + units.total,
                                  version = p.version + 1, updated_at = now()
              FROM units
             WHERE p.id = units.product_id
        )
        SELECT g, CASE WHEN rows.id IS NULL THEN 'key_taken' ELSE 'granted' END, NULL::int8,
               rows.id, rows.product_id, rows.qty, rows.status, rows.client_request_id,
               rows.expires_at, rows.created_at, rows.updated_at, rows.buyer_id
          FROM unnest(granted) AS g
          LEFT JOIN rows ON rows.id = request_ids[g];
    ELSE
        -- A key a concurrent transaction took is skipped, and its units with it.
        RETURN QUERY
        WITH rows AS (
            INSERT INTO holds (id, product_id, qty, status, caller, client_request_id,
                               buyer_id, expires_at, created_at, updated_at)
            SELECT r.id, product_ids[r.product], r.qty, 'active', r.caller, r.key, r.buyer,
                   now() + ttl, now(), now()
              FROM unnest(request_ids, request_products, request_qtys, request_callers,
                          request_keys, request_buyers)
                   WITH ORDINALITY AS r(id, product, qty, caller, key, buyer, at)
              JOIN unnest(granted) AS g ON g = r.at
            ON CONFLICT DO NOTHING
            RETURNING *
        ), units AS (
            SELECT rows.product_id, sum(rows.qty)::int8 AS total FROM rows GROUP BY rows.product_id
        ), reserved AS (
            UPDATE products p SET reserved = p.reserved + units.total,
                                  version = p.version + 1, updated_at = now()
              FROM units
             WHERE p.id = units.product_id
        )
        SELECT g, CASE WHEN rows.id IS NULL THEN 'key_taken' ELSE 'granted' END, NULL::int8,
               rows.id, rows.product_id, rows.qty, rows.status, rows.client_request_id,
               rows.expires_at, rows.created_at, rows.updated_at, rows.buyer_id
          FROM unnest(granted) AS g
          LEFT JOIN rows ON rows.id = request_ids[g];
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION products_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    states text[];
    header text;
    first  int4 := 1;
BEGIN
    states := ARRAY(
        SELECT '{"product_id":"' || n.id
               || '","stock_total":' || n.stock_total
               || ',"reserved":' || n.reserved
               || ',"sold":' || n.sold
               || ',"version":' || n.version
               || ',"max_per_buyer":' || n.max_per_buyer
               || ',"sale_starts_at":' || coalesce(to_json(n.sale_starts_at)::text, 'null')
               || ',"sale_ends_at":' || coalesce(to_json(n.sale_ends_at)::text, 'null') || '}'
          FROM new_products n
         WHERE TG_OP = 'INSERT' OR n.updated_at = now());
    header := '{"changed_at":' || to_json(now()) || ',"products":[';
    WHILE first <= cardinality(states) LOOP
        PERFORM pg_notify('flashsale_product_changes',
                          header || array_to_string(states[first:first + 15], ',') || ']}');
        first := first + 16;
    END LOOP;
    RETURN NULL;
END;
$$;

DROP TRIGGER products_bump_version ON products;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW
    WHEN ((NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at)
          IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at)
          AND (NEW.version, NEW.updated_at) IS DISTINCT FROM (OLD.version + 1, now()))
    EXECUTE FUNCTION products_bump_version();
CREATE OR REPLACE FUNCTION products_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at)
       IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;

DROP TABLE waiters;
ALTER TABLE products DROP COLUMN owed;
ALTER TABLE products DROP COLUMN waiting;
