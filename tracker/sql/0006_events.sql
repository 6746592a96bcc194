-- The outbox: what leaves tracker as events (GET /v1/events, webhooks), each row written in the same
-- transaction as the change it reports.
--
-- Feed order is `seq`, given after commit by a single sequencer (one transaction at a time, under
-- an advisory lock; every worker offers to be it): it numbers the committed events that have no
-- number yet, in id order, and commits them all at once. A reader therefore never sees a number
-- whose smaller numbers are not all visible already: nothing can appear behind a cursor it handed
-- out, whatever order the writers committed in. (The ids alone cannot do this: a sequence value is
-- taken at insert and becomes visible at commit, in any order.) Unlike a visibility horizon taken
-- from the transaction ids, a long transaction elsewhere in the cluster does not hold the feed back.
CREATE TABLE events (
    id           bigserial PRIMARY KEY,
    seq          bigint UNIQUE,  -- NULL until the sequencer numbers it
    -- evt_ + 32 hex digits of a random UUID: unique without an index to keep up on every insert.
    public_id    text NOT NULL DEFAULT 'evt_' || replace(gen_random_uuid()::text, '-', ''),
    type         text NOT NULL,
    -- Events with one key reach each webhook in id order (a conversion's created before its
    -- status_changed); NULL: no order to keep.
    ordering_key text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    data         jsonb NOT NULL
);
CREATE INDEX events_unsequenced_idx ON events (id) WHERE seq IS NULL;
CREATE INDEX events_created_idx ON events (created_at);
-- The last number given: never goes back, even when pruning has removed every event.
CREATE TABLE events_sequencer (top bigint NOT NULL);
INSERT INTO events_sequencer (top) VALUES (0);

-- Webhook subscribers, as synced from the merchants file's `webhooks:` section.
CREATE TABLE webhooks (
    name       text PRIMARY KEY,
    url        text NOT NULL,
    secret     text NOT NULL,
    types      text[],  -- NULL: every type
    active     boolean NOT NULL DEFAULT true,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- One row per event per subscriber, written by the sequencer as it numbers the event (so a postback
-- writes one row, the event, whatever the number of subscribers). A worker leases a due
-- row by moving next_attempt_at past the send's timeout in a short transaction, sends, then records
-- the outcome; a worker killed mid-send leaves the row to be taken again when the lease ends.
CREATE TABLE webhook_deliveries (
    event_id        bigint NOT NULL REFERENCES events (id) ON DELETE CASCADE,
    webhook         text NOT NULL,
    ordering_key    text,
    state           text NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    retry_from      timestamptz NOT NULL DEFAULT now(),  -- start of the current 24 h of retries
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_attempt_at timestamptz,
    last_status     integer,
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (event_id, webhook)
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (webhook, next_attempt_at, event_id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_order_idx ON webhook_deliveries (webhook, ordering_key, event_id)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_backlog_idx ON webhook_deliveries (webhook, created_at)
    WHERE state = 'pending';
CREATE INDEX webhook_deliveries_failed_idx ON webhook_deliveries (webhook) WHERE state = 'failed';
-- A queue: every row is updated two or three times within seconds of its insert. Vacuum and analyze
-- it far more often than the defaults (20 % and 10 % of the table) so that dead rows and stale
-- statistics do not pile up behind a backlog.
ALTER TABLE webhook_deliveries SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- click.overwritten is announced once per click: the transaction that first finds the stored state
-- overwritten sets this (under the row lock, so two workers flushing one click cannot both do it).
-- Clicks already overwritten before events existed are not announced now.
ALTER TABLE click_states ADD COLUMN overwrite_announced boolean NOT NULL DEFAULT false;
UPDATE click_states SET overwrite_announced = true WHERE state = 'overwritten';

-- postback.orphaned is written once per orphaned order, click and reason, not once per retry of the
-- same postback: that check finds earlier orphans by order id through orphan_postbacks_order_idx
-- (migration 0007).
