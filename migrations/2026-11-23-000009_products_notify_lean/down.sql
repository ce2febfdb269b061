-- Back to the notifications of migration 2026-11-23-000002.
DROP TRIGGER products_notify_updates ON products;
DROP TRIGGER products_notify_inserts ON products;
DROP FUNCTION products_notify_changes();

-- A product's stock state as the change listener reads it.
CREATE FUNCTION product_stock_state(p products) RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'product_id', p.id, 'stock_total', p.stock_total, 'reserved', p.reserved,
        'sold', p.sold, 'version', p.version, 'changed_at', p.updated_at)
$$;

-- Sends `states` on the changes channel, 24 to a notification.
CREATE FUNCTION products_announce(states json[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT json_agg(state ORDER BY position)::text
          FROM unnest(states) WITH ORDINALITY AS listed(state, position)
         GROUP BY (position - 1) / 24
    LOOP
        PERFORM pg_notify('flashsale_product_changes', payload);
    END LOOP;
END;
$$;

-- Transition tables exist per event, so each event reads its own.
CREATE FUNCTION products_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        PERFORM products_announce(ARRAY(
            SELECT product_stock_state(n) FROM new_products n));
    ELSE
        PERFORM products_announce(ARRAY(
            SELECT product_stock_state(n)
              FROM new_products n JOIN old_products o ON o.id = n.id
             WHERE n.version <> o.version));
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER products_notify_inserts AFTER INSERT ON products
    REFERENCING NEW TABLE AS new_products
    FOR EACH STATEMENT EXECUTE FUNCTION products_notify_changes();
CREATE TRIGGER products_notify_updates AFTER UPDATE ON products
    REFERENCING OLD TABLE AS old_products NEW TABLE AS new_products
    FOR EACH STATEMENT EXECUTE FUNCTION products_notify_changes();
