DROP TABLE payment_events;
DROP TABLE orders;
DROP TABLE holds;
DROP TABLE stock_adjustments;
DROP TABLE products;
DROP FUNCTION products_notify_change();
DROP FUNCTION products_bump_version();
