-- Every postback about a known order keeps the values it found (status and money), beside the
-- values it brought: the history shows each change of a conversion as old -> new, including the
-- adjustments refused after approval.
ALTER TABLE postback_history
    ADD COLUMN previous_status     text,
    ADD COLUMN previous_amount     numeric(24, 8),
    ADD COLUMN previous_commission numeric(24, 8),
    ADD COLUMN previous_currency   char(3);

-- Signals and click states that PostgreSQL refused: kept with the reason (found by bisecting the
-- batch) instead of stopping the signal writer for everyone.
CREATE TABLE signals_quarantine (
    id         bigserial PRIMARY KEY,
    click_id   text,
    record     text NOT NULL,
    reason     text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
