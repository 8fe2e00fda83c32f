-- The demo shop service's own schema (its database, not the platform's). Idempotent.
-- PII: customers.email and customers.phone are masked by resources/sources/shop.yaml,
-- customers.password_hash is excluded, payments.card_last4 is masked.

CREATE TABLE IF NOT EXISTS customers (
    id            bigserial PRIMARY KEY,
    name          text        NOT NULL,
    email         text        NOT NULL UNIQUE,
    phone         text,
    password_hash text        NOT NULL,
    tier          text        NOT NULL DEFAULT 'standard',
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint        NOT NULL REFERENCES customers (id),
    status      text          NOT NULL DEFAULT 'new',
    total       numeric(12,2) NOT NULL DEFAULT 0,
    placed_at   timestamptz   NOT NULL DEFAULT now(),
    updated_at  timestamptz   NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS order_lines (
    order_id   bigint        NOT NULL REFERENCES orders (id),
    line       int           NOT NULL,
    sku        text          NOT NULL,
    quantity   int           NOT NULL,
    unit_price numeric(12,2) NOT NULL,
    PRIMARY KEY (order_id, line)
);

CREATE TABLE IF NOT EXISTS payments (
    id         bigserial PRIMARY KEY,
    order_id   bigint        NOT NULL REFERENCES orders (id),
    amount     numeric(12,2) NOT NULL,
    card_last4 text          NOT NULL,
    status     text          NOT NULL DEFAULT 'captured',
    created_at timestamptz   NOT NULL DEFAULT now()
);

-- Before-images of updates and deletes need the whole old row.
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE orders REPLICA IDENTITY FULL;
ALTER TABLE order_lines REPLICA IDENTITY FULL;
ALTER TABLE payments REPLICA IDENTITY FULL;
