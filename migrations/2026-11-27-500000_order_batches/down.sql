-- Back to one order per statement.
DROP FUNCTION create_orders(uuid[], uuid[], interval);
