ALTER TABLE holds ALTER COLUMN client_request_id TYPE text COLLATE "default";
ALTER TABLE payment_events ALTER COLUMN idempotency_key TYPE text COLLATE "default";
