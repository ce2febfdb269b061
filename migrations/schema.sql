-- schema.sql: this file always shows the whole current schema, as a freshly migrated
-- database has it. Migrations change the database; this file is updated with every
-- migration that changes the schema, and a test checks that a database built from this
-- file equals one built from the migrations. (diesel reads only the migration directories
-- beside it, never this file.)

-- The checkout schema: every table, index, function and trigger, each in its final form.
--
-- Stock lives on one row per product (`products`: stock_total, reserved, sold). Every write
-- of a product's counters holds that row's lock until its transaction ends; code that locks
-- several products locks them in id order FOR NO KEY UPDATE (reserve_holds,
-- fold_stock_movements), so such writers never deadlock with each other. References to a
-- product from the hot paths (holds, orders, stock_movements) are checked without a
-- per-row foreign key, each for its own reason given below; the checks that stand in for a
-- foreign key raise foreign_key_violation under the constraint name a foreign key would
-- have (holds_product_id_fkey, orders_product_id_fkey), so callers handle them alike.
-- Whatever any code does, products_never_oversold refuses to sell or hold more units than
-- a product has.
--
-- The batch functions of the hot paths (reserve_holds, create_orders, apply_payments,
-- release_holds, fold_stock_movements) reach rows by key only, and run with
-- enable_seqscan off: PL/pgSQL keeps a statement's plan for the session, and a plan made
-- while a table looked small (a fresh sale's tables, until autovacuum's first ANALYZE)
-- would scan the table whole for every batch once it holds thousands of rows. For the
-- same reason they decide on the rows their locks returned rather than joining the table
-- again, where a partial index (active holds, pending orders) could be picked to scan
-- every active row.


-- ===================================================================== tables and indexes

-- One row per product: its stock counters and their version.
--
-- Guarantees, whatever the code does:
-- - available = stock_total - reserved - sold never drops below 0
--   (products_never_oversold), and no counter is negative: a statement that would break
--   either fails as a whole.
-- - Every update that changes stock_total, reserved or sold leaves version = old version + 1
--   and updated_at = now() (products_bump_version), and is announced to listeners after it
--   commits (products_notify_changes), as is every inserted product.
-- - A product cannot be deleted or change its id while a hold (products_keep_held) or a
--   stock adjustment (foreign key) names it.
-- `reserved` counts the units of active holds and pending orders, plus units whose release
-- or settlement is recorded in stock_movements and not folded yet: while movements wait,
-- the row overstates what is held and understates what is available, never the reverse.
CREATE TABLE products (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL CHECK (name <> ''),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    stock_total BIGINT NOT NULL CHECK (stock_total >= 0),
    reserved    BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold        BIGINT NOT NULL DEFAULT 0 CHECK (sold >= 0),
    -- grows by one with every stock change, so watchers and callers can order states
    version     BIGINT NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the start time of the transaction that made the latest stock change
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- never oversell: available = stock_total - reserved - sold >= 0, whatever the code does
    CONSTRAINT products_never_oversold CHECK (reserved + sold <= stock_total),
    -- the name of the token that created it ('' on a server without tokens)
    caller      TEXT COLLATE "C" NOT NULL,
    -- the creator's retry key: the same key from the same caller finds this product
    request_id  TEXT COLLATE "C",
    -- most units one buyer may hold or have ordered (pending or paid); 0: no limit
    max_per_buyer BIGINT NOT NULL DEFAULT 0 CHECK (max_per_buyer >= 0),
    -- the sale window: holds are granted from sale_starts_at (if set) until before
    -- sale_ends_at (if set)
    sale_starts_at TIMESTAMPTZ,
    sale_ends_at   TIMESTAMPTZ,
    CONSTRAINT products_sale_window_check CHECK (sale_starts_at < sale_ends_at),
    -- the waitlist: how many wait, and the units they ask (owed before any new hold)
    waiting     BIGINT NOT NULL DEFAULT 0 CHECK (waiting >= 0),
    owed        BIGINT NOT NULL DEFAULT 0 CHECK (owed >= 0)
);
-- one product per caller's CreateProduct request id
CREATE UNIQUE INDEX products_request_id_key ON products (caller, request_id)
    WHERE request_id IS NOT NULL;

-- Every change of a product's stock_total, its initial stock included, so the audit can
-- recompute stock_total as the sum of the deltas. The schema does not tie that sum to
-- products.stock_total; the audit (src/db/audit.rs) compares them. A plain foreign key:
-- an adjustment's product exists, and a product with adjustments cannot be deleted.
CREATE TABLE stock_adjustments (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id  UUID NOT NULL REFERENCES products (id),
    delta       BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the name of the token that made the change ('' on a server without tokens)
    caller      TEXT COLLATE "C" NOT NULL,
    -- an AdjustStock's retry key: the same key from the same caller finds this change
    -- (a product's initial stock carries none: CreateProduct's key is on the product)
    request_id  TEXT COLLATE "C"
);
-- the audit's sum per product
CREATE INDEX stock_adjustments_product_id ON stock_adjustments (product_id);
-- one stock change per caller's AdjustStock request id
CREATE UNIQUE INDEX stock_adjustments_request_id_key ON stock_adjustments (caller, request_id)
    WHERE request_id IS NOT NULL;

-- One row per hold: units of one product set aside for a buyer until expires_at.
--
-- Guarantees:
-- - qty > 0 and status is one of 'active', 'converted', 'expired', 'released' (the schema
--   checks the values, not the transitions between them).
-- - At most one hold per caller and client_request_id (holds_client_request_id_key): the
--   caller's retry key, so the same key from the same caller always finds the same hold,
--   and another caller's same key is another key.
-- - Its product exists when the hold is inserted, never changes, and cannot be deleted or
--   re-keyed while the hold exists (deleting at READ COMMITTED: see products_keep_held).
--   No foreign key enforces this, three triggers do
--   (holds_check_products, holds_keep_product, products_keep_held) with a foreign key's
--   errors. Why: holds are inserted in batches, one statement of many rows, and a foreign
--   key checks and KEY SHARE-locks the product once per row; the statement trigger does it
--   once per product per statement.
-- client_request_id has collation "C": keys are opaque and only compared for equality,
-- which byte order decides exactly as any deterministic collation would, and memcmp is
-- cheaper than strcoll on every index lookup and insert.
CREATE TABLE holds (
    id                UUID PRIMARY KEY,
    product_id        UUID NOT NULL,
    qty               BIGINT NOT NULL CHECK (qty > 0),
    status            TEXT NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'converted', 'expired', 'released')),
    -- the caller's retry key: the same id returns the same hold
    client_request_id TEXT COLLATE "C",
    expires_at        TIMESTAMPTZ NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the name of the token that created the hold ('' on a server without tokens): its
    -- client_request_id is unique among that caller's holds only
    caller            TEXT COLLATE "C" NOT NULL,
    -- the caller's opaque buyer id, counted against the product's max_per_buyer
    buyer_id          TEXT COLLATE "C"
);
CREATE UNIQUE INDEX holds_client_request_id_key ON holds (caller, client_request_id)
    WHERE client_request_id IS NOT NULL;
-- the reaper's queue: active holds by expiry; also the audit's one pass over active holds
CREATE INDEX holds_active_expires_at ON holds (expires_at) WHERE status = 'active';
-- a buyer's holds on a product, for its limit (only holds that name a buyer)
CREATE INDEX holds_buyer ON holds (product_id, buyer_id) WHERE buyer_id IS NOT NULL;
-- Holds are deliberately not indexed by product: every hold of a hot product would carry
-- the same key, and maintaining it on every hold costs more than its readers need (the
-- audit sums active holds per product in one pass over holds_active_expires_at; deleting
-- a product, which products_keep_held checks by scanning holds, is rare).

-- One row per order, made from one hold.
--
-- Guarantees:
-- - A hold becomes at most one order (orders_hold_id_key), and the hold exists
--   (orders_hold_id_fkey).
-- - product_id is the hold's product (orders_check_product, raising the error of a foreign
--   key "orders_product_id_fkey"); since a hold's product never changes and cannot be
--   deleted while the hold exists, an order's product exists as long as the order does.
--   Why no foreign key to products: its check would KEY SHARE-lock the product's row for
--   every order; on a hot product those lockers overlap each other and the hold batches'
--   updates of the row, and PostgreSQL has to track each such set of lockers in a
--   MultiXact. The hold's row, which the order's creator has locked already, carries the
--   same guarantee.
-- - qty > 0, total_cents >= 0, status is 'pending', 'paid' or 'cancelled'. qty and
--   total_cents are the caller's: not checked against the hold or the price.
-- - A cancelled order says why, and only a cancelled one (orders_cancelled_with_reason):
--   'payment_failed' (a failure webhook), 'payment_timeout' (unpaid at payment_due_at) or
--   'buyer_cancelled' (CancelOrder).
CREATE TABLE orders (
    id             UUID PRIMARY KEY,
    -- one hold, at most one order
    hold_id        UUID NOT NULL UNIQUE REFERENCES holds (id),
    product_id     UUID NOT NULL,
    qty            BIGINT NOT NULL CHECK (qty > 0),
    total_cents    BIGINT NOT NULL CHECK (total_cents >= 0),
    status         TEXT NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'paid', 'cancelled')),
    failure_reason TEXT NOT NULL DEFAULT '',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- the payment deadline, set at creation: still pending then, the order is cancelled
    payment_due_at TIMESTAMPTZ NOT NULL,
    -- why a cancelled order was cancelled; NULL for any other
    cancel_reason  TEXT
                   CHECK (cancel_reason IN ('payment_failed', 'payment_timeout', 'buyer_cancelled')),
    CONSTRAINT orders_cancelled_with_reason CHECK ((status = 'cancelled') = (cancel_reason IS NOT NULL))
);
-- the audit's sums of pending and paid orders per product
CREATE INDEX orders_product_id ON orders (product_id);
-- the reaper's queue: pending orders by payment deadline
CREATE INDEX orders_pending_payment_due_at ON orders (payment_due_at) WHERE status = 'pending';

-- One row per payment webhook idempotency key of each caller: one key, one effect (a
-- redelivery finds the row and changes nothing). The key is the caller's (the payment
-- adapter's token name): another caller's same key is another event.
--
-- Guarantees:
-- - Exactly one target, an order or a hold that may not be an order yet
--   (payment_events_one_target), and it exists (foreign keys).
-- - A 'deferred' event (its hold not an order yet) has no resolved order and no processing
--   time (payment_events_deferred_unresolved).
-- - 'refund_required': a success that could not be applied (its order was cancelled, or
--   it waited on a hold that expired or was released): money was taken for no goods. Only
--   such an event is ever marked refunded (payment_events_refunded_if_owed).
-- idempotency_key has collation "C", for the reason given at holds.client_request_id.
CREATE TABLE payment_events (
    idempotency_key  TEXT COLLATE "C" NOT NULL,
    -- the target exactly as delivered: an order, or a hold that may not be an order yet
    target_order_id  UUID REFERENCES orders (id),
    target_hold_id   UUID REFERENCES holds (id),
    result           TEXT NOT NULL CHECK (result IN ('success', 'failure')),
    failure_reason   TEXT NOT NULL DEFAULT '',
    amount_cents     BIGINT NOT NULL DEFAULT 0,
    outcome          TEXT NOT NULL
                     CONSTRAINT payment_events_outcome_check
                     CHECK (outcome IN ('applied', 'deferred', 'ignored', 'refund_required')),
    -- the order the event resolved to, and its status right after; NULL while deferred
    -- and when closed as ignored because its hold expired or was released
    order_id         UUID REFERENCES orders (id),
    order_status     TEXT CHECK (order_status IN ('pending', 'paid', 'cancelled')),
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- when the event was applied or ignored; NULL while deferred
    processed_at     TIMESTAMPTZ,
    -- the name of the token that delivered it ('' on a server without tokens)
    caller           TEXT COLLATE "C" NOT NULL,
    CONSTRAINT payment_events_pkey PRIMARY KEY (caller, idempotency_key),
    CONSTRAINT payment_events_one_target CHECK ((target_order_id IS NULL) <> (target_hold_id IS NULL)),
    CONSTRAINT payment_events_deferred_unresolved CHECK (outcome <> 'deferred' OR (order_id IS NULL AND processed_at IS NULL)),
    -- when an operator said the refund owed was made (MarkRefunded)
    refunded_at      TIMESTAMPTZ,
    CONSTRAINT payment_events_refunded_if_owed CHECK (refunded_at IS NULL OR outcome = 'refund_required')
);
-- a hold's deferred events in arrival order, found when the hold becomes an order
CREATE INDEX payment_events_deferred_by_hold ON payment_events (target_hold_id, received_at)
    WHERE outcome = 'deferred';
-- the refunds still owed, oldest first (ListRefundsRequired)
CREATE INDEX payment_events_refunds_owed ON payment_events (received_at, caller, idempotency_key)
    WHERE outcome = 'refund_required' AND refunded_at IS NULL;
-- the reaper's sweep of keys past their retention
CREATE INDEX payment_events_received_at ON payment_events (received_at);

-- One row per JoinWaitlist call: a buyer waiting, in join order (id), for units of a sold-out
-- product to come back.
--
-- Guarantees:
-- - Only 'waiting' rows are in the queue (waiters_queue); a product's waiting and owed
--   count them and their units (changed only under the product's row lock, by
--   join_waitlist, leave_waitlist, serve_waiters and end_waiters).
-- - A 'served' waiter names the hold made for it (waiters_served_with_hold); it moves on
--   from 'waiting' exactly once, under its row lock.
-- - session is the advisory-lock key the waiting stream's server process holds while it
--   lives; a waiter whose process holds it no more is skipped when its turn comes.
-- product_id has a foreign key: joins take the product's lock anyway.
CREATE TABLE waiters (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id  UUID NOT NULL REFERENCES products (id),
    qty         BIGINT NOT NULL CHECK (qty > 0),
    buyer_id    TEXT COLLATE "C",
    caller      TEXT COLLATE "C" NOT NULL,
    -- the TTL of the hold it gets (the joining process's setting)
    hold_ttl    INTERVAL NOT NULL,
    session     BIGINT NOT NULL,
    status      TEXT NOT NULL DEFAULT 'waiting'
                CHECK (status IN ('waiting', 'served', 'left', 'ended')),
    -- why an 'ended' waiter was turned away
    end_reason  TEXT CHECK (end_reason IN ('sale_ended', 'stock_withdrawn', 'buyer_limit')),
    hold_id     UUID REFERENCES holds (id),
    joined_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT waiters_served_with_hold CHECK ((status = 'served') = (hold_id IS NOT NULL)),
    CONSTRAINT waiters_ended_with_reason CHECK ((status = 'ended') = (end_reason IS NOT NULL))
);
-- each product's queue in join order
CREATE INDEX waiters_queue ON waiters (product_id, id) WHERE status = 'waiting';

-- Counter movements of a hold's units, waiting to be folded into their product's counters
-- (fold_stock_movements). Settlements of orders and releases of holds record a movement
-- here instead of updating the product's row, so they take no lock on a hot product and do
-- not queue behind its other writers; folds apply many movements per product at a time.
--
-- Guarantees:
-- - A movement only ever lowers `reserved` (reserved_delta < 0) and moves at most those
--   units on to `sold` (0 <= sold_delta <= -reserved_delta, stock_movements_check): while it
--   waits, its product's row overstates what is held, so no hold can oversell. The audit
--   adds pending movements to the row.
-- - Its hold exists and product_id is that hold's product (stock_movements_check_hold,
--   raising the error of a foreign key "stock_movements_hold_id_fkey").
-- Neither column has a foreign key: a check of product_id would KEY SHARE-lock the
-- product's row, which is what this table avoids, and one of hold_id would KEY SHARE-lock
-- the hold while the settlement holds its order's lock, against the order every other
-- transaction takes them in (holds before orders; see stock_movements_check_hold). The hold
-- names the product, and a product with holds cannot be deleted; holds are never deleted.
CREATE TABLE stock_movements (
    id             BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- no foreign key: see above
    product_id     UUID NOT NULL,
    -- the hold whose units move: a settled order's hold, or a hold released or expired (no
    -- foreign key: see above)
    hold_id        UUID NOT NULL,
    reserved_delta BIGINT NOT NULL CHECK (reserved_delta < 0),
    sold_delta     BIGINT NOT NULL CHECK (sold_delta >= 0 AND sold_delta <= -reserved_delta),
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- the fold's delete per product, and the audit's sums
CREATE INDEX stock_movements_product_id ON stock_movements (product_id);


-- ============================================================ products: version and time

-- products_bump_version: every update of a product row that changes what watchers see
-- (stock_total, reserved, sold, max_per_buyer, the sale window, waiting) leaves version = old
-- version + 1 and updated_at = now(), so no code path can forget the bump. Takes no lock beyond the updated row's, which the UPDATE holds already.
-- The function sets both whenever the counters changed; the trigger's WHEN runs it only
-- when the update changed the counters without setting (version, updated_at) to exactly
-- (old version + 1, now()) itself. reserve_holds and fold_stock_movements update many
-- products per statement and bump them in the statement, so they skip one PL/pgSQL call
-- per row with the same result.
CREATE FUNCTION products_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at, NEW.waiting)
       IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at, OLD.waiting) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each update of products; skipped by updates that bump themselves.
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW
    WHEN ((NEW.stock_total, NEW.reserved, NEW.sold, NEW.max_per_buyer, NEW.sale_starts_at, NEW.sale_ends_at, NEW.waiting)
          IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold, OLD.max_per_buyer, OLD.sale_starts_at, OLD.sale_ends_at, OLD.waiting)
          AND (NEW.version, NEW.updated_at) IS DISTINCT FROM (OLD.version + 1, now()))
    EXECUTE FUNCTION products_bump_version();


-- ==================================================== products: change notifications

-- products_notify_changes: every committed stock change is announced to every server
-- process listening on channel flashsale_product_changes. NOTIFY is transactional: a
-- change is heard only if, and after, its transaction commits, and notifications reach
-- listeners in commit order. Every transaction that notifies takes PostgreSQL's notify
-- queue lock at commit, so commits of stock changes serialize for that moment; the
-- function takes no other lock.
--
-- Announced, once per statement: every product the statement inserted, and every product
-- it updated whose updated_at is now(), that is whose counters this transaction changed
-- (products_bump_version guarantees a counter change sets it). Each product's state is
-- its state right after the statement. A product changed by several statements of one
-- transaction (or updated again after a change in it) may be announced more than once,
-- each time with the state after that statement; listeners keep a product's state only
-- when its version grows.
--
-- Payload, parsed by the server's change feed (ChangeNotification in
-- src/domain/availability.rs; change both together):
--   {"changed_at": <now() as JSON>, "products": [{"product_id": "<uuid>",
--    "stock_total": n, "reserved": n, "sold": n, "version": n, "max_per_buyer": n,
--    "sale_starts_at": <timestamp as JSON or null>, "sale_ends_at": <same>,
--    "waiting": n}, ...]}
-- changed_at is the changing transaction's start time, the time of every state in it.
-- Products are in no particular order, at most 16 per notification: a product's part is
-- at most about 320 bytes, so a notification stays well under NOTIFY's 8000-byte payload
-- limit. A statement that changed nothing sends nothing.
CREATE FUNCTION products_notify_changes() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    states text[];
    header text;
    first  int4 := 1;
BEGIN
    states := ARRAY(
        SELECT '{"product_id":"' || n.id
               || '","stock_total":' || n.stock_total
               || ',"reserved":' || n.reserved
               || ',"sold":' || n.sold
               || ',"version":' || n.version
               || ',"max_per_buyer":' || n.max_per_buyer
               || ',"sale_starts_at":' || coalesce(to_json(n.sale_starts_at)::text, 'null')
               || ',"sale_ends_at":' || coalesce(to_json(n.sale_ends_at)::text, 'null')
               || ',"waiting":' || n.waiting || '}'
          FROM new_products n
         WHERE TG_OP = 'INSERT' OR n.updated_at = now());
    header := '{"changed_at":' || to_json(now()) || ',"products":[';
    WHILE first <= cardinality(states) LOOP
        PERFORM pg_notify('flashsale_product_changes',
                          header || array_to_string(states[first:first + 15], ',') || ']}');
        first := first + 16;
    END LOOP;
    RETURN NULL;
END;
$$;
-- Statement-level, after each INSERT into products: announces every inserted product.
-- (Transition tables exist per event, so inserts and updates have a trigger each.)
CREATE TRIGGER products_notify_inserts AFTER INSERT ON products
    REFERENCING NEW TABLE AS new_products
    FOR EACH STATEMENT EXECUTE FUNCTION products_notify_changes();
-- Statement-level, after each UPDATE of products: announces the products whose counters
-- the transaction changed. It keeps no OLD TABLE: updated_at = now() tells a change.
CREATE TRIGGER products_notify_updates AFTER UPDATE ON products
    REFERENCING NEW TABLE AS new_products
    FOR EACH STATEMENT EXECUTE FUNCTION products_notify_changes();


-- ============================================== holds -> products: the reference checks
--
-- Together, the three triggers below give holds.product_id the guarantees of a foreign key
-- to products (see the holds table), with a foreign key's SQLSTATE (23503,
-- foreign_key_violation), constraint name "holds_product_id_fkey" and messages. The
-- messages are matched word for word as a foreign key's would be: keep them so.

-- holds_check_products: every product an INSERT statement's new holds name exists, and
-- stays locked FOR KEY SHARE until the inserting transaction ends, so a concurrent DELETE
-- or id change of it waits for that transaction and then sees its holds
-- (products_keep_held refuses it). Refuses the whole statement otherwise. KEY SHARE does
-- not conflict with FOR NO KEY UPDATE or with updates of the counters, so the check never
-- waits for reserve_holds, folds or other stock changes (reserve_holds has the products
-- locked already in the same transaction). The named products are collected once per
-- statement and locked by id, in no particular order: only a DELETE, an id change or a
-- FOR UPDATE lock of a product conflicts with them.
CREATE FUNCTION holds_check_products() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    named   uuid[];
    present bigint;
BEGIN
    SELECT array_agg(DISTINCT product_id) INTO named FROM new_holds;
    SELECT count(*) INTO present FROM (
        SELECT 1 FROM products WHERE id = ANY (named) FOR KEY SHARE
    ) locked;
    IF present < cardinality(named) THEN
        RAISE EXCEPTION 'insert or update on table "holds" violates foreign key constraint "holds_product_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a hold names a product that is not present in table "products"',
                  TABLE = 'holds', CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    RETURN NULL;
END;
$$;
-- Statement-level, after each INSERT into holds, over the statement's new rows.
CREATE TRIGGER holds_check_products AFTER INSERT ON holds
    REFERENCING NEW TABLE AS new_holds
    FOR EACH STATEMENT EXECUTE FUNCTION holds_check_products();

-- holds_keep_product: a hold never moves to another product, so the check made when it was
-- inserted stays true. Refuses any update that changes product_id (setting it to its
-- current value passes). Takes no lock.
CREATE FUNCTION holds_keep_product() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.product_id <> OLD.product_id THEN
        RAISE EXCEPTION 'a hold cannot move to another product'
            USING ERRCODE = 'foreign_key_violation', TABLE = 'holds',
                  CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each update of holds that sets product_id.
CREATE TRIGGER holds_keep_product BEFORE UPDATE OF product_id ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_keep_product();

-- products_keep_held: a product that any hold names cannot be deleted or change its id;
-- refused with the error a foreign key's check would raise. Runs after the DELETE or
-- UPDATE has locked the product's row, so it waits for any transaction whose new holds
-- hold the product FOR KEY SHARE (holds_check_products) and, at READ COMMITTED, then sees
-- them. At REPEATABLE READ its snapshot misses holds committed while it waited and the
-- delete goes through (a foreign key would fail it): delete products at READ COMMITTED.
-- Scans holds, which are not indexed by product: products are rarely deleted.
CREATE FUNCTION products_keep_held() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (TG_OP = 'DELETE' OR NEW.id <> OLD.id)
       AND EXISTS (SELECT 1 FROM holds WHERE product_id = OLD.id) THEN
        RAISE EXCEPTION 'update or delete on table "products" violates foreign key constraint "holds_product_id_fkey" on table "holds"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = format('Key (id)=(%s) is still referenced from table "holds".', OLD.id),
                  TABLE = 'products', CONSTRAINT = 'holds_product_id_fkey';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each DELETE of a product and each update that sets its id.
CREATE TRIGGER products_keep_held BEFORE DELETE OR UPDATE OF id ON products
    FOR EACH ROW EXECUTE FUNCTION products_keep_held();


-- ======================================================= orders -> products, via the hold

-- orders_check_product: an order's product_id is its hold's product. Refuses the row
-- otherwise with the error of a foreign key "orders_product_id_fkey" (SQLSTATE 23503);
-- an order naming no existing hold is refused here too, under that name, before its
-- foreign key to holds is checked. Reads the hold's row without locking it and takes no
-- lock on products (see the orders table for why); the hold's foreign key check locks the
-- hold FOR KEY SHARE.
CREATE FUNCTION orders_check_product() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM holds WHERE id = NEW.hold_id AND product_id = NEW.product_id) THEN
        RAISE EXCEPTION 'insert or update on table "orders" violates foreign key constraint "orders_product_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'an order names the product of its hold',
                  TABLE = 'orders', CONSTRAINT = 'orders_product_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each insert into orders and each update that sets hold_id or product_id.
CREATE TRIGGER orders_check_product BEFORE INSERT OR UPDATE OF hold_id, product_id ON orders
    FOR EACH ROW EXECUTE FUNCTION orders_check_product();


-- ================================================== stock_movements -> holds, unlocked

-- stock_movements_check_hold: a movement names an existing hold and that hold's product.
-- Refuses the row otherwise with the error of a foreign key "stock_movements_hold_id_fkey"
-- (SQLSTATE 23503). Reads the hold's row without locking it: a foreign key's check would
-- lock it FOR KEY SHARE, and a settlement (payment, cancellation, the reaper's deadline)
-- records its movement while holding its order's lock, so it would wait for a hold that a
-- payment aimed at the hold had locked before asking for that order: a deadlock, broken by
-- PostgreSQL after deadlock_timeout. Sound without the lock: nothing deletes a hold, and a
-- hold never changes product (holds_keep_product).
CREATE FUNCTION stock_movements_check_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM holds WHERE id = NEW.hold_id AND product_id = NEW.product_id) THEN
        RAISE EXCEPTION 'insert or update on table "stock_movements" violates foreign key constraint "stock_movements_hold_id_fkey"'
            USING ERRCODE = 'foreign_key_violation',
                  DETAIL = 'a movement names an existing hold and that hold''s product',
                  TABLE = 'stock_movements', CONSTRAINT = 'stock_movements_hold_id_fkey';
    END IF;
    RETURN NEW;
END;
$$;
-- Row-level, before each insert into stock_movements and each update that sets hold_id or
-- product_id.
CREATE TRIGGER stock_movements_check_hold
    BEFORE INSERT OR UPDATE OF hold_id, product_id ON stock_movements
    FOR EACH ROW EXECUTE FUNCTION stock_movements_check_hold();


-- ========================================================== reserving stock: hold batches

-- buyer_units: the units a buyer has of a product, as max_per_buyer counts them: its
-- active holds, and its holds that became pending or paid orders. Takes no lock: callers
-- hold the product's lock, under which only they can add to the count.
CREATE FUNCTION buyer_units(product uuid, buyer text) RETURNS int8
LANGUAGE sql STABLE AS $$
    SELECT coalesce(sum(h.qty), 0)::int8
      FROM holds h LEFT JOIN orders o ON o.hold_id = h.id
     WHERE h.product_id = product AND h.buyer_id = buyer
       AND (h.status = 'active' OR o.status IN ('pending', 'paid'));
$$;

-- reserve_holds: a whole batch of hold requests in one statement. Run outside an explicit
-- transaction it is one round trip and one transaction: one row lock per product, one
-- multi-row insert, one counter update per product, one commit.
--
-- Arguments, one element per request in request_ids, request_products, request_qtys,
-- request_callers, request_keys and request_buyers (parallel arrays): the id the hold gets
-- if granted, the 1-based index of its product in product_ids, the units asked, the
-- caller's name, its client request id (NULL for none; a caller's key appears at most once
-- per call) and the buyer id (NULL for none). product_ids: the batch's distinct products,
-- in ascending order. ttl: granted holds expire at now() + ttl.
--
-- Guarantees:
-- - Locks: the existing products among product_ids are locked FOR NO KEY UPDATE, in id
--   order, until the transaction ends, so concurrent batches (and fold_stock_movements,
--   which locks the same way) never deadlock. NO KEY UPDATE is the lock an UPDATE of the
--   counters takes: it lets the KEY SHARE locks of foreign key checks and of
--   holds_check_products pass.
-- - Grants are those sequential calls in request order would give: each request in turn
--   gets all its units if its product is on sale (inside its sale window), its buyer stays
--   within the product's max_per_buyer and the product still has the units no waiter is
--   owed (products.owed), else none.
-- - Never oversells: the grants fit the locked counters, so the counter update needs no
--   guard of its own; were it ever to oversell, products_never_oversold would fail the
--   whole call. A request for qty <= 0 that no other outcome answers fails the whole
--   call too (holds_qty_check).
-- - Never over a buyer's limit: a buyer's units on a product (active holds, and holds
--   converted into pending or paid orders) only grow here, under the product's lock, so
--   the count read under it stays true until the commit.
-- - Exactly one result row per request; ord is its 1-based position. Rows come in no
--   useful order: callers place them by ord. Outcomes:
--     'existing'         its caller's key already names a hold: the hold_* columns are
--                        that hold, as it is, whatever product or quantity the request
--                        asked; no stock is taken and nothing is written for it.
--     'granted'          the hold_* columns are the new active hold; its units are added
--                        to its product's reserved.
--     'insufficient'     units_left is what its product had left when its turn came: its
--                        available units less those owed to its waitlist.
--     'no_product'       its product does not exist (or its index is outside product_ids).
--     'sale_not_started' now() is before its product's sale_starts_at.
--     'sale_ended'       now() is at or after its product's sale_ends_at.
--     'buyer_required'   its product has a max_per_buyer and the request names no buyer.
--     'buyer_limit'      the units would take its buyer over max_per_buyer; units_left is
--                        how many the buyer may still take.
--     'key_taken'        only with skip_taken_keys: a concurrent transaction took its key
--                        (or its hold id) after the lookup; nothing was written for it and
--                        its units stay available. The caller looks the key up again.
--   hold_* columns are NULL unless 'existing' or 'granted'; units_left is NULL unless
--   'insufficient' or 'buyer_limit'.
-- - Retry contract: skip_taken_keys = false inserts plainly; a key taken after the lookup
--   fails the whole call with unique_violation and, the call being one statement, nothing
--   of it stays. The caller then runs the same call again with skip_taken_keys = true,
--   which inserts with ON CONFLICT DO NOTHING and answers 'key_taken' for such requests.
--   Why two modes: ON CONFLICT makes every row a speculative insertion (an extra lock
--   token and confirmation record per row) to serve a race that the lookup makes rare; a
--   PL/pgSQL exception block retrying inside the call would run in a subtransaction, which
--   makes every locked product's update a MultiXact.
-- - The counter update sets version and updated_at itself (products_bump_version is
--   skipped) and is announced by products_notify_updates; the insert is checked by
--   holds_check_products, whose KEY SHARE locks never wait here (the call holds stronger
--   locks on the same products).
-- - A product_ids that is not the sorted list of existing products (a product that does
--   not exist, a caller that did not sort) is served correctly: each request's product is
--   then searched among the locked ones instead of taken by index.
CREATE FUNCTION reserve_holds(
    request_ids uuid[], product_ids uuid[], request_products int4[], request_qtys int8[],
    request_callers text[], request_keys text[], request_buyers text[], ttl interval,
    skip_taken_keys bool
) RETURNS TABLE (ord int4, outcome text, units_left int8, hold_id uuid,
                hold_product_id uuid, hold_qty int8, hold_status text,
                hold_client_request_id text, hold_expires_at timestamptz,
                hold_created_at timestamptz, hold_updated_at timestamptz,
                hold_buyer_id text)
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    decided     bool[] := array_fill(false, ARRAY[cardinality(request_ids)]);
    locked_ids  uuid[];
    -- whether locked_ids is product_ids, so a request's product index is its lock's
    in_order    bool;
    lefts       int8[];
    limits      int8[];
    starts      timestamptz[];
    ends        timestamptz[];
    -- units each (product, buyer) of the batch holds, as far as counted: parallel arrays
    buyer_keys  text[] := '{}';
    units_held int8[] := '{}';
    buyer_at    int4;
    granted     int4[] := '{}';
    known       record;
    at          int4;
    i           int4;
BEGIN
    -- Known keys answer with their hold and take no stock.
    FOR known IN
        SELECT r.at::int4 AS at, h.id, h.product_id, h.qty, h.status, h.client_request_id,
               h.expires_at, h.created_at, h.updated_at, h.buyer_id
          FROM unnest(request_callers, request_keys) WITH ORDINALITY AS r(caller, key, at)
          JOIN holds h ON h.caller = r.caller AND h.client_request_id = r.key
         WHERE r.key IS NOT NULL
    LOOP
        decided[known.at] := true;
        RETURN QUERY SELECT known.at, 'existing'::text, NULL::int8, known.id, known.product_id,
                            known.qty, known.status, known.client_request_id,
                            known.expires_at, known.created_at, known.updated_at,
                            known.buyer_id;
    END LOOP;

    -- Row locks in id order, so concurrent batches never deadlock. NO KEY UPDATE, like an
    -- UPDATE of the counters: foreign key checks (an order naming the product) pass.
    SELECT coalesce(array_agg(p.id ORDER BY p.id), '{}'),
           coalesce(array_agg(greatest(p.stock_total - p.reserved - p.sold - p.owed, 0) ORDER BY p.id), '{}'),
           coalesce(array_agg(p.max_per_buyer ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_starts_at ORDER BY p.id), '{}'),
           coalesce(array_agg(p.sale_ends_at ORDER BY p.id), '{}')
      INTO locked_ids, lefts, limits, starts, ends
      FROM (SELECT id, stock_total, reserved, sold, owed, max_per_buyer, sale_starts_at,
                   sale_ends_at
              FROM products
             WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE) p;
    in_order := locked_ids = product_ids;

    FOR i IN 1 .. coalesce(cardinality(request_ids), 0) LOOP
        CONTINUE WHEN decided[i];
        at := request_products[i];
        IF NOT in_order THEN
            at := array_position(locked_ids, product_ids[at]);
        END IF;
        buyer_at := NULL;
        IF lefts[at] IS NOT NULL AND limits[at] > 0 AND request_buyers[i] IS NOT NULL THEN
            buyer_at := array_position(buyer_keys, locked_ids[at] || '/' || request_buyers[i]);
            IF buyer_at IS NULL THEN
                buyer_keys := buyer_keys || (locked_ids[at] || '/' || request_buyers[i]);
                units_held := units_held || buyer_units(locked_ids[at], request_buyers[i]);
                buyer_at := cardinality(buyer_keys);
            END IF;
        END IF;
        IF lefts[at] IS NULL THEN
            RETURN QUERY SELECT i, 'no_product'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF now() < starts[at] THEN
            RETURN QUERY SELECT i, 'sale_not_started'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF now() >= ends[at] THEN
            RETURN QUERY SELECT i, 'sale_ended'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF limits[at] > 0 AND request_buyers[i] IS NULL THEN
            RETURN QUERY SELECT i, 'buyer_required'::text, NULL::int8, NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        ELSIF buyer_at IS NOT NULL AND units_held[buyer_at] + request_qtys[i] > limits[at] THEN
            RETURN QUERY SELECT i, 'buyer_limit'::text,
                                greatest(limits[at] - units_held[buyer_at], 0)::int8,
                                NULL::uuid, NULL::uuid, NULL::int8, NULL::text, NULL::text,
                                NULL::timestamptz, NULL::timestamptz, NULL::timestamptz,
                                NULL::text;
        ELSIF request_qtys[i] <= lefts[at] THEN
            lefts[at] := lefts[at] - request_qtys[i];
            IF buyer_at IS NOT NULL THEN
                units_held[buyer_at] := units_held[buyer_at] + request_qtys[i];
            END IF;
            granted := granted || i;
        ELSE
            RETURN QUERY SELECT i, 'insufficient'::text, lefts[at], NULL::uuid, NULL::uuid,
                                NULL::int8, NULL::text, NULL::text, NULL::timestamptz,
                                NULL::timestamptz, NULL::timestamptz, NULL::text;
        END IF;
    END LOOP;

    -- The granted holds in one insert and their units in one update per product, in one
    -- statement. The products are locked and the grants fit, so the update needs no guard of
    -- its own: were it ever to oversell, products_never_oversold would fail the whole call.
    IF NOT skip_taken_keys THEN
        RETURN QUERY
        WITH rows AS (
            INSERT INTO holds (id, product_id, qty, status, caller, client_request_id,
                               buyer_id, expires_at, created_at, updated_at)
            SELECT r.id, product_ids[r.product], r.qty, 'active', r.caller, r.key, r.buyer,
                   now() + ttl, now(), now()
              FROM unnest(request_ids, request_products, request_qtys, request_callers,
                          request_keys, request_buyers)
                   WITH ORDINALITY AS r(id, product, qty, caller, key, buyer, at)
              JOIN unnest(granted) AS g ON g = r.at
            RETURNING *
        ), units AS (
            SELECT rows.product_id, sum(rows.qty)::int8 AS total FROM rows GROUP BY rows.product_id
        ), reserved AS (
            UPDATE products p SET reserved = p.reserved + units.total,
                                  version = p.version + 1, updated_at = now()
              FROM units
             WHERE p.id = units.product_id
        )
        SELECT g, CASE WHEN rows.id IS NULL THEN 'key_taken' ELSE 'granted' END, NULL::int8,
               rows.id, rows.product_id, rows.qty, rows.status, rows.client_request_id,
               rows.expires_at, rows.created_at, rows.updated_at, rows.buyer_id
          FROM unnest(granted) AS g
          LEFT JOIN rows ON rows.id = request_ids[g];
    ELSE
        -- A key a concurrent transaction took is skipped, and its units with it.
        RETURN QUERY
        WITH rows AS (
            INSERT INTO holds (id, product_id, qty, status, caller, client_request_id,
                               buyer_id, expires_at, created_at, updated_at)
            SELECT r.id, product_ids[r.product], r.qty, 'active', r.caller, r.key, r.buyer,
                   now() + ttl, now(), now()
              FROM unnest(request_ids, request_products, request_qtys, request_callers,
                          request_keys, request_buyers)
                   WITH ORDINALITY AS r(id, product, qty, caller, key, buyer, at)
              JOIN unnest(granted) AS g ON g = r.at
            ON CONFLICT DO NOTHING
            RETURNING *
        ), units AS (
            SELECT rows.product_id, sum(rows.qty)::int8 AS total FROM rows GROUP BY rows.product_id
        ), reserved AS (
            UPDATE products p SET reserved = p.reserved + units.total,
                                  version = p.version + 1, updated_at = now()
              FROM units
             WHERE p.id = units.product_id
        )
        SELECT g, CASE WHEN rows.id IS NULL THEN 'key_taken' ELSE 'granted' END, NULL::int8,
               rows.id, rows.product_id, rows.qty, rows.status, rows.client_request_id,
               rows.expires_at, rows.created_at, rows.updated_at, rows.buyer_id
          FROM unnest(granted) AS g
          LEFT JOIN rows ON rows.id = request_ids[g];
    END IF;
END;
$$;


-- ================================================================ making orders: batches

-- create_orders: turns active holds into pending orders, any number in one statement (the
-- CreateOrder batches).
-- - Locks the named holds FOR UPDATE in id order (holds before orders before products, the
--   order every transaction takes them in), then decides on the holds as locked (their
--   latest version) in a statement of its own, so that it sees every payment committed
--   before the locks were granted.
-- - Converts each hold that is 'active', before its expires_at (by now(), the
--   transaction's clock) and has no payment waiting on it ('deferred' events): inserts its
--   pending order, with the id at the same position of order_ids, the hold's product and
--   qty, the hold's units at the product's price, and payment_due_at now() +
--   payment_ttl; marks the hold 'converted'. Takes no lock on products (the price is read
--   as committed; see the orders table for why).
-- - Leaves every other hold as it was, and unknown ids are skipped: those holds get no
--   order here, and the caller handles each alone (an order made before, an expiry on the
--   spot, waiting payments to apply, a hold not found).
-- - Returns the orders it made. A hold named twice is converted once (its first order id).
-- - Refuses the whole call (nothing of it stays) if a total overflows int8 or order_ids is
--   shorter than hold_ids.
CREATE FUNCTION create_orders(hold_ids uuid[], order_ids uuid[], payment_ttl interval)
RETURNS SETOF orders
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked holds[];
BEGIN
    IF cardinality(order_ids) < cardinality(hold_ids) THEN
        RAISE EXCEPTION 'create_orders: % holds but % order ids',
            cardinality(hold_ids), cardinality(order_ids)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    locked := ARRAY(SELECT h FROM holds h WHERE h.id = ANY (hold_ids) ORDER BY h.id FOR UPDATE);
    RETURN QUERY
    WITH named AS (
        SELECT DISTINCT ON (r.hold_id) r.hold_id, r.order_id
          FROM unnest(hold_ids, order_ids) WITH ORDINALITY AS r(hold_id, order_id, at)
         WHERE r.hold_id IS NOT NULL
         ORDER BY r.hold_id, r.at
    ), eligible AS (
        SELECT n.order_id, h.id AS hold_id, h.product_id, h.qty, h.qty * p.price_cents AS total
          FROM named n
          JOIN unnest(locked) h ON h.id = n.hold_id
          JOIN products p ON p.id = h.product_id
         WHERE h.status = 'active' AND h.expires_at > now()
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.target_hold_id = h.id AND e.outcome = 'deferred')
    ), made AS (
        INSERT INTO orders (id, hold_id, product_id, qty, total_cents, status, payment_due_at)
        SELECT order_id, hold_id, product_id, qty, total, 'pending', now() + payment_ttl
          FROM eligible
        RETURNING *
    ), converted AS (
        UPDATE holds SET status = 'converted', updated_at = now()
          FROM made WHERE holds.id = made.hold_id
    )
    SELECT * FROM made;
END;
$$;


-- ============================================================= settling orders: payments

-- apply_payments: settles pending orders by payment webhooks, any number in one statement
-- (the HandlePaymentWebhook batches). Request i is the delivery of key keys[i] by caller
-- callers[i], reporting results[i] ('success' or 'failure', with failure_reasons[i] and
-- amounts[i]) for order order_ids[i].
-- - Locks the named orders FOR UPDATE in id order (it locks no hold and no product: the
--   order every transaction takes them in), then decides on the orders as locked (their
--   latest version) in a statement of its own, so it sees every delivery committed before
--   its locks were granted.
-- - Applies a request when its key is new (no event of that caller and key), its order is
--   'pending' and before its payment_due_at (by now(), the transaction's clock), its
--   amount agrees (a success's equals the order's total; a failure's is 0 or the total),
--   and no earlier request of the call names the same order: the order becomes 'paid' (its
--   units move on to sold) or 'cancelled' with cancel_reason 'payment_failed' and the
--   failure reason (they go back), as one counter movement each, folded later; the event
--   is stored 'applied' with the order's new status.
-- - Leaves every other request alone, for the caller to handle one by one: a key seen
--   before, an order already final or past its deadline, an amount that disagrees, an
--   unknown order, a second request for one order.
-- - Returns the orders it settled, as they are now.
-- - Stores the events in key order, so two calls storing the same keys wait for each
--   other in one order, never in a cycle. A key named twice, or stored by a transaction
--   that committed after this one looked, fails the call with unique_violation; nothing of
--   it stays.
CREATE FUNCTION apply_payments(callers text[], keys text[], order_ids uuid[],
    results text[], failure_reasons text[], amounts int8[])
RETURNS SETOF orders
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked orders[];
BEGIN
    locked := ARRAY(SELECT o FROM orders o WHERE o.id = ANY (order_ids) ORDER BY o.id FOR UPDATE);
    RETURN QUERY
    WITH asked AS (
        SELECT DISTINCT ON (r.order_id) r.*
          FROM unnest(callers, keys, order_ids, results, failure_reasons, amounts)
               WITH ORDINALITY AS r(caller, key, order_id, result, failure_reason, amount, at)
         WHERE r.order_id IS NOT NULL
         ORDER BY r.order_id, r.at
    ), applied AS (
        SELECT a.caller, a.key, a.order_id, a.result, a.failure_reason, a.amount,
               o.hold_id, o.product_id, o.qty
          FROM asked a
          JOIN unnest(locked) o ON o.id = a.order_id
         WHERE o.status = 'pending' AND o.payment_due_at > now()
           AND CASE a.result WHEN 'success' THEN a.amount = o.total_cents
                             ELSE a.amount IN (0, o.total_cents) END
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.caller = a.caller AND e.idempotency_key = a.key)
    ), settled AS (
        UPDATE orders o
           SET status = CASE p.result WHEN 'success' THEN 'paid' ELSE 'cancelled' END,
               failure_reason = CASE p.result WHEN 'success' THEN '' ELSE p.failure_reason END,
               cancel_reason = CASE p.result WHEN 'success' THEN NULL ELSE 'payment_failed' END,
               updated_at = now()
          FROM applied p
         WHERE o.id = p.order_id
        RETURNING o.*
    ), moved AS (
        INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
        SELECT p.product_id, p.hold_id, -p.qty,
               CASE p.result WHEN 'success' THEN p.qty ELSE 0 END
          FROM applied p
    ), stored AS (
        INSERT INTO payment_events (caller, idempotency_key, target_order_id, result,
                                    failure_reason, amount_cents, outcome, order_id,
                                    order_status, processed_at)
        SELECT p.caller, p.key, p.order_id, p.result, p.failure_reason, p.amount, 'applied',
               p.order_id, CASE p.result WHEN 'success' THEN 'paid' ELSE 'cancelled' END, now()
          FROM applied p
         ORDER BY p.caller, p.key
    )
    SELECT * FROM settled;
END;
$$;


-- ============================================================ giving units back: releases

-- release_holds: gives active holds' units back, any number in one statement (the
-- ReleaseHold batches).
-- - Locks the named holds FOR UPDATE in id order (it locks no order and no product: the
--   order every transaction takes them in), then decides on the holds as locked (their
--   latest version) in a statement of its own, so it sees every payment committed before
--   its locks were granted.
-- - Releases each hold that is 'active' (whatever its expiry: a release before the reaper
--   gets there is still a release) and has no payment waiting on it ('deferred' events):
--   marks it 'released' and records its units going back as one counter movement, folded
--   later. A hold named twice is released once.
-- - Leaves every other hold as it was, and unknown ids are skipped: the caller handles
--   each alone (a hold already released, expired or converted, payments waiting to be
--   closed, a hold not found).
-- - Returns the holds it released, as they are now.
CREATE FUNCTION release_holds(hold_ids uuid[])
RETURNS SETOF holds
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    locked holds[];
BEGIN
    locked := ARRAY(SELECT h FROM holds h WHERE h.id = ANY (hold_ids) ORDER BY h.id FOR UPDATE);
    RETURN QUERY
    WITH releasable AS (
        SELECT l.id FROM unnest(locked) l
         WHERE l.status = 'active'
           AND NOT EXISTS (SELECT 1 FROM payment_events e
                            WHERE e.target_hold_id = l.id AND e.outcome = 'deferred')
    ), released AS (
        UPDATE holds h SET status = 'released', updated_at = now()
          FROM releasable r WHERE h.id = r.id
        RETURNING h.*
    ), moved AS (
        INSERT INTO stock_movements (product_id, hold_id, reserved_delta, sold_delta)
        SELECT r.product_id, r.id, -r.qty, 0 FROM released r
    )
    SELECT * FROM released;
END;
$$;


-- ================================================ settling stock: folding movements

-- fold_stock_movements: folds the pending movements of these products into their counters,
-- serves their waitlists from the units that came back (serve_waiters), and returns how
-- many movements it folded. One statement: run alone it is one transaction and one round
-- trip.
--
-- Guarantees:
-- - Locks: the products are locked FOR NO KEY UPDATE first, in id order like
--   reserve_holds, so folds and hold batches never deadlock; held until the transaction
--   ends.
-- - The movements are read with a snapshot taken after the locks (a new statement of the
--   function, at READ COMMITTED), so every movement committed before the locks were
--   granted is folded.
-- - Each movement is folded exactly once: it is deleted as it is folded, and concurrent
--   folds of one product serialize on its lock.
-- - Each folded product's counters change by its movements' sums in one update that sets
--   version and updated_at itself (products_bump_version is skipped) and is announced by
--   products_notify_updates. Products without pending movements are locked but left
--   unchanged (no new version, no announcement).
CREATE FUNCTION fold_stock_movements(product_ids uuid[]) RETURNS int8
LANGUAGE plpgsql
SET enable_seqscan = off
AS $$
DECLARE
    folded int8;
BEGIN
    PERFORM 1 FROM products WHERE id = ANY (product_ids) ORDER BY id FOR NO KEY UPDATE;
    WITH moved AS (
        DELETE FROM stock_movements WHERE product_id = ANY (product_ids)
        RETURNING product_id, reserved_delta, sold_delta
    ), sums AS (
        SELECT product_id, sum(reserved_delta)::int8 AS reserved, sum(sold_delta)::int8 AS sold,
               count(*) AS movements
          FROM moved GROUP BY product_id
    ), updated AS (
        UPDATE products p SET reserved = p.reserved + sums.reserved, sold = p.sold + sums.sold,
                              version = p.version + 1, updated_at = now()
          FROM sums WHERE p.id = sums.product_id
    )
    SELECT coalesce(sum(movements), 0)::int8 INTO folded FROM sums;
    PERFORM serve_waiters(product_ids);
    RETURN folded;
END;
$$;


-- ================================================================= the waitlist

-- waiter_alive: whether the server process whose advisory-lock key is `session` still
-- holds it, that is still lives (pg_advisory_lock(bigint) keys split into classid, the high
-- 32 bits, and objid, the low 32). Takes no lock.
CREATE FUNCTION waiter_alive(session int8) RETURNS bool
LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM pg_locks
         WHERE locktype = 'advisory' AND granted AND objsubid = 1
           AND classid = ((session >> 32) & 4294967295)::oid
           AND objid = (session & 4294967295)::oid);
$$;

-- serve_waiters: gives the units of these products that no hold or order has to their
-- waiters, strictly in join order, and returns how many waiters it served.
--
-- Guarantees:
-- - Locks: the products FOR NO KEY UPDATE in id order (as reserve_holds), then each
--   product's waiting rows in join order; held until the transaction ends.
-- - Strict order: a product's head waiter is served (a hold of its qty for its buyer,
--   expiring after its hold_ttl) when the product has the units; otherwise nobody behind
--   it is. A head whose process is gone (waiter_alive) is skipped as 'left'; a head whose
--   buyer would pass max_per_buyer is turned away ('ended', buyer_limit).
-- - Each change of a product's waitlist (its waiting, owed and reserved in one update per
--   product) bumps its version and is announced by products_notify_updates; every product
--   whose queue changed is also announced on channel flashsale_waitlist (payload: its id).
-- - Never oversells: a hold is made only from available units, under the product's lock.
CREATE FUNCTION serve_waiters(product_ids uuid[]) RETURNS int4
LANGUAGE plpgsql AS $$
DECLARE
    product record;
    waiter  record;
    left_units int8;
    held    int8;
    hold    uuid;
    served  int4 := 0;
    changed bool;
BEGIN
    FOR product IN
        SELECT id, stock_total - reserved - sold AS available, max_per_buyer
          FROM products WHERE id = ANY (product_ids) AND waiting > 0
         ORDER BY id FOR NO KEY UPDATE
    LOOP
        left_units := product.available;
        changed := false;
        FOR waiter IN
            SELECT * FROM waiters WHERE product_id = product.id AND status = 'waiting'
             ORDER BY id FOR UPDATE
        LOOP
            IF NOT waiter_alive(waiter.session) THEN
                UPDATE waiters SET status = 'left' WHERE id = waiter.id;
            ELSIF product.max_per_buyer > 0 AND waiter.buyer_id IS NOT NULL
                  AND buyer_units(product.id, waiter.buyer_id) + waiter.qty > product.max_per_buyer THEN
                UPDATE waiters SET status = 'ended', end_reason = 'buyer_limit' WHERE id = waiter.id;
            ELSIF waiter.qty <= left_units THEN
                hold := gen_random_uuid();
                INSERT INTO holds (id, product_id, qty, status, caller, buyer_id, expires_at,
                                   created_at, updated_at)
                VALUES (hold, product.id, waiter.qty, 'active', waiter.caller, waiter.buyer_id,
                        now() + waiter.hold_ttl, now(), now());
                UPDATE waiters SET status = 'served', hold_id = hold WHERE id = waiter.id;
                left_units := left_units - waiter.qty;
                served := served + 1;
            ELSE
                EXIT;
            END IF;
            changed := true;
            UPDATE products SET waiting = waiting - 1, owed = owed - waiter.qty,
                                reserved = reserved + CASE WHEN hold IS NULL THEN 0 ELSE waiter.qty END
             WHERE id = product.id;
            hold := NULL;
        END LOOP;
        IF changed THEN
            PERFORM pg_notify('flashsale_waitlist', product.id::text);
        END IF;
    END LOOP;
    RETURN served;
END;
$$;

-- join_waitlist: puts a buyer in line for `qty` units of a product and serves the line at
-- once (so a buyer alone in line, with units there, is served right away). Returns the
-- waiter's id. Refuses (raising, nothing written) a product that does not exist
-- (P0002), whose sale has not started or has ended (P0001 with message 'sale_not_started'
-- or 'sale_ended'), more units than the product has in all ('more_than_stock <stock>'), a
-- limited product's join without a buyer ('buyer_required') or a buyer it would take past
-- its limit ('buyer_limit <units the buyer may still take>').
--
-- Guarantees: takes the product's lock (FOR NO KEY UPDATE) first, so joins, leaves and
-- serves of one product serialize and the queue's order is the commit order of joins.
CREATE FUNCTION join_waitlist(product uuid, units int8, buyer text, who text, ttl interval,
                              session int8) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    p      record;
    held   int8;
    joined int8;
BEGIN
    SELECT * INTO p FROM products WHERE id = product FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no product %', product USING ERRCODE = 'P0002';
    END IF;
    IF now() < p.sale_starts_at THEN
        RAISE EXCEPTION 'sale_not_started';
    ELSIF now() >= p.sale_ends_at THEN
        RAISE EXCEPTION 'sale_ended';
    ELSIF units > p.stock_total THEN
        -- it could never be served, and would block everyone behind it
        RAISE EXCEPTION 'more_than_stock %', p.stock_total;
    END IF;
    IF p.max_per_buyer > 0 THEN
        IF buyer IS NULL THEN
            RAISE EXCEPTION 'buyer_required';
        END IF;
        held := buyer_units(product, buyer);
        IF held + units > p.max_per_buyer THEN
            RAISE EXCEPTION 'buyer_limit %', greatest(p.max_per_buyer - held, 0);
        END IF;
    END IF;
    INSERT INTO waiters (product_id, qty, buyer_id, caller, hold_ttl, session)
    VALUES (product, units, buyer, who, ttl, session) RETURNING id INTO joined;
    UPDATE products SET waiting = waiting + 1, owed = owed + units WHERE id = product;
    PERFORM pg_notify('flashsale_waitlist', product::text);
    PERFORM serve_waiters(ARRAY[product]);
    RETURN joined;
END;
$$;

-- leave_waitlist: takes a waiting waiter out of line (status 'left') and serves the line,
-- which may now reach the ones behind it. A waiter no longer waiting is left as it is.
-- Returns its status afterwards and its hold, if it was served.
--
-- Guarantees: the product's lock first, then the waiter's, as serve_waiters.
CREATE FUNCTION leave_waitlist(waiter int8, OUT status text, OUT hold_id uuid)
LANGUAGE plpgsql AS $$
DECLARE
    product uuid;
    units   int8;
BEGIN
    SELECT w.product_id INTO product FROM waiters w WHERE w.id = waiter;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    PERFORM 1 FROM products WHERE id = product FOR NO KEY UPDATE;
    SELECT w.status, w.hold_id, w.qty INTO status, hold_id, units
      FROM waiters w WHERE w.id = waiter FOR UPDATE;
    IF status = 'waiting' THEN
        UPDATE waiters SET status = 'left' WHERE id = waiter;
        UPDATE products SET waiting = waiting - 1, owed = owed - units WHERE id = product;
        PERFORM pg_notify('flashsale_waitlist', product::text);
        PERFORM serve_waiters(ARRAY[product]);
        status := 'left';
    END IF;
END;
$$;

-- end_waiters: turns away every waiter of these products ('ended' with `reason`:
-- 'sale_ended' or 'stock_withdrawn'); returns how many. Takes the products' locks in id
-- order, then their waiters'.
CREATE FUNCTION end_waiters(product_ids uuid[], reason text) RETURNS int8
LANGUAGE plpgsql AS $$
DECLARE
    product uuid;
    ended   int8 := 0;
    n       int8;
BEGIN
    FOR product IN
        SELECT id FROM products WHERE id = ANY (product_ids) AND waiting > 0
         ORDER BY id FOR NO KEY UPDATE
    LOOP
        UPDATE waiters SET status = 'ended', end_reason = reason
         WHERE product_id = product AND status = 'waiting';
        GET DIAGNOSTICS n = ROW_COUNT;
        UPDATE products SET waiting = 0, owed = 0 WHERE id = product;
        PERFORM pg_notify('flashsale_waitlist', product::text);
        ended := ended + n;
    END LOOP;
    RETURN ended;
END;
$$;
