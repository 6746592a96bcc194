-- The detector's working state (whether the shopper has landed, which click values are ours), so that
-- observe can go on from PostgreSQL when Redis is down or the Redis copy has expired.
ALTER TABLE click_states ADD COLUMN detector jsonb;
ALTER TABLE click_states ADD COLUMN user_id text;
ALTER TABLE click_states ADD COLUMN merchant text;
