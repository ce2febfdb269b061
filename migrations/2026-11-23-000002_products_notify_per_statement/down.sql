DROP TRIGGER products_notify_updates ON products;
DROP TRIGGER products_notify_inserts ON products;
DROP FUNCTION products_notify_changes();
DROP FUNCTION products_announce(json[]);
DROP FUNCTION product_stock_state(products);

CREATE FUNCTION products_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.version <> OLD.version THEN
        PERFORM pg_notify('flashsale_product_changes', json_build_object(
            'product_id', NEW.id,
            'stock_total', NEW.stock_total,
            'reserved', NEW.reserved,
            'sold', NEW.sold,
            'version', NEW.version,
            'changed_at', NEW.updated_at)::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER products_notify_change AFTER INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_notify_change();
