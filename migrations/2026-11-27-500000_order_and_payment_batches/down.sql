-- Back to one order, one payment and one release per statement.
DROP FUNCTION release_holds(uuid[]);
DROP FUNCTION apply_payments(text[], text[], uuid[], text[], text[], int8[]);
DROP FUNCTION create_orders(uuid[], uuid[], interval);
