-- Erased users: the pseudonym that replaced the user id in their clicks, conversions, click states
-- and events, and when. The row keeps the real user id, as the audit trail does: a repeat of the
-- erasure finds the same pseudonym, and clicks of the user that reach PostgreSQL late (a spool
-- replayed after an outage, a batch still in a worker's writer) are pseudonymised as they arrive
-- when they were made before `erased_at` (tracker/store/erasure.py). Clicks made after it are new
-- activity: an erasure is not a ban.
CREATE TABLE erasures (
    user_id   text PRIMARY KEY,
    pseudonym text NOT NULL UNIQUE,
    erased_at timestamptz NOT NULL
);
