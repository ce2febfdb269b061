-- The waitlist: waiters in join order, served first from units that come back.

ALTER TABLE products ADD COLUMN waiting BIGINT NOT NULL DEFAULT 0 CHECK (waiting >= 0);
ALTER TABLE products ADD COLUMN owed BIGINT NOT NULL DEFAULT 0 CHECK (owed >= 0);

-- One row per JoinWaitlist call: a buyer waiting, in join order (id), for units of a sold-out
-- product to come back.
--
-- Guarantees:
-- - Only 'waiting' rows are in the queue (waiters_queue); a product's waiting and owed
--   count them and their units (changed only under the product's row lock, by
--   join_waitlist, leave_waitlist, serve_waiters and end_waiters).
-- - A 'served' waiter names the hold made for it (waiters_served_with_hold); it moves on
--   from 'waiting' exactly once, under its row lock.
-- - session is the advisory-lock key the waiting stream's server process holds while it
--   lives; a waiter whose process holds it no more is skipped when its turn comes.
-- product_id has a foreign key: joins take the product's lock anyway.
CREATE TABLE waiters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id  UUID NOT NULL REFERENCES products (id),
    qty         BIGINT NOT NULL CHECK (qty > 0),
    buyer_id    TEXT COLLATE "C",
    caller      TEXT COLLATE "C" NOT NULL,
    -- the TTL of the hold it gets (the joining process's setting)
    hold_ttl    INTERVAL NOT NULL,
    session     BIGINT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'waiting'
                CHECK (status IN ('waiting', 'served', 'left', 'ended')),
    -- why an 'ended' waiter was turned away
    end_reason  TEXT CHECK (end_reason IN ('sale_ended', 'stock_withdrawn', 'buyer_limit')),
    hold_id     UUID REFERENCES holds (id),
    joined_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT waiters_served_with_hold CHECK ((status = 'served') = (hold_id IS NOT NULL)),
    CONSTRAINT waiters_ended_with_reason CHECK ((status = 'ended') = (end_reason IS NOT NULL))
);
-- each product's queue in join order
CREATE INDEX waiters_queue ON waiters (product_id, id) WHERE status = 'waiting';

CREATE OR REPLACE FUNCTION products_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at, NEW.waiting)
       IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at, OLD.waiting) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;
DROP TRIGGER products_bump_version ON products;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW
    WHEN ((NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at, NEW.waiting)
          IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at, OLD.waiting)
          AND (NEW.version, NEW.updated_at) IS DISTINCT FROM (OLD.version + 1, now()))
    EXECUTE FUNCTION products_bump_version();

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
               || ',"sale_ends_at":' || coalesce(to_json(n.sale_ends_at)::text, 'null')
               || ',"waiting":' || n.waiting || '}'
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
           coalesce(array_agg(greatest(p.stock_total - p.reserved - p.sold - p.owed, 0) ORDER BY p.id), '{}'),
           coalesce(array_agg(p.max_per_buyer ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_starts_at ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_ends_at ORDER BY p.id), '{}')
      INTO locked_ids, lefts, limits, starts, ends
      FROM (SELECT id, stock_total, reserved, sold, owed, max_per_buyer, sale_starts_at,
                   sale_ends_at
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

-- fold_stock_movements now also serves the waitlists (PL/pgSQL, to return the fold's count).
DROP FUNCTION fold_stock_movements(uuid[]);
CREATE FUNCTION fold_stock_movements(product_ids uuid[]) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    folded int8;
BEGIN
    PERFORM 1 FROM products WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE;
    WITH moved AS (
        DELETE FROM stock_movements WHERE product_id = ANY (product_ids)
        RETURNING product_id, reserved_delta, sold_delta
    ), sums AS (
        SELECT product_id, sum(reserved_delta)::int8 AS reserved, sum(sold_delta)::int8 AS sold,
               count(*) AS movements
          FROM moved GROUP BY product_id
    ), updated AS (
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold,
                              version = p.version + 1, updated_at = now()
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 INTO folded FROM sums;
    PERFORM serve_waiters(product_ids);
    RETURN folded;
END;
$$;

-- ================================================================= the waitlist

-- waiter_alive: whether the server process whose advisory-lock key is `session` still
-- holds it, that is still lives (pg_advisory_lock(bigint) keys split into classid, the high
-- 32 bits, and objid, the low 32). Takes no lock.
CREATE FUNCTION waiter_alive(session int8) RETURNS bool
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND classid = ((session >> 32) & 4294967295)::oid
           AND objid = (session & 4294967295)::oid);
$$;

-- serve_waiters: gives the units of these products that no hold or order has to their
-- waiters, strictly in join order, and returns how many waiters it served.
--
-- Guarantees:
-- - Locks: the products FOR NO KEY UPDATE in id order (as reserve_holds), then each
--   product's waiting rows in join order; held until the transaction ends.
-- - Strict order: a product's head waiter is served (a hold of its qty for its buyer,
--   expiring after its hold_ttl) when the product has the units; otherwise nobody behind
--   it is. A head whose process is gone (waiter_alive) is skipped as 'left'; a head whose
--   buyer would pass max_per_buyer is turned away ('ended', buyer_limit).
-- - Each change of a product's waitlist (its waiting, owed and reserved in one update per
--   product) bumps its version and is announced by products_notify_updates; every product
--   whose queue changed is also announced on channel flashsale_waitlist (payload: its id).
-- - Never oversells: a hold is made only from available units, under the product's lock.
CREATE FUNCTION serve_waiters(product_ids uuid[]) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    product record;
    waiter  record;
    left_units int8;
    held    int8;
    hold    uuid;
    served  int4 := 0;
    changed bool;
BEGIN
    FOR product IN
        SELECT id, stock_total - reserved - sold AS available, max_per_buyer
          FROM products WHERE id = ANY (product_ids) AND waiting > 0
         ORDER BY id FOR NO KEY UPDATE
    LOOP
        left_units := product.available;
        changed := false;
        FOR waiter IN
            SELECT * FROM waiters WHERE product_id = product.id AND status = 'waiting'
             ORDER BY id FOR UPDATE
        LOOP
            IF NOT waiter_alive(waiter.session) THEN
                UPDATE waiters SET status = 'left' WHERE id = waiter.id;
            ELSIF product.max_per_buyer > 0 AND waiter.buyer_id IS NOT NULL
                  AND buyer_units(product.id, waiter.buyer_id) + waiter.qty > product.max_per_buyer THEN
                UPDATE waiters SET status = 'ended', end_reason = 'buyer_limit' WHERE id = waiter.id;
            ELSIF waiter.qty <= left_units THEN
                hold := gen_random_uuid();
                INSERT INTO holds (id, product_id, qty, status, caller, buyer_id, expires_at,
                                   created_at, updated_at)
                VALUES (hold, product.id, waiter.qty, 'active', waiter.caller, waiter.buyer_id,
                        now() + waiter.hold_ttl, now(), now());
                UPDATE waiters SET status = 'served', hold_id = hold WHERE id = waiter.id;
                left_units := left_units - waiter.qty;
                served := served + 1;
            ELSE
                EXIT;
            END IF;
            changed := true;
            UPDATE products SET waiting = waiting - 1, owed = owed - waiter.qty,
                                reserved = reserved + CASE WHEN hold IS NULL THEN 0 ELSE waiter.qty END
             WHERE id = product.id;
            hold := NULL;
        END LOOP;
        IF changed THEN
            PERFORM pg_notify('flashsale_waitlist', product.id::text);
        END IF;
    END LOOP;
    RETURN served;
END;
$$;

-- join_waitlist: puts a buyer in line for `qty` units of a product and serves the line at
-- once (so a buyer alone in line, with units there, is served right away). Returns the
-- waiter's id. Refuses (raising, nothing written) a product that does not exist
-- (P0002), whose sale has not started or has ended (P0001 with message 'sale_not_started'
-- or 'sale_ended'), more units than the product has in all ('more_than_stock <stock>'), a
-- limited product's join without a buyer ('buyer_required') or a buyer it would take past
-- its limit ('buyer_limit <units the buyer may still take>').
--
-- Guarantees: takes the product's lock (FOR NO KEY UPDATE) first, so joins, leaves and
-- serves of one product serialize and the queue's order is the commit order of joins.
CREATE FUNCTION join_waitlist(product uuid, units int8, buyer text, who text, ttl interval,
                              session int8) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    p      record;
    held   int8;
    joined int8;
BEGIN
    SELECT * INTO p FROM products WHERE id = product FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no product %', product USING ERRCODE = 'P0002';
    END IF;
    IF now() < p.sale_starts_at THEN
        RAISE EXCEPTION 'sale_not_started';
    ELSIF now() >= p.sale_ends_at THEN
        RAISE EXCEPTION 'sale_ended';
    ELSIF units > p.stock_total THEN
        -- it could never be served, and would block everyone behind it
        RAISE EXCEPTION 'more_than_stock %', p.stock_total;
    END IF;
    IF p.max_per_buyer > 0 THEN
        IF buyer IS NULL THEN
            RAISE EXCEPTION 'buyer_required';
        END IF;
        held := buyer_units(product, buyer);
        IF held + units > p.max_per_buyer THEN
            RAISE EXCEPTION 'buyer_limit %', greatest(p.max_per_buyer - held, 0);
        END IF;
    END IF;
    INSERT INTO waiters (product_id, qty, buyer_id, caller, hold_ttl, session)
    VALUES (product, units, buyer, who, ttl, session) RETURNING id INTO joined;
    UPDATE products SET waiting = waiting + 1, owed = owed + units WHERE id = product;
    PERFORM pg_notify('flashsale_waitlist', product::text);
    PERFORM serve_waiters(ARRAY[product]);
    RETURN joined;
END;
$$;

-- leave_waitlist: takes a waiting waiter out of line (status 'left') and serves the line,
-- which may now reach the ones behind it. A waiter no longer waiting is left as it is.
-- Returns its status afterwards and its hold, if it was served.
--
-- Guarantees: the product's lock first, then the waiter's, as serve_waiters.
CREATE FUNCTION leave_waitlist(waiter int8, OUT status text, OUT hold_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    product uuid;
    units   int8;
BEGIN
    SELECT w.product_id INTO product FROM waiters w WHERE w.id = waiter;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM products WHERE id = product FOR NO KEY UPDATE;
    SELECT w.status, w.hold_id, w.qty INTO status, hold_id, units
      FROM waiters w WHERE w.id = waiter FOR UPDATE;
    IF status = 'waiting' THEN
        UPDATE waiters SET status = 'left' WHERE id = waiter;
        UPDATE products SET waiting = waiting - 1, owed = owed - units WHERE id = product;
        PERFORM pg_notify('flashsale_waitlist', product::text);
        PERFORM serve_waiters(ARRAY[product]);
        status := 'left';
    END IF;
END;
$$;

-- end_waiters: turns away every waiter of these products ('ended' with `reason`:
-- 'sale_ended' or 'stock_withdrawn'); returns how many. Takes the products' locks in id
-- order, then their waiters'.
CREATE FUNCTION end_waiters(product_ids uuid[], reason text) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    product uuid;
    ended   int8 := 0;
    n       int8;
BEGIN
    FOR product IN
        SELECT id FROM products WHERE id = ANY (product_ids) AND waiting > 0
         ORDER BY id FOR NO KEY UPDATE
    LOOP
        UPDATE waiters SET status = 'ended', end_reason = reason
         WHERE product_id = product AND status = 'waiting';
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE products SET waiting = 0, owed = 0 WHERE id = product;
        PERFORM pg_notify('flashsale_waitlist', product::text);
        ended := ended + n;
    END LOOP;
    RETURN ended;
END;
$$;
