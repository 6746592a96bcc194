-- Support lookups and the console.
--
-- A shopper quotes an order number, not the network that reported it: orders by id alone (the
-- unique key (network, order_id) cannot serve that without a network). Orphans too, so that an
-- order whose postback is still waiting for its click is found by the same search.
CREATE INDEX conversions_order_idx ON conversions (order_id);
CREATE INDEX orphan_postbacks_order_idx ON orphan_postbacks (order_id);
-- Open orphans newest first, paged by id.
CREATE INDEX orphan_postbacks_open_id_idx ON orphan_postbacks (id) WHERE reconciled_at IS NULL;
-- The console's 24-hour overview: conversions reported and clicks observed since a time.
CREATE INDEX conversions_created_idx ON conversions (created_at);
CREATE INDEX click_states_created_idx ON click_states (created_at);
-- A user's clicks newest first need no new index: clicks_user_idx (user_id, created_at), read
-- backwards, partition after partition from the newest (see docs/performance.md).

-- Console sessions are signed cookies; signing out records the session here until it would have
-- expired, so that a copy of the cookie stops working too.
CREATE TABLE console_signouts (
    session_id text PRIMARY KEY,
    expires_at timestamptz NOT NULL
);
