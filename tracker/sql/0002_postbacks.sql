-- Conversions: one per (network, order id), attributed to a click and its user. Status only moves
-- forward; every postback, whatever it changed, is kept in postback_history with its raw parameters.
CREATE TABLE conversions (
    id               bigserial PRIMARY KEY,
    network          text NOT NULL,
    order_id         text NOT NULL,
    click_id         text NOT NULL,
    click_created_at timestamptz NOT NULL,
    user_id          text NOT NULL,
    merchant         text NOT NULL,
    status           text NOT NULL CHECK (status IN ('pending', 'approved', 'declined', 'reversed')),
    status_word      text NOT NULL,
    amount           numeric(24, 8),
    commission       numeric(24, 8) NOT NULL,
    currency         char(3) NOT NULL,
    user_share       numeric(9, 6) NOT NULL,
    cashback         numeric(24, 8) NOT NULL,
    order_time       timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (network, order_id)
);
CREATE INDEX conversions_click_idx ON conversions (click_id);
CREATE INDEX conversions_user_idx ON conversions (user_id, created_at);

CREATE TABLE postback_history (
    id            bigserial PRIMARY KEY,
    conversion_id bigint REFERENCES conversions (id),
    network       text NOT NULL,
    order_id      text NOT NULL,
    click_id      text,
    outcome       text NOT NULL,
    status        text,
    status_word   text,
    amount        numeric(24, 8),
    commission    numeric(24, 8),
    currency      char(3),
    order_time    timestamptz,
    raw           jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX postback_history_order_idx ON postback_history (network, order_id, id);

-- Postbacks whose sub-id names no click we know (yet): answered 200 and kept for reconciliation.
CREATE TABLE orphan_postbacks (
    id            bigserial PRIMARY KEY,
    network       text NOT NULL,
    order_id      text NOT NULL,
    click_id      text,
    reason        text NOT NULL,
    raw           jsonb NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    reconciled_at timestamptz,
    conversion_id bigint REFERENCES conversions (id)
);
CREATE INDEX orphan_postbacks_open_idx ON orphan_postbacks (received_at) WHERE reconciled_at IS NULL;

-- The overwrite detector's state of a click, where PostgreSQL holds it (Redis holds the hot copy).
CREATE TABLE click_states (
    click_id     text PRIMARY KEY,
    created_at   timestamptz NOT NULL,
    state        text NOT NULL CHECK (state IN ('active', 'overwritten', 'expired', 'converted')),
    overwritten_at timestamptz,
    converted_at timestamptz,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
