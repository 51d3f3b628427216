-- gridstream ledger, version 2: the executor's outbox for execution events.
--
-- A fill or order event the executor learns from the venue (user stream, reconciliation)
-- is written with published_at NULL and its encoded message in payload, in the same
-- transaction as the ledger change; then published to gs:executions:<SYM>; then marked.
-- At start and after every user-stream reconnect, rows still NULL are published again in
-- seq order, so a crash between the write and the publish loses nothing (a crash after
-- the publish and before the mark gives a duplicate with the same message id, which
-- consumers drop).
--
-- published_at: ns since the epoch when the message went out; NULL = waiting in the
-- outbox. Rows that existed before this migration, and rows written by anything but the
-- executor's outbox path, default to 0 ("not in the outbox").

CREATE SEQUENCE IF NOT EXISTS execution_outbox_seq;

ALTER TABLE fills ADD COLUMN IF NOT EXISTS published_at bigint DEFAULT 0;
ALTER TABLE fills ADD COLUMN IF NOT EXISTS payload bytea;
ALTER TABLE fills ADD COLUMN IF NOT EXISTS seq bigint NOT NULL
    DEFAULT nextval('execution_outbox_seq');
ALTER TABLE fills ADD CONSTRAINT fills_outbox_payload
    CHECK (published_at IS NOT NULL OR payload IS NOT NULL);
CREATE INDEX IF NOT EXISTS fills_outbox ON fills (seq) WHERE published_at IS NULL;

ALTER TABLE order_events ADD COLUMN IF NOT EXISTS published_at bigint DEFAULT 0;
ALTER TABLE order_events ADD COLUMN IF NOT EXISTS payload bytea;
ALTER TABLE order_events ADD COLUMN IF NOT EXISTS seq bigint NOT NULL
    DEFAULT nextval('execution_outbox_seq');
ALTER TABLE order_events ADD CONSTRAINT order_events_outbox_payload
    CHECK (published_at IS NOT NULL OR payload IS NOT NULL);
CREATE INDEX IF NOT EXISTS order_events_outbox ON order_events (seq)
    WHERE published_at IS NULL;
