-- Drops everything up.sql creates: functions that no trigger runs, then each trigger
-- before its function, then the tables, referencing tables before referenced ones (their
-- indexes and identity sequences go with them).
DROP FUNCTION fold_stock_movements(uuid[]);
DROP FUNCTION reserve_holds(uuid[], uuid[], int4[], int8[], text[], interval, bool);

DROP TRIGGER orders_check_product ON orders;
DROP FUNCTION orders_check_product();

DROP TRIGGER products_keep_held ON products;
DROP FUNCTION products_keep_held();
DROP TRIGGER holds_keep_product ON holds;
DROP FUNCTION holds_keep_product();
DROP TRIGGER holds_check_products ON holds;
DROP FUNCTION holds_check_products();

DROP TRIGGER products_notify_updates ON products;
DROP TRIGGER products_notify_inserts ON products;
DROP FUNCTION products_notify_changes();

DROP TRIGGER products_bump_version ON products;
DROP FUNCTION products_bump_version();

DROP TABLE stock_movements;
DROP TABLE payment_events;
DROP TABLE orders;
DROP TABLE holds;
DROP TABLE stock_adjustments;
DROP TABLE products;
