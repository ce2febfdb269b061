-- Back to the notifications of migration 2026-11-23-000009.
CREATE OR REPLACE FUNCTION products_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    FOR payload IN
        SELECT '[' || string_agg(state, ',') || ']'
          FROM (SELECT row_number() OVER () AS position,
                       '{"product_id":"' || n.id
                       || '","stock_total":' || n.stock_total
                       || ',"reserved":' || n.reserved
                       || ',"sold":' || n.sold
                       || ',"version":' || n.version
                       || ',"changed_at":' || to_json(n.updated_at) || '}' AS state
                  FROM new_products n
                 WHERE TG_OP = 'INSERT' OR n.updated_at = now()) changed
         GROUP BY (position - 1) / 24
    LOOP
        PERFORM pg_notify('flashsale_product_changes', payload);
    END LOOP;
    RETURN NULL;
END;
$$;
