-- What the extension and in-app browser saw after activation, as signals about a click: overwrites
-- (definitive) and risks. Written in batches by the observe path; `late` marks those that arrived after
-- the click's first postback and changed nothing.
CREATE TABLE signals (
    id          bigserial PRIMARY KEY,
    click_id    text NOT NULL,
    merchant    text NOT NULL,
    kind        text NOT NULL,
    network     text,
    evidence    jsonb NOT NULL,
    at          timestamptz NOT NULL,
    late        boolean NOT NULL DEFAULT false,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX signals_click_idx ON signals (click_id, at);
CREATE INDEX signals_received_idx ON signals (received_at);
