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
   with capped, jittered exponential backoff, forever; then back to 2. A connection older
   than ``max_connection_age_s`` (Binance cuts at 24 h) is replaced at once; the catch-up
   of step 2 covers the switch.

Every REST request goes through one :class:`~gridstream.common.binance.market.RestLimiter`:
the used weight (``X-MBX-USED-WEIGHT-1M``) stays under ``rest_weight_fraction`` of
``rest_weight_limit``; a 429 or 418 stops all REST requests until its ``Retry-After``.
A range REST confirms empty although later candles exist is an exchange halt: a row in
``market_halts`` and the ``gridstream_halts_total`` metric, never invented candles.
Trades build candles of the first interval, compared with the exchange's klines
(``gridstream_candle_checks_total{result="agree"|"differ"}``).
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
from gridstream.common.bus import Outgoing, add_dead_letters
from gridstream.common.messages import Candle, Tick
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import (
    Kind,
    Service,
    stream,
)
from gridstream.ingestor.engine import CandleCheck, Gap, Halt, IngestEngine, find_halts

log = logging.getLogger("gridstream.ingestor")

SERVICE: Final = Service.INGESTOR
CANDLES_TABLE: Final = db.CANDLES_TABLE
CANDLE_COLUMNS: Final = db.CANDLE_COLUMNS
CANDLE_KEY: Final = db.CANDLE_KEY
#: How many recent entries of a candle stream are scanned to find what was published.
PUBLISHED_SCAN: Final = 1000
DLQ_REASON_MALFORMED: Final = "malformed"
WS_TARGET: Final = "websocket"
HALTS_TABLE: Final = "market_halts"
TRADE_STREAMS: Final = (bm.EVENT_TRADE, bm.EVENT_AGG_TRADE)
CHECK_AGREE: Final = "agree"
CHECK_DIFFER: Final = "differ"

HALTS: Final = metrics.HALTS
HALT_CANDLES: Final = metrics.HALT_CANDLES
CANDLE_CHECKS: Final = metrics.CANDLE_CHECKS
REST_WEIGHT: Final = metrics.REST_WEIGHT_USED


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
    #: ``trade`` or ``aggTrade``: which Binance trade stream feeds the ticks.
    trade_stream: str = bm.EVENT_TRADE
    #: Replace a connection this old (Binance closes every connection at 24 h).
    max_connection_age_s: float = 23.5 * 3600
    #: The venue's request-weight limit per minute and the share of it we may use.
    rest_weight_limit: int = bm.DEFAULT_WEIGHT_LIMIT
    rest_weight_fraction: float = 0.8
    #: Longest 429/418 wait accepted inside one request before it fails (and retries later).
    rest_max_wait_s: float = 300.0
    #: Compare every closed kline of the first interval with the candle built from trades.
    candle_check: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.trade_stream not in TRADE_STREAMS:
            raise ValueError("GS_TRADE_STREAM: must be 'trade' or 'aggTrade'")
        if self.max_connection_age_s <= 0:
            raise ValueError("GS_MAX_CONNECTION_AGE_S: must be > 0")
        if self.rest_weight_limit <= 0:
            raise ValueError("GS_REST_WEIGHT_LIMIT: must be > 0")
        if not 0 < self.rest_weight_fraction <= 1:
            raise ValueError("GS_REST_WEIGHT_FRACTION: must be in (0, 1]")
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


class ConnectionAged(Exception):
    """The connection reached ``max_connection_age_s``; replace it now (no backoff)."""


_CLOSED: Final = object()


candle_record = db.candle_record


def subscriptions(settings: IngestorSettings) -> list[str]:
    names: list[str] = []
    for symbol in settings.symbols:
        if settings.trade_stream == bm.EVENT_AGG_TRADE:
            names.append(bm.agg_trade_stream(symbol))
        else:
            names.append(bm.trade_stream(symbol))
        names.extend(bm.kline_stream(symbol, iv) for iv in settings.intervals)
    return names


class Ingestor:
    """One ingestor replica: owns the engine, the HTTP session and the reconnect loop."""

    def __init__(self, rt: Runtime, settings: IngestorSettings) -> None:
        self.rt = rt
        self.settings = settings
        self.engine = IngestEngine(settings.intervals[0] if settings.candle_check else None)
        self.limiter = bm.RestLimiter(
            settings.rest_weight_limit, fraction=settings.rest_weight_fraction
        )
        self.halts: list[Halt] = []
        self._publishing: asyncio.Task[int] | None = None
        self._tick_streams: dict[str, str] = {}
        self._candle_streams: dict[str, str] = {}
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
                metrics.RECONNECTS.labels(SERVICE.value, WS_TARGET).inc()
                if isinstance(exc, ConnectionAged):
                    log.info("replacing the connection: %s", exc)
                    continue
                if exc is not None:
                    log.warning("connection failed: %s: %s", type(exc).__name__, exc)
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
            self.engine.reset_builder()
            queue: asyncio.Queue[object] = asyncio.Queue()
            reader = asyncio.create_task(self._read(ws, queue), name="ingestor-ws-reader")
            try:
                await self.catch_up()
                self.rt.ready = True
                self.rt.status["connections"] = self.connections
                log.info("connected and caught up; streaming %s", ", ".join(self.symbols))
                await self._stream(queue)
            finally:
                try:
                    await self.flush()
                except Exception as exc:
                    log.warning("publishing the last batch failed: %s", exc)
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
        last = opened = time.monotonic()
        max_age = self.settings.max_connection_age_s
        while not stop.is_set():
            if time.monotonic() - opened > max_age:
                raise ConnectionAged(f"connection older than {max_age:.0f}s")
            try:
                first = await asyncio.wait_for(queue.get(), timeout=min(1.0, silence, max_age))
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
        """Engine over the frames; fill gaps; store candles; publish; dead-letter the bad.

        The publish of a batch overlaps the decoding of the next (one batch in flight, in
        order: see :meth:`flush`); candles are in Postgres before their publish starts.
        """
        ts_init = time.time_ns()
        out: list[Outgoing] = []
        candles: list[Candle] = []
        dead: list[bm.MalformedFrame] = []
        on_frame = self.engine.on_frame
        tick_streams = self._tick_streams
        append = out.append
        for frame in frames:
            try:
                items = on_frame(frame, ts_init=ts_init)
            except bm.MalformedFrame as exc:
                dead.append(exc)
                continue
            for item in items:
                if type(item) is Tick:
                    name = tick_streams.get(item.symbol)
                    if name is None:
                        name = tick_streams[item.symbol] = stream(Kind.TICKS, item.symbol)
                    append((name, item))
                elif isinstance(item, Gap):
                    filled = await self.fill_gap(item)
                    candles.extend(filled)
                    out.extend((self._candle_stream(c.symbol), c) for c in filled)
                elif isinstance(item, Candle):
                    candles.append(item)
                    append((self._candle_stream(item.symbol), item))
                elif isinstance(item, CandleCheck):
                    self.record_check(item)
        if candles:
            await self.store(candles)
        if dead:
            await self.dead_letter(dead)
        if out:
            await self.flush()
            self._publishing = asyncio.create_task(self.rt.producer.publish(out))

    async def flush(self) -> None:
        """Wait for the batch being published (raises what its publish raised)."""
        task, self._publishing = self._publishing, None
        if task is not None:
            await task

    def _candle_stream(self, symbol: str) -> str:
        name = self._candle_streams.get(symbol)
        if name is None:
            name = self._candle_streams[symbol] = stream(Kind.CANDLES, symbol)
        return name

    @staticmethod
    def record_check(check: CandleCheck) -> None:
        result = CHECK_AGREE if check.agrees else CHECK_DIFFER
        CANDLE_CHECKS.labels(SERVICE.value, check.symbol, result).inc()
        if not check.agrees:
            log.warning(
                "%s %s %d: the kline differs from the candle built from its trades: %s",
                check.symbol,
                check.interval,
                check.open_time,
                "; ".join(check.differences),
            )

    async def fetch_klines(
        self, symbol: str, interval: str, start_ms: int, end_ms: int | None
    ) -> list[Candle]:
        """Paged REST klines inside the weight budget (429/418 respected)."""
        try:
            return await bm.fetch_klines(
                self.session,
                self.settings.venue_rest_url,
                symbol,
                interval,
                start_ms,
                end_ms,
                limiter=self.limiter,
                max_retry_after_s=self.settings.rest_max_wait_s,
            )
        finally:
            REST_WEIGHT.labels(SERVICE.value).set(self.limiter.used)

    async def fill_gap(self, gap: Gap) -> list[Candle]:
        fetched = await self.fetch_klines(
            gap.symbol, gap.interval, gap.first_open_time, gap.last_open_time
        )
        filled = self.engine.fill_gap(gap, fetched)
        # the gap is closed (a newer candle revealed it): whatever REST lacks is a halt
        await self.record_halts(
            find_halts(gap.symbol, gap.interval, gap.first_open_time, gap.last_open_time, filled)
        )
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

    async def record_halts(self, halts: Sequence[Halt]) -> None:
        """Exchange halts: one row each (idempotent), a metric, a log line."""
        if not halts:
            return
        await self.pool.executemany(
            f"INSERT INTO {HALTS_TABLE} (symbol, interval, first_open_time, last_open_time,"
            " candles) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            [(h.symbol, h.interval, h.first_open_time, h.last_open_time, h.candles) for h in halts],
        )
        for h in halts:
            HALTS.labels(SERVICE.value, h.symbol).inc()
            HALT_CANDLES.labels(SERVICE.value, h.symbol).inc(h.candles)
            log.warning(
                "exchange halt in %s %s: no candles from %d to %d (%d interval(s)); recorded",
                h.symbol,
                h.interval,
                h.first_open_time,
                h.last_open_time,
                h.candles,
            )
        self.halts.extend(halts)

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
        letters = [
            (exc.stream or WS_TARGET, f"{DLQ_REASON_MALFORMED}: {exc.reason}", exc.raw)
            for exc in bad
        ]
        for source, reason, _ in letters:
            log.warning("dead-lettered a malformed frame from %s: %s", source, reason)
        await add_dead_letters(self.rt.redis, SERVICE.value, letters)
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
                    venue_now = await bm.fetch_server_time(
                        self.session, s.venue_rest_url, limiter=self.limiter
                    )
                if stored is None:
                    fetched = await bm.fetch_latest_klines(
                        self.session,
                        s.venue_rest_url,
                        symbol,
                        interval,
                        s.backfill_candles,
                        limiter=self.limiter,
                    )
                else:
                    fetched = await self.fetch_klines(
                        symbol, interval, stored + bm.interval_ms(interval), None
                    )
                closed = [c for c in fetched if c.close_time < venue_now]
                if closed:
                    # holes between the watermark and the newest closed candle are halts
                    first = (
                        closed[0].open_time if stored is None else stored + bm.interval_ms(interval)
                    )
                    await self.record_halts(
                        find_halts(symbol, interval, first, closed[-1].open_time, closed)
                    )
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
                    await self.flush()
                    await self.rt.producer.publish((stream(Kind.CANDLES, c.symbol), c) for c in out)


async def amain(settings: IngestorSettings | None = None) -> None:
    settings = settings or load_or_exit(IngestorSettings)
    rt = Runtime(SERVICE, settings)
    try:
        await rt.start(database=True)
        # One active ingestor; other replicas wait as standbys (its output is fenced).
        if await rt.become_active():
            await Ingestor(rt, settings).run()
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)
