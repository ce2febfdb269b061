-- The checkout schema. Every stock write touches exactly one product row (the hot
-- row), so the schema can be partitioned by product later (see README, "Scaling out").

CREATE TABLE products (
    id          UUID PRIMARY KEY,
    name        TEXT NOT NULL CHECK (name <> ''),
    price_cents BIGINT NOT NULL CHECK (price_cents >= 0),
    stock_total BIGINT NOT NULL CHECK (stock_total >= 0),
    reserved    BIGINT NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    sold        BIGINT NOT NULL DEFAULT 0 CHECK (sold >= 0),
    -- grows on every stock change (trigger below), so watchers and callers can order states
    version     BIGINT NOT NULL DEFAULT 1,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- when the latest stock change committed
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- never oversell: available = stock_total - reserved - sold >= 0, whatever the code does
    CONSTRAINT products_never_oversold CHECK (reserved + sold <= stock_total)
);

-- Every change of stock_total (the initial stock included), so the audit can recompute it.
CREATE TABLE stock_adjustments (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    product_id  UUID NOT NULL REFERENCES products (id),
    delta       BIGINT NOT NULL,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX stock_adjustments_product_id ON stock_adjustments (product_id);

CREATE TABLE holds (
    id                UUID PRIMARY KEY,
    product_id        UUID NOT NULL REFERENCES products (id),
    qty               BIGINT NOT NULL CHECK (qty > 0),
    status            TEXT NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'converted', 'expired', 'released')),
    -- the caller's retry key: the same id returns the same hold
    client_request_id TEXT,
    expires_at        TIMESTAMPTZ NOT NULL,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX holds_client_request_id_key ON holds (client_request_id)
    WHERE client_request_id IS NOT NULL;
-- the reaper's queue: active holds by expiry
CREATE INDEX holds_active_expires_at ON holds (expires_at) WHERE status = 'active';
CREATE INDEX holds_product_id_active ON holds (product_id) WHERE status = 'active';

CREATE TABLE orders (
    id             UUID PRIMARY KEY,
    -- one hold, at most one order
    hold_id        UUID NOT NULL UNIQUE REFERENCES holds (id),
    product_id     UUID NOT NULL REFERENCES products (id),
    qty            BIGINT NOT NULL CHECK (qty > 0),
    total_cents    BIGINT NOT NULL CHECK (total_cents >= 0),
    status         TEXT NOT NULL DEFAULT 'pending'
                   CHECK (status IN ('pending', 'paid', 'cancelled')),
    failure_reason TEXT NOT NULL DEFAULT '',
    created_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX orders_product_id ON orders (product_id);

-- One row per payment webhook idempotency key: one key, one effect.
CREATE TABLE payment_events (
    idempotency_key  TEXT PRIMARY KEY,
    -- the target exactly as delivered: an order, or a hold that may not be an order yet
    target_order_id  UUID REFERENCES orders (id),
    target_hold_id   UUID REFERENCES holds (id),
    result           TEXT NOT NULL CHECK (result IN ('success', 'failure')),
    failure_reason   TEXT NOT NULL DEFAULT '',
    amount_cents     BIGINT NOT NULL DEFAULT 0,
    outcome          TEXT NOT NULL CHECK (outcome IN ('applied', 'deferred', 'ignored')),
    -- the order the event resolved to, and its status right after; NULL while deferred
    -- and when closed as ignored because its hold expired or was released
    order_id         UUID REFERENCES orders (id),
    order_status     TEXT CHECK (order_status IN ('pending', 'paid', 'cancelled')),
    received_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    -- when the event was applied or ignored; NULL while deferred
    processed_at     TIMESTAMPTZ,
    CONSTRAINT payment_events_one_target CHECK ((target_order_id IS NULL) <> (target_hold_id IS NULL)),
    CONSTRAINT payment_events_deferred_unresolved CHECK (outcome <> 'deferred' OR (order_id IS NULL AND processed_at IS NULL))
);
CREATE INDEX payment_events_deferred_by_hold ON payment_events (target_hold_id, received_at)
    WHERE outcome = 'deferred';

-- Any change of a product's stock counters bumps its version and change time, so no code
-- path can forget to.
CREATE FUNCTION products_bump_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.stock_total, NEW.reserved, NEW.sold) IS DISTINCT FROM (OLD.stock_total, OLD.reserved, OLD.sold) THEN
        NEW.version := OLD.version + 1;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER products_bump_version BEFORE UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_bump_version();

-- Every committed stock change is announced to every server process (LISTEN
-- flashsale_product_changes). NOTIFY is transactional: heard only if the change committed.
CREATE FUNCTION products_notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.version <> OLD.version THEN
        PERFORM pg_notify('flashsale_product_changes', json_build_object(
            'product_id', NEW.id,
            'stock_total', NEW.stock_total,
            'reserved', NEW.reserved,
            'sold', NEW.sold,
            'version', NEW.version,
            'changed_at', NEW.updated_at)::text);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER products_notify_change AFTER INSERT OR UPDATE ON products
    FOR EACH ROW EXECUTE FUNCTION products_notify_change();
