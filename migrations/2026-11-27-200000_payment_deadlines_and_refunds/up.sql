-- Orders get a payment deadline and say why they were cancelled; a success that cannot be
-- applied is stored as a refund owed; admin writes get retry keys.

-- Products and stock changes: who made them, and an optional retry key per caller.
ALTER TABLE products ADD COLUMN caller TEXT COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE products ALTER COLUMN caller DROP DEFAULT;
ALTER TABLE products ADD COLUMN request_id TEXT COLLATE "C";
CREATE UNIQUE INDEX products_request_id_key ON products (caller, request_id)
    WHERE request_id IS NOT NULL;
ALTER TABLE stock_adjustments ADD COLUMN caller TEXT COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE stock_adjustments ALTER COLUMN caller DROP DEFAULT;
ALTER TABLE stock_adjustments ADD COLUMN request_id TEXT COLLATE "C";
CREATE UNIQUE INDEX stock_adjustments_request_id_key ON stock_adjustments (caller, request_id)
    WHERE request_id IS NOT NULL;

-- Orders made before this migration are due 15 minutes after creation (the default
-- FLASHSALE_PAYMENT_TTL); the cancelled ones were cancelled by a failed payment.
ALTER TABLE orders ADD COLUMN payment_due_at TIMESTAMPTZ;
UPDATE orders SET payment_due_at = created_at + interval '15 minutes';
ALTER TABLE orders ALTER COLUMN payment_due_at SET NOT NULL;
ALTER TABLE orders ADD COLUMN cancel_reason TEXT
    CHECK (cancel_reason IN ('payment_failed', 'payment_timeout', 'buyer_cancelled'));
UPDATE orders SET cancel_reason = 'payment_failed' WHERE status = 'cancelled';
ALTER TABLE orders ADD CONSTRAINT orders_cancelled_with_reason
    CHECK ((status = 'cancelled') = (cancel_reason IS NOT NULL));
CREATE INDEX orders_pending_payment_due_at ON orders (payment_due_at) WHERE status = 'pending';

-- Successes recorded as ignored because their order was cancelled or their hold ended
-- were refunds owed all along: say so.
ALTER TABLE payment_events DROP CONSTRAINT payment_events_outcome_check;
ALTER TABLE payment_events ADD CONSTRAINT payment_events_outcome_check
    CHECK (outcome IN ('applied', 'deferred', 'ignored', 'refund_required'));
UPDATE payment_events SET outcome = 'refund_required'
 WHERE outcome = 'ignored' AND result = 'success'
   AND (order_id IS NULL OR order_status = 'cancelled');
ALTER TABLE payment_events ADD COLUMN refunded_at TIMESTAMPTZ;
ALTER TABLE payment_events ADD CONSTRAINT payment_events_refunded_if_owed
    CHECK (refunded_at IS NULL OR outcome = 'refund_required');
CREATE INDEX payment_events_refunds_owed ON payment_events (received_at, caller, idempotency_key)
    WHERE outcome = 'refund_required' AND refunded_at IS NULL;
CREATE INDEX payment_events_received_at ON payment_events (received_at);
