-- Merchants and the networks that report their orders, as synced from the merchants file.
CREATE TABLE networks (
    name        text PRIMARY KEY,
    profile     text NOT NULL,
    token       text,
    hmac_secret text,
    allow_ips   text[] NOT NULL DEFAULT '{}',
    active      boolean NOT NULL DEFAULT true,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE merchants (
    slug                  text PRIMARY KEY,
    name                  text NOT NULL,
    network               text NOT NULL,
    partner_url           text NOT NULL,
    default_target        text NOT NULL,
    allowed_hosts         text[] NOT NULL,
    user_share            numeric(9, 6) NOT NULL CHECK (user_share >= 0 AND user_share <= 1),
    session_ttl_s         integer NOT NULL CHECK (session_ttl_s > 0),
    confirmation_window_s integer NOT NULL CHECK (confirmation_window_s > 0),
    own_promo_codes       text[] NOT NULL DEFAULT '{}',
    app_url               text,
    excluded_stores       text[] NOT NULL DEFAULT '{}',
    active                boolean NOT NULL DEFAULT true,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

-- One row per activation click. Range-partitioned by day on created_at, which is the time carried
-- by the click id itself: a lookup by id names its partition (WHERE click_id = $1 AND created_at = $2).
-- The client address is text: asyncpg's inet encoder costs more per row than the whole rest of the
-- row, and text keeps the address faithfully.
CREATE TABLE clicks (
    click_id   text NOT NULL,
    created_at timestamptz NOT NULL,
    user_id    text NOT NULL,
    merchant   text NOT NULL,
    source     text NOT NULL,
    target     text NOT NULL,
    device     text,
    client_ip  text,
    user_agent text,
    bot        boolean NOT NULL DEFAULT false,
    method     text NOT NULL DEFAULT 'GET',
    PRIMARY KEY (click_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE INDEX clicks_user_idx ON clicks (user_id, created_at);

-- Clicks that PostgreSQL refused (encoding, range): kept with the reason instead of poisoning a batch.
CREATE TABLE clicks_quarantine (
    id         bigserial PRIMARY KEY,
    click_id   text,
    record     text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
