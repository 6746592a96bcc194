-- One signal per click, kind, network and evidence key: a signal seen again gains `count` and
-- `last_at` instead of a new row (the observe path folds sightings together; the signal writer
-- upserts). `key` is the evidence key, computed as tracker/domain/signals.py's Signal.key does: the
-- values of the kind's key fields joined by '|', at most 300 characters.
ALTER TABLE signals
    ADD COLUMN key     text,
    ADD COLUMN count   integer NOT NULL DEFAULT 1,
    ADD COLUMN last_at timestamptz;

UPDATE signals SET key = left(CASE kind
    WHEN 'foreign_affiliate_param' THEN concat_ws('|', evidence ->> 'param', evidence ->> 'value')
    WHEN 'ad_click_id' THEN concat_ws('|', evidence ->> 'param', evidence ->> 'value')
    WHEN 'foreign_redirect_host' THEN coalesce(evidence ->> 'host', '')
    WHEN 'foreign_promo_code' THEN coalesce(evidence ->> 'code', '')
    WHEN 'cross_device' THEN coalesce(evidence ->> 'ordered_on', '')
    WHEN 'prefilled_basket' THEN coalesce(evidence ->> 'items', '')
    WHEN 'excluded_store' THEN coalesce(evidence ->> 'store_id', '')
    WHEN 'unreadable_url' THEN coalesce(evidence ->> 'url', '')
    ELSE '' END, 300);

-- Rows stored before, one per sighting, fold into their signal's first row: it keeps its evidence,
-- time and `late`, and takes the group's count and latest time; the others go. Nothing is lost but
-- the repetition. A click that holds more than 100 distinct signals from before keeps them all (the
-- cap applies to what comes next: it gets no new ones).
WITH g AS (
    SELECT id, first_value(id) OVER w AS keep, count(*) OVER w AS n, max(at) OVER w AS latest
    FROM signals
    WINDOW w AS (PARTITION BY click_id, kind, network, key ORDER BY at, id
                 ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING)),
folded AS (
    UPDATE signals s SET count = g.n, last_at = g.latest FROM g WHERE s.id = g.id AND g.id = g.keep)
DELETE FROM signals s USING g WHERE s.id = g.id AND g.id <> g.keep;

ALTER TABLE signals ALTER COLUMN key SET NOT NULL, ALTER COLUMN last_at SET NOT NULL;
-- The signal's identity; NULLS NOT DISTINCT: risks without a network are one signal too (PostgreSQL 15).
CREATE UNIQUE INDEX signals_identity_idx ON signals (click_id, kind, network, key) NULLS NOT DISTINCT;
