-- Back to orders without deadlines, refunds owed recorded as ignored, admin writes
-- without retry keys.
DROP INDEX payment_events_received_at;
DROP INDEX payment_events_refunds_owed;
ALTER TABLE payment_events DROP CONSTRAINT payment_events_refunded_if_owed;
ALTER TABLE payment_events DROP COLUMN refunded_at;
UPDATE payment_events SET outcome = 'ignored' WHERE outcome = 'refund_required';
ALTER TABLE payment_events DROP CONSTRAINT payment_events_outcome_check;
ALTER TABLE payment_events ADD CONSTRAINT payment_events_outcome_check
    CHECK (outcome IN ('applied', 'deferred', 'ignored'));

DROP INDEX orders_pending_payment_due_at;
ALTER TABLE orders DROP CONSTRAINT orders_cancelled_with_reason;
ALTER TABLE orders DROP COLUMN cancel_reason;
ALTER TABLE orders DROP COLUMN payment_due_at;

DROP INDEX stock_adjustments_request_id_key;
ALTER TABLE stock_adjustments DROP COLUMN request_id;
ALTER TABLE stock_adjustments DROP COLUMN caller;
DROP INDEX products_request_id_key;
ALTER TABLE products DROP COLUMN request_id;
ALTER TABLE products DROP COLUMN caller;
