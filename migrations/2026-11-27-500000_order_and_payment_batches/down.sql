-- Back to one order and one payment per statement.
DROP FUNCTION apply_payments(text[], text[], uuid[], text[], text[], int8[]);
DROP FUNCTION create_orders(uuid[], uuid[], interval);
