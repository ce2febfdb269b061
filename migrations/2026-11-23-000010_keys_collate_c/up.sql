-- Client request ids and payment idempotency keys are opaque: they are only ever compared
-- for equality, which byte order (collation "C") decides exactly as the database's default
-- collation did (libc collations are deterministic, ties broken bytewise). What changes is
-- the cost: every index lookup and insert on these keys compared them with strcoll
-- (callgrind, 100-hold batches: text comparisons about 8% of PostgreSQL's instructions
-- with C.UTF-8), and now with memcmp.
ALTER TABLE holds ALTER COLUMN client_request_id TYPE text COLLATE "C";
ALTER TABLE payment_events ALTER COLUMN idempotency_key TYPE text COLLATE "C";
