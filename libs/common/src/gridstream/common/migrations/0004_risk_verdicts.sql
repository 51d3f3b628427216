-- gridstream ledger, version 4: risk's verdicts, durable.
--
-- Risk writes every verdict it gives (one row per intent, ON CONFLICT DO NOTHING) before
-- the verdict is published. At restart an approved place whose order has no terminal
-- state in `orders` (not filled / canceled / failed), including one the executor has
-- not placed yet (no `orders` row), still counts as open exposure; and a redelivered
-- intent gets the very verdict it got before.
--
-- side / price / qty are the intent's; reason / detail are empty for an approval.
-- ts_event / ts_init are the verdict message's (ns since the epoch).
--
-- Values in double braces are rendered from the Python enums (gridstream.common.db
-- render); the statements applied are the very ones of before they were placeholders.
-- R__vocabulary.sql re-renders the two CHECKs whenever an enum changes.

CREATE TABLE IF NOT EXISTS risk_verdicts (
    intent_id        text        PRIMARY KEY,
    client_order_id  text        NOT NULL,
    symbol           text        NOT NULL,
    action           text        NOT NULL CHECK (action IN ({{IntentAction}})),
    side             text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    price            numeric     NOT NULL,
    qty              numeric     NOT NULL,
    verdict          text        NOT NULL CHECK (verdict IN ({{RiskVerdict}})),
    reason           text        NOT NULL DEFAULT '',
    detail           text        NOT NULL DEFAULT '',
    ts_event         bigint      NOT NULL,
    ts_init          bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS risk_verdicts_approved_places
    ON risk_verdicts (symbol, client_order_id) WHERE verdict = {{RiskVerdict.APPROVED}} AND action = {{IntentAction.PLACE}};
CREATE INDEX IF NOT EXISTS risk_verdicts_ts ON risk_verdicts (ts_init);
