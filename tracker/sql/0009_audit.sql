-- The audit trail: every read of one user's or one click's data and every change made through the
-- API, the console or the command line: who (a key's name, `admin`, an agent, `cli:<user>`), what,
-- whose (the real user id, also after an erasure: the trail is the record of who processed whose
-- data), when, and from which address. Rows are only ever added; `tracker maintain` deletes those
-- past TRACKER_AUDIT_RETENTION_DAYS. Nothing in tracker updates one, and PostgreSQL refuses it.
CREATE TABLE audit_log (
    id       bigserial PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    actor    text NOT NULL,
    action   text NOT NULL,
    user_id  text,
    click_id text,
    order_id text,
    address  text
);
CREATE INDEX audit_log_user_idx ON audit_log (user_id, id) WHERE user_id IS NOT NULL;
CREATE INDEX audit_log_actor_idx ON audit_log (actor, id);
CREATE INDEX audit_log_at_idx ON audit_log (at);

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log rows cannot be changed';
END $$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
