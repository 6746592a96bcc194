-- An erasure clears the addresses among the parameters of the user's postbacks (a network's
-- action_ip), orphans included: those naming one of the user's clicks, or reconciled into one of
-- their conversions. Orphans were indexed by order id and by being open only.
CREATE INDEX orphan_postbacks_click_idx ON orphan_postbacks (click_id);
CREATE INDEX orphan_postbacks_conversion_idx ON orphan_postbacks (conversion_id) WHERE conversion_id IS NOT NULL;

-- Address retention truncates the addresses among postbacks' parameters too, once the row is older
-- than TRACKER_IP_RETENTION_DAYS. Rows are read in id order: each table's last id done, so a night's
-- run reads only the rows received since the last.
CREATE TABLE address_truncated_rows (
    table_name text PRIMARY KEY,
    last_id    bigint NOT NULL
);
INSERT INTO address_truncated_rows (table_name, last_id) VALUES ('postback_history', 0), ('orphan_postbacks', 0);
