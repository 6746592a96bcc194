-- A merchant's offer (campaign) ids at its network, from the merchants file: an order whose
-- postback names another offer is not attributed to the merchant's click (orphan `wrong_offer`).
-- Empty: the merchant's orders are not checked by offer. A constant default: adding it rewrites
-- nothing.
ALTER TABLE merchants ADD COLUMN network_offer_ids text[] NOT NULL DEFAULT '{}';
