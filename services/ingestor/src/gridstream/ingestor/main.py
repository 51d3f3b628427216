"""Ingestor wiring: Binance websocket + REST -> Postgres ``candles`` and the Redis streams.

Per connection:

1. Connect to ``{venue_ws_url}/stream?streams=<sym>@trade/<sym>@kline_<iv>/...``.
2. Catch up: per (symbol, interval) read the watermark from Postgres
   (``max(open_time)``), republish candles that were stored but maybe never published
   (a crash between the upsert and the publish), fetch the missing closed candles from
   REST (or the newest ``backfill_candles`` when Postgres has none), upsert, publish.
   Frames arriving meanwhile wait in the websocket buffer.
3. Ready. Frames are handled in batches: the engine drops duplicates and forming
   candles and reports gaps, which are filled from REST before the candle that revealed
   them. Candles are upserted (COPY + one upsert) *before* anything is published.
   Malformed frames go to the ingestor's dead-letter stream.
4. A closed or silent connection (no frame for ``silence_timeout_s``) is reconnected
   with capped, jittered exponential backoff, forever; then back to 2.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Final

import aiohttp
import asyncpg
import msgspec
from websockets.asyncio.client import ClientConnection, connect

from gridstream.common import codec, db, metrics
from gridstream.common.binance import market as bm
from gridstream.common.bus import (
    DLQ_DELIVERIES,
    DLQ_ENTRY,
    DLQ_PAYLOAD,
    DLQ_REASON,
    DLQ_STREAM,
    Outgoing,
)
from gridstream.common.messages import Candle, Tick
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import (
    DEAD_LETTER_MAXLEN,
    Kind,
    Service,
    dead_letters,
    stream,
)
from gridstream.ingestor.engine import Gap, IngestEngine

log = logging.getLogger("gridstream.ingestor")

SERVICE: Final = Service.INGESTOR
CANDLES_TABLE: Final = "candles"
CANDLE_COLUMNS: Final = (
    "symbol",
    "interval",
    "open_time",
    "close_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "source",
)
CANDLE_KEY: Final = ("symbol", "interval", "open_time")
#: How many recent entries of a candle stream are scanned to find what was published.
PUBLISHED_SCAN: Final = 1000
DLQ_REASON_MALFORMED: Final = "malformed"
WS_TARGET: Final = "websocket"


class IngestorSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Ingestor settings (env ``GS_<FIELD>``), on top of :class:`CommonSettings`."""

    intervals: list[str] = msgspec.field(default_factory=lambda: ["1m"])
    #: Candles fetched per (symbol, interval) at start when Postgres has none.
    backfill_candles: int = 1000
    ws_ping_interval_s: float = 20.0
    #: A connection with no frame for this long is considered dead and reconnected.
    silence_timeout_s: float = 30.0
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 30.0
    rest_timeout_s: float = 15.0
    ws_open_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.intervals:
            raise ValueError("GS_INTERVALS: at least one interval is required")
        for interval in self.intervals:
            if interval not in bm.INTERVAL_MS:
                raise ValueError(f"GS_INTERVALS: unsupported interval {interval!r}")
        if self.backfill_candles < 0:
            raise ValueError("GS_BACKFILL_CANDLES: must be >= 0")
        if self.silence_timeout_s <= 0:
            raise ValueError("GS_SILENCE_TIMEOUT_S: must be > 0")
        if self.ws_ping_interval_s <= 0:
            raise ValueError("GS_WS_PING_INTERVAL_S: must be > 0")
        if not 0 < self.reconnect_initial_s <= self.reconnect_max_s:
            raise ValueError("GS_RECONNECT_INITIAL_S: must be > 0 and <= GS_RECONNECT_MAX_S")


class Backoff:
    """Capped exponential backoff with full jitter; never gives up."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next(self) -> float:
        cap = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return self.rng.uniform(self.initial_s / 2, cap)

    def reset(self) -> None:
        self.attempt = 0


class ConnectionLost(Exception):
    """The websocket closed or went silent; reconnect."""


_CLOSED: Final = object()


def candle_record(c: Candle) -> tuple[object, ...]:
    return (
        c.symbol,
        c.interval,
        c.open_time,
        c.close_time,
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.quote_volume,
        c.trades,
        c.source,
    )


def subscriptions(settings: IngestorSettings) -> list[str]:
    names: list[str] = []
    for symbol in settings.symbols:
        names.append(bm.trade_stream(symbol))
        names.extend(bm.kline_stream(symbol, iv) for iv in settings.intervals)
    return names


class Ingestor:
    """One ingestor replica: owns the engine, the HTTP session and the reconnect loop."""

    def __init__(self, rt: Runtime, settings: IngestorSettings) -> None:
        self.rt = rt
        self.settings = settings
        self.engine = IngestEngine()
        self.symbols = [s.upper() for s in settings.symbols]
        self.url = bm.combined_stream_url(settings.venue_ws_url, subscriptions(settings))
        self.backoff = Backoff(settings.reconnect_initial_s, settings.reconnect_max_s)
        self.connections = 0
        self.dead_lettered = 0
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.rest_timeout_s)
            )
        return self._session

    # -- the reconnect loop -----------------------------------------------------------------
    async def run(self) -> None:
        """Connect, catch up and stream until ``rt.stop_event``; reconnect on any failure."""
        stop = self.rt.stop_event
        try:
            while not stop.is_set():
                task = asyncio.create_task(self._connection(), name="ingestor-connection")
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not task.done():
                    await self._finish(task)
                    break
                exc = task.exception()
                self.rt.ready = False
                if stop.is_set():
                    break
                if exc is not None:
                    log.warning("connection failed: %s: %s", type(exc).__name__, exc)
                metrics.RECONNECTS.labels(SERVICE.value, WS_TARGET).inc()
                delay = self.backoff.next()
                log.info("reconnecting in %.2fs", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            self.rt.ready = False
            if self._session is not None:
                await self._session.close()

    async def _finish(self, task: asyncio.Task[None]) -> None:
        """Stop requested: let the batch in hand finish briefly, then cancel."""
        with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
            await asyncio.wait_for(asyncio.shield(task), 2.0)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    async def _connection(self) -> None:
        log.info("connecting to %s", self.url)
        async with connect(
            self.url,
            ping_interval=self.settings.ws_ping_interval_s,
            ping_timeout=self.settings.ws_ping_interval_s,
            open_timeout=self.settings.ws_open_timeout_s,
            close_timeout=2.0,
            max_queue=None,
        ) as ws:
            self.connections += 1
            queue: asyncio.Queue[object] = asyncio.Queue()
            reader = asyncio.create_task(self._read(ws, queue), name="ingestor-ws-reader")
            try:
                await self.catch_up()
                self.rt.ready = True
                self.rt.status["connections"] = self.connections
                log.info("connected and caught up; streaming %s", ", ".join(self.symbols))
                await self._stream(queue)
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await reader

    @staticmethod
    async def _read(ws: ClientConnection, q: asyncio.Queue[object]) -> None:
        try:
            async for frame in ws:
                q.put_nowait(frame)
        finally:
            q.put_nowait(_CLOSED)

    async def _stream(self, queue: asyncio.Queue[object]) -> None:
        stop = self.rt.stop_event
        silence = self.settings.silence_timeout_s
        last = time.monotonic()
        while not stop.is_set():
            try:
                first = await asyncio.wait_for(queue.get(), timeout=min(1.0, silence))
            except TimeoutError:
                if time.monotonic() - last > silence:
                    raise ConnectionLost(f"no frame for {silence:.0f}s") from None
                continue
            last = time.monotonic()
            batch: list[bytes | str] = []
            closed = False
            item = first
            while True:
                if item is _CLOSED:
                    closed = True
                    break
                if isinstance(item, bytes | str):
                    batch.append(item)
                if len(batch) >= self.settings.batch_size or queue.empty():
                    break
                item = queue.get_nowait()
            if batch:
                await self.handle_frames(batch)
                self.backoff.reset()
            if closed:
                raise ConnectionLost("websocket closed by the server")

    # -- one batch of frames ----------------------------------------------------------------
    async def handle_frames(self, frames: Sequence[bytes | str]) -> None:
        """Engine over the frames; fill gaps; store candles; publish; dead-letter the bad."""
        ts_init = time.time_ns()
        out: list[Outgoing] = []
        candles: list[Candle] = []
        dead: list[bm.MalformedFrame] = []
        for frame in frames:
            try:
                items = self.engine.on_frame(frame, ts_init=ts_init)
            except bm.MalformedFrame as exc:
                dead.append(exc)
                continue
            for item in items:
                if isinstance(item, Gap):
                    filled = await self.fill_gap(item)
                    candles.extend(filled)
                    out.extend((stream(Kind.CANDLES, c.symbol), c) for c in filled)
                elif isinstance(item, Candle):
                    candles.append(item)
                    out.append((stream(Kind.CANDLES, item.symbol), item))
                elif isinstance(item, Tick):
                    out.append((stream(Kind.TICKS, item.symbol), item))
        if candles:
            await self.store(candles)
        if dead:
            await self.dead_letter(dead)
        if out:
            await self.rt.producer.publish(out)

    async def fill_gap(self, gap: Gap) -> list[Candle]:
        fetched = await bm.fetch_klines(
            self.session,
            self.settings.venue_rest_url,
            gap.symbol,
            gap.interval,
            gap.first_open_time,
            gap.last_open_time,
        )
        filled = self.engine.fill_gap(gap, fetched)
        metrics.GAPS.labels(SERVICE.value, gap.symbol).inc()
        metrics.GAP_CANDLES.labels(SERVICE.value, gap.symbol).inc(len(filled))
        log.warning(
            "gap in %s %s: %d candle(s) missing from %d, %d filled from REST",
            gap.symbol,
            gap.interval,
            gap.missing,
            gap.first_open_time,
            len(filled),
        )
        return filled

    # -- Postgres ---------------------------------------------------------------------------
    @property
    def pool(self) -> asyncpg.Pool:
        if self.rt.pool is None:
            raise RuntimeError("the ingestor needs Postgres: rt.start(database=True)")
        return self.rt.pool

    async def store(self, candles: Sequence[Candle]) -> None:
        """COPY + one upsert; an already stored candle is left as it is."""
        async with self.pool.acquire() as conn, conn.transaction():
            await db.copy_upsert(
                conn,
                CANDLES_TABLE,
                CANDLE_COLUMNS,
                [candle_record(c) for c in candles],
                key=CANDLE_KEY,
            )

    async def stored_watermark(self, symbol: str, interval: str) -> int | None:
        value = await self.pool.fetchval(
            f"SELECT max(open_time) FROM {CANDLES_TABLE} WHERE symbol = $1 AND interval = $2",
            symbol,
            interval,
        )
        return None if value is None else int(value)

    async def stored_after(
        self, symbol: str, interval: str, after: int | None, limit: int
    ) -> list[Candle]:
        """The newest ``limit`` stored candles with open time > ``after``, oldest first."""
        cols = ", ".join(CANDLE_COLUMNS)
        rows = await self.pool.fetch(
            f"SELECT {cols} FROM {CANDLES_TABLE} WHERE symbol = $1 AND interval = $2"
            " AND open_time > $3 ORDER BY open_time DESC LIMIT $4",
            symbol,
            interval,
            -1 if after is None else after,
            limit,
        )
        ts_init = time.time_ns()
        return [
            Candle(
                id=bm.candle_id(r["symbol"], r["interval"], r["open_time"]),
                ts_event=r["close_time"] * bm.NS_PER_MS,
                ts_init=ts_init,
                symbol=r["symbol"],
                interval=r["interval"],
                open_time=r["open_time"],
                close_time=r["close_time"],
                open=r["open"],
                high=r["high"],
                low=r["low"],
                close=r["close"],
                volume=r["volume"],
                quote_volume=r["quote_volume"],
                trades=r["trades"],
                source=r["source"],
            )
            for r in reversed(rows)
        ]

    # -- Redis ------------------------------------------------------------------------------
    async def published_watermarks(self, symbol: str) -> dict[str, int]:
        """Open time of the newest candle per interval found in the symbol's candle stream."""
        found: dict[str, int] = {}
        entries = await self.rt.redis.xrevrange(stream(Kind.CANDLES, symbol), count=PUBLISHED_SCAN)
        for _entry_id, fields in entries or []:
            payload = (fields or {}).get(codec.FIELD)
            if not isinstance(payload, bytes):
                continue
            try:
                msg = codec.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if isinstance(msg, Candle) and msg.open_time > found.get(msg.interval, -1):
                found[msg.interval] = msg.open_time
        return found

    async def dead_letter(self, bad: Sequence[bm.MalformedFrame]) -> None:
        target = dead_letters(SERVICE)
        pipe = self.rt.redis.pipeline(transaction=False)
        for exc in bad:
            source = exc.stream or WS_TARGET
            pipe.xadd(
                target,
                {
                    DLQ_STREAM: source,
                    DLQ_ENTRY: b"",
                    DLQ_REASON: f"{DLQ_REASON_MALFORMED}: {exc.reason}"[:2000],
                    DLQ_DELIVERIES: b"1",
                    DLQ_PAYLOAD: exc.raw,
                },
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
            log.warning("dead-lettered a malformed frame from %s: %s", source, exc.reason)
        await pipe.execute()
        for exc in bad:
            metrics.DEAD_LETTERS.labels(
                SERVICE.value, exc.stream or WS_TARGET, DLQ_REASON_MALFORMED
            ).inc()
        self.dead_lettered += len(bad)

    # -- catch-up ---------------------------------------------------------------------------
    async def catch_up(self) -> None:
        """Watermarks from Postgres, then stored-but-unpublished and missing candles."""
        s = self.settings
        venue_now: int | None = None
        for symbol in self.symbols:
            published = await self.published_watermarks(symbol)
            for interval in s.intervals:
                stored = await self.stored_watermark(symbol, interval)
                self.engine.set_watermark(symbol, interval, stored)
                out: list[Candle] = []
                if stored is not None and published.get(interval, -1) < stored:
                    out.extend(
                        await self.stored_after(
                            symbol, interval, published.get(interval), s.backfill_candles
                        )
                    )
                    if out:
                        log.info(
                            "republishing %d stored %s %s candle(s)", len(out), symbol, interval
                        )
                if venue_now is None:
                    venue_now = await bm.fetch_server_time(self.session, s.venue_rest_url)
                if stored is None:
                    fetched = await bm.fetch_latest_klines(
                        self.session, s.venue_rest_url, symbol, interval, s.backfill_candles
                    )
                else:
                    fetched = await bm.fetch_klines(
                        self.session,
                        s.venue_rest_url,
                        symbol,
                        interval,
                        stored + bm.interval_ms(interval),
                        None,
                    )
                closed = [c for c in fetched if c.close_time < venue_now]
                new = self.engine.on_backfill(closed)
                if new:
                    await self.store(new)
                    if stored is not None:
                        metrics.GAPS.labels(SERVICE.value, symbol).inc()
                        metrics.GAP_CANDLES.labels(SERVICE.value, symbol).inc(len(new))
                    log.info(
                        "backfilled %d %s %s candle(s) from REST (%d..%d)",
                        len(new),
                        symbol,
                        interval,
                        new[0].open_time,
                        new[-1].open_time,
                    )
                out.extend(new)
                if out:
                    await self.rt.producer.publish((stream(Kind.CANDLES, c.symbol), c) for c in out)


async def amain(settings: IngestorSettings | None = None) -> None:
    settings = settings or load_or_exit(IngestorSettings)
    rt = Runtime(SERVICE, settings)
    try:
        await rt.start(database=True)
        await Ingestor(rt, settings).run()
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)
