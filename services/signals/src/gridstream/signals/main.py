"""Signals service wiring: candles -> :class:`SignalEngine` -> signals.

Consumes ``stream(Kind.CANDLES, sym)`` for every configured symbol, publishes each signal to
``stream(Kind.SIGNALS, sym)``: those of the base interval (``GS_INTERVAL``, 1m) and of the
higher intervals built from it (``GS_HIGHER_INTERVALS``, 5m,15m,1h); readers pick theirs by
``Signal.interval``. At start the engine is warmed up from the Postgres ``candles``
table (the last ``GS_WARMUP_CANDLES`` base candles per symbol; 0, the default, reads what
the slowest interval needs, e.g. 260 hours of 1m candles for 1h) so a restart needs no fresh
warm-up; warm-up candles produce no output.

Which candles count as already handled at start: those up to the open time of the newest
signal already on the symbol's signal stream (their signals were published together with the
acknowledgement of their candle). With no signal there yet, those older than the first candle
on the candle stream (a new group reads the stream from its start). Later candles come from
the stream and produce their signals as usual.

Redelivery: a candle whose signal was emitted recently is answered with the very same signal
(same deterministic id), so an entry re-read after a failed commit is not lost.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any, Final

import asyncpg
import msgspec
import redis.asyncio as aioredis

from gridstream.common import codec
from gridstream.common.bus import Delivery, Outgoing
from gridstream.common.messages import AnyMessage, Candle, Signal, deterministic_id
from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import Kind, Service, stream
from gridstream.core.signals.engine import SignalEngine, SignalParams

log = logging.getLogger("gridstream.signals")

#: How many recent signals are kept to answer redelivered candles identically.
RECENT_SIGNALS = 4096
#: How many newest entries of a signal stream are searched for the last signal of the interval.
LAST_SIGNAL_SCAN = 50


#: The engine's defaults are the settings' defaults (one place to change them).
_DEFAULTS: Final = SignalParams()


class SignalsSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Settings of the signals service (env ``GS_<FIELD>``; see :class:`SignalParams`)."""

    #: The interval of the candles consumed (the base of the higher intervals).
    interval: str = "1m"
    #: Intervals built from base candles, each with its own signals (env: comma-separated).
    higher_intervals: list[str] = msgspec.field(default_factory=lambda: ["5m", "15m", "1h"])
    sma_period: int = _DEFAULTS.sma_period
    ema_period: int = _DEFAULTS.ema_period
    rsi_period: int = _DEFAULTS.rsi_period
    atr_period: int = _DEFAULTS.atr_period
    bb_period: int = _DEFAULTS.bb_period
    bb_k: float = _DEFAULTS.bb_k
    adx_period: int = _DEFAULTS.adx_period
    donchian_period: int = _DEFAULTS.donchian_period
    vol_window: int = _DEFAULTS.vol_window
    vwap_window: int = _DEFAULTS.vwap_window
    trend_lookback: int = _DEFAULTS.trend_lookback
    regime_window: int = _DEFAULTS.regime_window
    adx_enter: float = _DEFAULTS.adx_enter
    adx_exit: float = _DEFAULTS.adx_exit
    vol_enter_z: float = _DEFAULTS.vol_enter_z
    vol_exit_z: float = _DEFAULTS.vol_exit_z
    min_dwell: int = _DEFAULTS.min_dwell
    min_warmup: int = _DEFAULTS.min_warmup
    #: Base candles read from Postgres per symbol at start (0: what every interval needs).
    warmup_candles: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            params = self.params()
        except ValueError as exc:
            raise ValueError(f"GS_{str(exc).split(':', 1)[0].upper()}: {exc}") from None
        try:
            engine = self.engine()
        except ValueError as exc:
            raise ValueError(f"GS_HIGHER_INTERVALS: {exc}") from None
        if self.warmup_candles and self.warmup_candles < params.warmup:
            raise ValueError(
                f"GS_WARMUP_CANDLES: must be 0 (auto: {engine.base_candles_needed()}) or"
                f" >= the warm-up of {params.warmup} candles"
            )

    def params(self) -> SignalParams:
        names = SignalParams.__dataclass_fields__
        return SignalParams(**{name: getattr(self, name) for name in names})

    def engine(self) -> SignalEngine:
        return SignalEngine(self.params(), base=self.interval, higher=tuple(self.higher_intervals))

    def warmup_rows(self) -> int:
        """Base candles read per symbol at start."""
        return self.warmup_candles or self.engine().base_candles_needed()


def candle_from_row(symbol: str, interval: str, row: Mapping[str, Any]) -> Candle:
    """A Candle from a ``candles`` table row (used for warm-up only)."""
    open_time = int(row["open_time"])
    close_time = int(row["close_time"])
    return Candle(
        id=deterministic_id("candle", symbol, interval, open_time),
        ts_event=close_time * 1_000_000,
        ts_init=close_time * 1_000_000,
        symbol=symbol,
        interval=interval,
        open_time=open_time,
        close_time=close_time,
        open=Decimal(str(row["open"])),
        high=Decimal(str(row["high"])),
        low=Decimal(str(row["low"])),
        close=Decimal(str(row["close"])),
        volume=Decimal(str(row["volume"])),
        source="db",
    )


def _decoded(entries: Any) -> list[AnyMessage]:
    """The messages of XRANGE entries that decode (others are skipped)."""
    out: list[AnyMessage] = []
    for _eid, fields in entries or ():
        payload = (fields or {}).get(codec.FIELD)
        if not isinstance(payload, bytes):
            continue
        try:
            out.append(codec.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
    return out


class SignalsService:
    """The engine plus what the wiring needs around it (warm-up, redelivery answers)."""

    def __init__(self, settings: SignalsSettings) -> None:
        self.settings = settings
        self.engine = settings.engine()
        self._recent: OrderedDict[tuple[str, str, int], list[Signal]] = OrderedDict()

    # -- warm-up ----------------------------------------------------------------------------
    async def handled_until(self, redis: aioredis.Redis, symbol: str) -> int | None:
        """Open time up to which candles of ``symbol`` count as handled (None: all of them)."""
        newest = await redis.xrevrange(stream(Kind.SIGNALS, symbol), count=LAST_SIGNAL_SCAN)
        for msg in _decoded(newest):
            if isinstance(msg, Signal) and msg.interval == self.settings.interval:
                return msg.open_time
        oldest = await redis.xrange(stream(Kind.CANDLES, symbol), count=LAST_SIGNAL_SCAN)
        for msg in _decoded(oldest):
            if isinstance(msg, Candle) and msg.interval == self.settings.interval:
                return msg.open_time - 1
        return None

    async def warm_up(
        self, pool: asyncpg.Pool, redis: aioredis.Redis, symbols: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Feed each symbol's recent history from Postgres into the engine; outputs dropped."""
        s = self.settings
        counts: dict[str, int] = {}
        for symbol in s.symbols if symbols is None else symbols:
            self.forget([symbol])
            until = await self.handled_until(redis, symbol)
            rows = await pool.fetch(
                "SELECT open_time, close_time, open, high, low, close, volume FROM ("
                " SELECT * FROM candles WHERE symbol = $1 AND interval = $2"
                " AND open_time <= $3 ORDER BY open_time DESC LIMIT $4"
                ") recent ORDER BY open_time",
                symbol,
                s.interval,
                until if until is not None else 2**62,
                s.warmup_rows(),
            )
            for row in rows:
                self.engine.on_candle(candle_from_row(symbol, s.interval, row))
            counts[symbol] = len(rows)
            log.info(
                "warmed up %s %s with %d candles (handled until %s; warm-up needs %d)",
                symbol,
                s.interval,
                len(rows),
                until,
                self.engine.warmup,
            )
        return counts

    def forget(self, symbols: Sequence[str]) -> None:
        """Drop the state of symbols this replica no longer handles."""
        for symbol in symbols:
            self.engine.forget(symbol)
            for key in [k for k in self._recent if k[0] == symbol]:
                del self._recent[key]

    # -- handling -----------------------------------------------------------------------------
    def on_candle(self, candle: Candle) -> list[Signal]:
        """The engine's answer, or the same signals again for a recently handled candle.

        One base candle may complete signals of several intervals (the 1m one and, at the
        end of a bucket, the 5m/15m/1h ones); a redelivered candle gets them all again.
        """
        key = (candle.symbol, candle.interval, candle.open_time)
        out = self.engine.on_candle(candle)
        if out:
            self._recent[key] = out
            while len(self._recent) > RECENT_SIGNALS:
                self._recent.popitem(last=False)
            return out
        return list(self._recent.get(key, ()))

    async def handle(self, batch: Sequence[Delivery]) -> list[Outgoing]:
        out: list[Outgoing] = []
        for d in batch:
            msg = d.message
            if not isinstance(msg, Candle) or msg.interval != self.settings.interval:
                continue
            for sig in self.on_candle(msg):
                out.append((stream(Kind.SIGNALS, sig.symbol), sig))
        return out


async def amain(settings: SignalsSettings | None = None) -> None:
    settings = settings or load_or_exit(SignalsSettings)
    rt = Runtime(Service.SIGNALS, settings)
    try:
        await rt.start(database=True)
        if rt.pool is None:
            raise RuntimeError("the signals service needs Postgres for its warm-up")
        service = SignalsService(settings)
        pool = rt.pool
        warmed: dict[str, int] = rt.status.setdefault("warmed_up", {})

        async def acquire(symbols: list[str]) -> None:
            warmed.update(await service.warm_up(pool, rt.redis, symbols))

        async def release(symbols: list[str]) -> None:
            service.forget(symbols)
            for s in symbols:
                warmed.pop(s, None)

        # Replicas split the symbols; each warms up a symbol when it takes it over.
        await rt.consume_sharded(
            settings.symbols,
            lambda symbol: [stream(Kind.CANDLES, symbol)],
            service.handle,
            on_acquire=acquire,
            on_release=release,
        )
    finally:
        await rt.close()


def main() -> None:
    run_service(amain)


if __name__ == "__main__":
    main()
