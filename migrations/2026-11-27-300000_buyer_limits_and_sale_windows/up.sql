-- Per-buyer limits and sale windows: products get max_per_buyer and an optional sale
-- window, holds a buyer id; reserve_holds checks both; watchers are told about both.

ALTER TABLE products ADD COLUMN max_per_buyer BIGINT NOT NULL DEFAULT 0 CHECK (max_per_buyer >= 0);
ALTER TABLE products ADD COLUMN sale_starts_at TIMESTAMPTZ;
ALTER TABLE products ADD COLUMN sale_ends_at TIMESTAMPTZ;
ALTER TABLE products ADD CONSTRAINT products_sale_window_check CHECK (sale_starts_at < sale_ends_at);

ALTER TABLE holds ADD COLUMN buyer_id TEXT COLLATE "C";
CREATE INDEX holds_buyer ON holds (product_id, buyer_id) WHERE buyer_id IS NOT NULL;

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
DROP TRIGGER products_bump_version ON products;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW
    WHEN ((NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at)
          IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at)
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

DROP FUNCTION reserve_holds(uuid[], uuid[], int4[], int8[], text[], text[], interval, bool);

-- buyer_units: the units a buyer has of a product, as max_per_buyer counts them: its
-- active holds, and its holds that became pending or paid orders. Takes no lock: callers
-- hold the product's lock, under which only they can add to the count.
CREATE FUNCTION buyer_units(product uuid, buyer text) RETURNS int8
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(h.qty), 0)::int8
      FROM holds h LEFT JOIN orders o ON o.hold_id = h.id
     WHERE h.product_id = product AND h.buyer_id = buyer
       AND (h.status = 'active' OR o.status IN ('pending', 'paid'));
$$;

-- reserve_holds: a whole batch of hold requests in one statement. Run outside an explicit
-- transaction it is one round trip and one transaction: one row lock per product, one
-- multi-row insert, one counter update per product, one commit.
--
-- Arguments, one element per request in request_ids, request_products, request_qtys,
-- request_callers, request_keys and request_buyers (parallel arrays): the id the hold gets
-- if granted, the 1-based index of its product in product_ids, the units asked, the
-- caller's name, its client request id (NULL for none; a caller's key appears at most once
-- per call) and the buyer id (NULL for none). product_ids: the batch's distinct products,
-- in ascending order. ttl: granted holds expire at now() + ttl.
--
-- Guarantees:
-- - Locks: the existing products among product_ids are locked FOR NO KEY UPDATE, in id
--   order, until the transaction ends, so concurrent batches (and fold_stock_movements,
--   which locks the same way) never deadlock. NO KEY UPDATE is the lock an UPDATE of the
--   counters takes: it lets the KEY SHARE locks of foreign key checks and of
--   holds_check_products pass.
-- - Grants are those sequential calls in request order would give: each request in turn
--   gets all its units if its product is on sale (inside its sale window), its buyer stays
--   within the product's max_per_buyer and the product still has the units, else none.
-- - Never oversells: the grants fit the locked counters, so the counter update needs no
--   guard of its own; were it ever to oversell, products_never_oversold would fail the
--   whole call. A request for qty <= 0 that no other outcome answers fails the whole
--   call too (holds_qty_check).
-- - Never over a buyer's limit: a buyer's units on a product (active holds, and holds
--   converted into pending or paid orders) only grow here, under the product's lock, so
--   the count read under it stays true until the commit.
-- - Exactly one result row per request; ord is its 1-based position. Rows come in no
--   useful order: callers place them by ord. Outcomes:
--     'existing'         its caller's key already names a hold: the hold_* columns are
--                        that hold, as it is, whatever product or quantity the request
--                        asked; no stock is taken and nothing is written for it.
--     'granted'          the hold_* columns are the new active hold; its units are added
--                        to its product's reserved.
--     'insufficient'     units_left is what its product had left when its turn came.
--     'no_product'       its product does not exist (or its index is outside product_ids).
--     'sale_not_started' now() is before its product's sale_starts_at.
--     'sale_ended'       now() is at or after its product's sale_ends_at.
--     'buyer_required'   its product has a max_per_buyer and the request names no buyer.
--     'buyer_limit'      the units would take its buyer over max_per_buyer; units_left is
--                        how many the buyer may still take.
--     'key_taken'        only with skip_taken_keys: a concurrent transaction took its key
--                        (or its hold id) after the lookup; nothing was written for it and
--                        its units stay available. The caller looks the key up again.
--   hold_* columns are NULL unless 'existing' or 'granted'; units_left is NULL unless
--   'insufficient' or 'buyer_limit'.
-- - Retry contract: skip_taken_keys = false inserts plainly; a key taken after the lookup
--   fails the whole call with unique_violation and, the call being one statement, nothing
--   of it stays. The caller then runs the same call again with skip_taken_keys = true,
--   which inserts with ON CONFLICT DO NOTHING and answers 'key_taken' for such requests.
--   Why two modes: ON CONFLICT makes every row a speculative insertion (an extra lock
--   token and confirmation record per row) to serve a race that the lookup makes rare; a
--   PL/pgSQL exception block retrying inside the call would run in a subtransaction, which
--   makes every locked product's update a MultiXact.
-- - The counter update sets version and updated_at itself (products_bump_version is
--   skipped) and is announced by products_notify_updates; the insert is checked by
--   holds_check_products, whose KEY SHARE locks never wait here (the call holds stronger
--   locks on the same products).
-- - A product_ids that is not the sorted list of existing products (a product that does
--   not exist, a caller that did not sort) is served correctly: each request's product is
--   then searched among the locked ones instead of taken by index.
CREATE FUNCTION reserve_holds(
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
