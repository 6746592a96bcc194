-- An erasure clears the addresses among the parameters of the user's postbacks (a network's
-- action_ip), orphans included: those naming one of the user's clicks, or reconciled into one of
-- their conversions. Orphans were indexed by order id and by being open only.
CREATE INDEX orphan_postbacks_click_idx ON orphan_postbacks (click_id);
CREATE INDEX orphan_postbacks_conversion_idx ON orphan_postbacks (conversion_id) WHERE conversion_id IS NOT NULL;
