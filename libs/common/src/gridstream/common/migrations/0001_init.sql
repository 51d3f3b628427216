-- gridstream ledger and market data, version 1.
-- Money, prices and quantities are NUMERIC; times are exchange ms (candles) or ns (events).

CREATE TABLE IF NOT EXISTS candles (
    symbol        text        NOT NULL,
    interval      text        NOT NULL,
    open_time     bigint      NOT NULL,
    close_time    bigint      NOT NULL,
    open          numeric     NOT NULL,
    high          numeric     NOT NULL,
    low           numeric     NOT NULL,
    close         numeric     NOT NULL,
    volume        numeric     NOT NULL,
    quote_volume  numeric     NOT NULL DEFAULT 0,
    trades        integer     NOT NULL DEFAULT 0,
    source        text        NOT NULL DEFAULT 'ws',
    PRIMARY KEY (symbol, interval, open_time)
);

-- One row per order, keyed by the deterministic client order id; written before the request.
CREATE TABLE IF NOT EXISTS orders (
    client_order_id  text        PRIMARY KEY,
    intent_id        text        NOT NULL,
    venue            text        NOT NULL,
    symbol           text        NOT NULL,
    side             text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    price            numeric     NOT NULL,
    qty              numeric     NOT NULL,
    status           text        NOT NULL,
    venue_order_id   text,
    filled_qty       numeric     NOT NULL DEFAULT 0,
    ts_created       bigint      NOT NULL,
    ts_updated       bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_symbol_status ON orders (symbol, status);

-- Every event an order went through, once each (keyed by the event's message id).
CREATE TABLE IF NOT EXISTS order_events (
    event_id         text        PRIMARY KEY,
    client_order_id  text        NOT NULL,
    kind             text        NOT NULL,
    detail           text        NOT NULL DEFAULT '',
    ts_event         bigint      NOT NULL
);
CREATE INDEX IF NOT EXISTS order_events_coid ON order_events (client_order_id);

-- Fills, unique per venue trade; fees in their own currency.
CREATE TABLE IF NOT EXISTS fills (
    venue            text        NOT NULL,
    symbol           text        NOT NULL,
    trade_id         text        NOT NULL,
    client_order_id  text        NOT NULL,
    venue_order_id   text        NOT NULL,
    side             text        NOT NULL CHECK (side IN ('BUY', 'SELL')),
    price            numeric     NOT NULL,
    qty              numeric     NOT NULL,
    fee              numeric     NOT NULL,
    fee_asset        text        NOT NULL,
    liquidity        text        NOT NULL,
    ts_event         bigint      NOT NULL,
    PRIMARY KEY (venue, symbol, trade_id)
);
CREATE INDEX IF NOT EXISTS fills_coid ON fills (client_order_id);
