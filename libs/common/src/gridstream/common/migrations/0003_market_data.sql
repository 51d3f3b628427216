-- Market data, version 3: exchange halts.
-- A halt is a range of candle open times (exchange ms, both inclusive) for which the
-- venue's REST klines confirm that no candle exists although later candles do (e.g. the
-- Binance spot trading halt of 2023-03-24). It is recorded, never filled with invented
-- candles; the ingestor's watermark moves past it.

CREATE TABLE IF NOT EXISTS market_halts (
    symbol           text        NOT NULL,
    interval         text        NOT NULL,
    first_open_time  bigint      NOT NULL,
    last_open_time   bigint      NOT NULL,
    candles          integer     NOT NULL,
    detected_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (symbol, interval, first_open_time),
    CHECK (last_open_time >= first_open_time)
);
