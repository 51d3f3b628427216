"""aiohttp wiring: REST + websockets on one port, and the replay clock task.

In-process use (tests, other services' tests)::

    runner, url = await start(settings)      # url like "http://127.0.0.1:8900"
    ...
    await runner.cleanup()

``port=0`` in the settings picks a free ephemeral port (``url`` tells which).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import msgspec
from aiohttp import WSMsgType, web

from gridstream.common.metrics import PATH_LIVE, health_body

from .data import CandleSeries, first_open_time, load_candles, load_file
from .engine import ApiError, Engine, Event, MarketEvent, UserEvent, fmt, missing
from .ratelimit import RateLimiter, banned_msg, too_much_weight_msg
from .settings import FaultSpec, SimSettings
from .symbols import SymbolSpec, derived_spec, exchange_info, load_specs

log = logging.getLogger("gridstream.simulator")

MARKET_QUEUE = 2048
REPEAT_MEMORY = 1000  # frames per market connection kept for ``repeat`` faults
STREAM_RE = re.compile(
    r"^([a-z0-9]+)@(trade|aggTrade|kline_(1m|3m|5m|15m|30m|1h|2h|4h|6h|8h|12h|1d))$"
)
_SIG_RE = re.compile(r"(^|&)signature=[^&]*")
_enc = msgspec.json.Encoder()

# Request weights of Binance spot's current REST docs (binance/binance-spot-api-docs,
# rest-api.md; the 2023-08-25 changelog raised them to these values): klines 2 for any
# limit (the limit-dependent 1/2/5/10 table belongs to the futures API), exchangeInfo 20,
# order GET 4 / POST 1 / DELETE 1, openOrders 6 with symbol and 80 without, allOrders,
# myTrades and account 20, userDataStream 2, everything else (ping, time, ...) 1.
WEIGHTS: dict[tuple[str, str], int] = {
    ("GET", "/api/v3/exchangeInfo"): 20,
    ("GET", "/api/v3/klines"): 2,
    ("GET", "/api/v3/order"): 4,
    ("GET", "/api/v3/openOrders"): 6,
    ("GET", "/api/v3/allOrders"): 20,
    ("GET", "/api/v3/myTrades"): 20,
    ("GET", "/api/v3/account"): 20,
    ("POST", "/api/v3/userDataStream"): 2,
    ("PUT", "/api/v3/userDataStream"): 2,
    ("DELETE", "/api/v3/userDataStream"): 2,
}


def _pow10(digits: int) -> Decimal:
    return Decimal(1).scaleb(-min(max(digits, 0), 8))


def symbol_specs(
    settings: SimSettings, series: Mapping[str, CandleSeries]
) -> dict[str, SymbolSpec]:
    """Recorded filters for the known symbols, ``GS_SIM_FILTERS`` overrides, and for any
    other symbol a PRICE_FILTER/LOT_SIZE derived from the data's decimals (tick = 10^-d
    for the most price decimals seen, step likewise for quantities, both at most 8)."""
    known = load_specs()
    out: dict[str, SymbolSpec] = {}
    for s, ser in series.items():
        f = settings.filters.get(s)
        if f is not None:
            out[s] = derived_spec(
                s, f.tick, f.step, f.min_notional or Decimal(0), base_on=known.get(s)
            )
        elif s in known:
            out[s] = known[s]
        else:
            out[s] = derived_spec(s, _pow10(ser.digits_price), _pow10(ser.digits_qty))
    return out


def build_engine(settings: SimSettings) -> Engine:
    """Load the configured symbols' candles or trades and build the engine."""
    data = settings.data_path
    custom = {s: Path(p) for s, p in settings.files.items() if s in settings.symbols}
    files = {s: data / f"{s}-1m.csv.gz" for s in settings.symbols if s not in custom}
    for s, f in {**files, **custom}.items():
        if not f.is_file():
            raise FileNotFoundError(f"no candle file for {s}: {f}")
    # custom files are read whole (the engine never replays past the window end)
    loaded = {s: load_file(p).series for s, p in custom.items()}
    start = settings.start_ms
    if start is None:
        # Without an explicit start the window opens history_hours after the first candle,
        # so clients can backfill that much history over REST (e.g. to warm up indicators).
        firsts = [first_open_time(f) for f in files.values()]
        firsts += [ser.candles[0].open_time for ser in loaded.values() if ser.candles]
        start = min(firsts) + int(settings.history_hours * 3_600_000)
    end = start + int(settings.hours * 3_600_000)
    series = {s: CandleSeries(load_candles(f, until_open_ms=end)) for s, f in files.items()}
    series.update(loaded)
    series = {s: series[s] for s in settings.symbols}
    return Engine(
        series=series,
        specs=symbol_specs(settings, series),
        window_start=start,
        window_end=end,
        trades_per_candle=settings.trades_per_candle,
        balances=settings.balances,
        maker_fee=settings.maker_fee,
        taker_fee=settings.taker_fee,
        rest_forming_kline=settings.rest_forming_kline,
    )


@dataclass(eq=False)
class Subscriber:
    ws: web.WebSocketResponse
    combined: bool
    streams: set[str] = field(default_factory=set)
    user: bool = False
    queue: asyncio.Queue[str] = field(default_factory=lambda: asyncio.Queue(MARKET_QUEUE))
    transport: asyncio.BaseTransport | None = None
    closed: bool = False
    silenced_until: float = 0.0  # loop time; frames dequeued before it are dropped
    discarded: int = 0
    #: A frame taken off the queue and not yet written.
    sending: bool = False
    sent: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=REPEAT_MEMORY)
    )
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def send(self, text: str, *, remember: bool = True) -> None:
        async with self.lock:
            if self.closed or self.ws.closed:
                return
            await self.ws.send_str(text)
        if remember:
            self.sent.append(text)

    async def repeat(self, k: int) -> None:
        frames = list(self.sent)[-k:] if k > 0 else []
        with contextlib.suppress(ConnectionError, RuntimeError):
            for text in frames:
                await self.send(text, remember=False)


class Simulator:
    """Holds the engine and everything the wiring needs around it."""

    def __init__(self, settings: SimSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self.engine = engine if engine is not None else build_engine(settings)
        self.subs: set[Subscriber] = set()
        self.listen_keys: set[str] = set()
        self.clients_event = asyncio.Event()
        self.started = False
        self.replay_task: asyncio.Task[None] | None = None
        #: The wall clock of request-weight windows and bans (tests may drive it).
        self.wall: Callable[[], float] = time.time
        self.limiter = RateLimiter(
            settings.weight_limit, settings.weight_window_s, settings.ban_seconds
        )
        # set while at least one market-data client is subscribed (speed 0 waits on it)
        self.market_event = asyncio.Event()
        self.market_connections_total = 0
        #: True while the replay (speed 0) waits for a market-data client
        self.replay_waiting = False
        self.faults_fired: list[dict[str, Any]] = []
        self._fault_queue = self._fault_schedule(settings.faults)
        self._bg: set[asyncio.Task[Any]] = set()
        if not settings.wait_for_clients:
            self.clients_event.set()
        #: REST requests being handled now (a lockstep driver waits for none).
        self.requests_in_flight = 0
        #: Lockstep: the barrier the replay waits at (0: before the first step), whether
        #: it waits now, and what it waits after ("start", "trades" or "closes").
        self.barrier = 0
        self.paused = False
        self.pause_phase = ""
        self._resume = asyncio.Event()

    # ------------------------------------------------------------ lockstep
    async def _pause(self, phase: str) -> None:
        """Wait at the next barrier until :meth:`resume` (lockstep only)."""
        self.barrier += 1
        self.pause_phase = phase
        self.paused = True
        self._resume.clear()
        await self._resume.wait()
        self.paused = False

    def resume(self, barrier: int) -> bool:
        """Let the replay go on from ``barrier`` (False when it does not wait there)."""
        if not self.paused or barrier != self.barrier:
            return False
        self._resume.set()
        return True

    def unsent_frames(self) -> int:
        """Frames queued for a websocket client and not yet written."""
        return sum(s.queue.qsize() + s.sending for s in self.subs if not s.closed)

    # ------------------------------------------------------------ connections
    def add_sub(self, sub: Subscriber) -> None:
        self.subs.add(sub)
        if not sub.user:
            self.market_connections_total += 1
        self.market_changed()

    def remove_sub(self, sub: Subscriber) -> None:
        sub.closed = True
        self.subs.discard(sub)
        # unblock a replay waiting to put into this subscriber's full queue
        while not sub.queue.empty():
            sub.queue.get_nowait()
        self.market_changed()

    def market_changed(self) -> None:
        if any(s.streams for s in self.subs if not s.user and not s.closed):
            self.market_event.set()
            self.clients_event.set()
        else:
            self.market_event.clear()

    def market_subs(self) -> list[Subscriber]:
        return [s for s in self.subs if not s.user and not s.closed]

    # ------------------------------------------------------------ faults
    def _fault_schedule(self, specs: tuple[FaultSpec, ...]) -> list[tuple[int, int, FaultSpec]]:
        eng = self.engine
        out: list[tuple[int, int, FaultSpec]] = []
        for i, f in enumerate(specs):
            if f.kind == "drop-every":
                at = eng.window_start + f.minute * 60_000
                while at < eng.window_end:
                    out.append((at, i, f))
                    at += f.minute * 60_000
            else:
                out.append((eng.window_start + f.minute * 60_000, i, f))
        heapq.heapify(out)
        return out

    def apply_fault(
        self, kind: str, *, seconds: float = 0.0, frames: int = 0, at_ms: int, source: str
    ) -> int:
        """Apply a fault to every market-data connection now; return how many."""
        subs = self.market_subs()
        loop = asyncio.get_running_loop()
        for sub in subs:
            if kind == "drop":
                self.remove_sub(sub)
                if sub.transport is not None:
                    sub.transport.close()  # abrupt: no close frame (client sees 1006)
                else:
                    task = asyncio.create_task(sub.ws.close())
                    self._bg.add(task)
                    task.add_done_callback(self._bg.discard)
            elif kind == "silence":
                sub.silenced_until = loop.time() + seconds
            elif kind == "repeat":
                rt = asyncio.create_task(sub.repeat(frames))
                self._bg.add(rt)
                rt.add_done_callback(self._bg.discard)
        rec: dict[str, Any] = {
            "kind": kind,
            "at_ms": at_ms,
            "affected": len(subs),
            "source": source,
            "wall_ms": int(time.time() * 1000),
        }
        if kind == "silence":
            rec["seconds"] = seconds
        if kind == "repeat":
            rec["frames"] = frames
        self.faults_fired.append(rec)
        log.info("fault %s at %d: %d market connection(s)", kind, at_ms, len(subs))
        return len(subs)

    def fire_due_faults(self, t: int) -> bool:
        q = self._fault_queue
        fired = False
        while q and q[0][0] <= t:
            fired = True
            at, _, f = heapq.heappop(q)
            kind = "drop" if f.kind == "drop-every" else f.kind
            self.apply_fault(kind, seconds=f.arg, frames=int(f.arg), at_ms=at, source=f.kind)
        return fired

    # ------------------------------------------------------------ replay
    async def run_replay(self) -> None:
        await self.clients_event.wait()
        self.started = True
        eng = self.engine
        speed = self.settings.speed
        loop = asyncio.get_running_loop()
        wall0 = loop.time()
        log.info("replay started at %d, speed %s", eng.window_start, speed)
        lockstep = self.settings.lockstep
        if lockstep:
            await self._pause("start")
        fills_seen = len(eng.fills)
        while True:
            if speed == 0 and not self.market_event.is_set():
                # "as fast as consumers take": with no market-data client connected the
                # replay waits (a dropped client must not let it run away unobserved)
                self.replay_waiting = True
                await self.market_event.wait()
                self.replay_waiting = False
            t = eng.peek_time()
            if t is None:
                break
            if speed > 0 and not lockstep:
                delay = wall0 + (t - eng.window_start) / speed / 1000 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if self.fire_due_faults(t) and speed == 0 and not self.market_event.is_set():
                continue  # a drop just left nobody to replay to: wait for a client first
            closes = lockstep and eng.closes_next()
            if closes and len(eng.fills) != fills_seen:
                # the minute's trades filled orders: the driver lets their fills reach
                # everything downstream before the closes go out
                await self._pause("trades")
                fills_seen = len(eng.fills)
            await self.publish(eng.step())
            if closes:
                await self._pause("closes")
                fills_seen = len(eng.fills)
            elif speed == 0:
                await asyncio.sleep(0)
        log.info("replay window done at %d", eng.clock_ms)

    async def publish(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, MarketEvent):
                raw: str | None = None
                comb: str | None = None
                for sub in list(self.subs):
                    if sub.user or ev.stream not in sub.streams or sub.closed:
                        continue
                    if sub.combined:
                        comb = (
                            comb or _enc.encode({"stream": ev.stream, "data": ev.payload}).decode()
                        )
                        await sub.queue.put(comb)
                    else:
                        raw = raw or _enc.encode(ev.payload).decode()
                        await sub.queue.put(raw)
            else:
                self.push_user(ev)

    def push_user(self, ev: UserEvent) -> None:
        text = _enc.encode(ev.payload).decode()
        for sub in list(self.subs):
            if sub.user and not sub.ws.closed:
                sub.queue.put_nowait(text)

    def push_user_events(self, events: list[Event]) -> None:
        for ev in events:
            if isinstance(ev, UserEvent):
                self.push_user(ev)

    # ------------------------------------------------------------ auth
    def check_key(self, request: web.Request) -> None:
        key = request.headers.get("X-MBX-APIKEY")
        if not key:
            raise ApiError(-2014, "API-key format invalid.", 401)
        if not hmac.compare_digest(key, self.settings.api_key):
            raise ApiError(-2015, "Invalid API-key, IP, or permissions for action.", 401)

    def check_signed(self, request: web.Request, params: Mapping[str, str], body: str) -> None:
        self.check_key(request)
        now = int(time.time() * 1000)
        ts_raw = params.get("timestamp")
        if not ts_raw or not ts_raw.isdigit():
            raise missing("timestamp")
        sig = params.get("signature")
        if not sig:
            raise missing("signature")
        rw_raw = params.get("recvWindow") or "5000"
        try:
            rw = int(Decimal(rw_raw))
        except ArithmeticError as exc:
            raise missing("recvWindow") from exc
        if rw > 60000 or rw <= 0:
            raise ApiError(
                -1102, "'recvWindow' contains unexpected value. Cannot be greater than 60000."
            )
        ts = int(ts_raw)
        if ts > now + 1000:
            raise ApiError(
                -1021, "Timestamp for this request was 1000ms ahead of the server's time."
            )
        if now - ts > rw:
            raise ApiError(-1021, "Timestamp for this request is outside of the recvWindow.")
        qs = _SIG_RE.sub("", request.rel_url.raw_query_string).lstrip("&")
        bd = _SIG_RE.sub("", body).lstrip("&")
        candidates = {qs + bd}
        if qs and bd:
            candidates.add(qs + "&" + bd)
        secret = self.settings.api_secret.encode()
        for payload in candidates:
            want = hmac.new(secret, payload.encode(), hashlib.sha256).hexdigest()
            if hmac.compare_digest(want, sig.lower()):
                return
        raise ApiError(-1022, "Signature for this request is not valid.")


def request_weight(request: web.Request) -> int:
    w = WEIGHTS.get((request.method, request.path), 1)
    if request.path == "/api/v3/openOrders" and "symbol" not in request.query:
        w = 80
    return w


SIM_KEY: web.AppKey[Simulator] = web.AppKey("simulator", Simulator)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=_enc.encode(data), status=status, content_type="application/json")


async def _params(request: web.Request) -> tuple[dict[str, str], str]:
    body = ""
    if request.can_read_body:
        body = await request.text()
    params: dict[str, str] = dict(
        parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True)
    )
    ctype = request.content_type
    if body and ctype != "application/json":
        params.update(parse_qsl(body, keep_blank_values=True))
    return params, body


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _unmetered(path: str) -> bool:
    """Admin and websocket paths carry no REST request weight."""
    return (
        path.startswith("/sim/") or path in (PATH_LIVE, "/stream", "/ws") or path.startswith("/ws/")
    )


@web.middleware
async def _middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    sim = request.app[SIM_KEY]
    if _unmetered(request.path):
        return await handler(request)
    sim.requests_in_flight += 1
    try:
        return await _metered(sim, request, handler)
    finally:
        sim.requests_in_flight -= 1


async def _metered(sim: Simulator, request: web.Request, handler: Handler) -> web.StreamResponse:
    lim = sim.limiter
    v = lim.charge(request.remote or "?", request_weight(request), sim.wall())
    if v.status == 429:
        resp: web.StreamResponse = _json(
            {"code": -1003, "msg": too_much_weight_msg(lim.limit, lim.interval_text())}, 429
        )
        resp.headers["Retry-After"] = str(v.retry_after)
    elif v.status == 418:
        resp = _json({"code": -1003, "msg": banned_msg(v.banned_until_ms)}, 418)
        resp.headers["Retry-After"] = str(v.retry_after)
    else:
        try:
            resp = await handler(request)
        except ApiError as e:
            resp = _json({"code": e.code, "msg": e.msg}, e.status)
    if not resp.prepared:
        resp.headers["X-MBX-USED-WEIGHT-1M"] = str(v.used)
        resp.headers["X-MBX-USED-WEIGHT"] = str(v.used)
    return resp


# ---------------------------------------------------------------- REST handlers
async def ping(request: web.Request) -> web.Response:
    return _json({})


async def health(request: web.Request) -> web.Response:
    """Liveness, with the pid, so a supervisor knows it is its own child that answers."""
    return _json(health_body())


async def server_time(request: web.Request) -> web.Response:
    return _json({"serverTime": int(time.time() * 1000)})


async def exchange_info_h(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    specs = sim.engine.specs
    params, _ = await _params(request)
    names: list[str] = list(specs)
    if params.get("symbol"):
        names = [params["symbol"].upper()]
    elif params.get("symbols"):
        try:
            names = [str(s).upper() for s in json.loads(params["symbols"])]
        except ValueError as exc:
            raise ApiError(-1100, "Illegal characters found in parameter 'symbols'.") from exc
    for n in names:
        if n not in specs:
            raise ApiError(-1121, "Invalid symbol.")
    return _json(
        exchange_info([specs[n] for n in names], int(time.time() * 1000), sim.settings.weight_limit)
    )


def _int_param(params: Mapping[str, str], name: str) -> int | None:
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not raw.lstrip("-").isdigit():
        raise ApiError(-1100, f"Illegal characters found in parameter '{name}'.")
    return int(raw)


async def klines(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    params, _ = await _params(request)
    sym = params.get("symbol", "").upper()
    if not sym:
        raise missing("symbol")
    if sym not in sim.engine.specs:
        raise ApiError(-1121, "Invalid symbol.")
    interval = params.get("interval", "")
    if not interval:
        raise missing("interval")
    sim.engine.check_interval(sym, interval)
    limit = _int_param(params, "limit")
    limit = 500 if limit is None else max(1, min(limit, 1000))
    rows = sim.engine.klines(
        sym, interval, _int_param(params, "startTime"), _int_param(params, "endTime"), limit
    )
    return _json(rows)


async def _signed(request: web.Request) -> tuple[Simulator, dict[str, str]]:
    sim = request.app[SIM_KEY]
    params, body = await _params(request)
    sim.check_signed(request, params, body)
    return sim, params


async def new_order(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    try:
        resp, events = sim.engine.place_order(params)
    except ApiError:
        sim.push_user_events(list(sim.engine.pop_rejected()))
        raise
    sim.push_user_events(events)
    return _json(resp)


async def cancel_order(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    resp, events = sim.engine.cancel_order(params)
    sim.push_user_events(events)
    return _json(resp)


async def get_order(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    return _json(sim.engine.get_order(params))


async def open_orders(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    return _json(sim.engine.open_orders(params))


async def all_orders(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    return _json(sim.engine.all_orders(params))


async def my_trades(request: web.Request) -> web.Response:
    sim, params = await _signed(request)
    return _json(sim.engine.my_trades(params))


async def account(request: web.Request) -> web.Response:
    sim, _ = await _signed(request)
    return _json(sim.engine.account())


async def user_stream(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    sim.check_key(request)
    params, _ = await _params(request)
    if request.method == "POST":
        key = secrets.token_urlsafe(45)[:60]
        sim.listen_keys.add(key)
        return _json({"listenKey": key})
    lk = params.get("listenKey")
    if not lk:
        raise missing("listenKey")
    if lk not in sim.listen_keys:
        raise ApiError(-1125, "This listenKey does not exist.")
    if request.method == "DELETE":
        sim.listen_keys.discard(lk)
    return _json({})


async def empty_exchange_info(request: web.Request) -> web.Response:
    """Futures exchangeInfo with no symbols, so ccxt's default ``load_markets`` works."""
    return _json(
        {
            "timezone": "UTC",
            "serverTime": int(time.time() * 1000),
            "rateLimits": [],
            "exchangeFilters": [],
            "symbols": [],
        }
    )


async def empty_list(request: web.Request) -> web.Response:
    return _json([])


# ---------------------------------------------------------------- admin
async def sim_status(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    st = sim.engine.status()
    st.update(
        {
            "started": sim.started,
            "speed": sim.settings.speed,
            "wait_for_clients": sim.settings.wait_for_clients,
            "market_clients": len(sim.market_subs()),
            "replay_waiting": sim.replay_waiting,
            "market_connections_total": sim.market_connections_total,
            "user_clients": sum(1 for s in sim.subs if s.user),
            "faults": sim.faults_fired,
            "faults_pending": len(sim._fault_queue),
            "lockstep": sim.settings.lockstep,
            "barrier": sim.barrier,
            "paused": sim.paused,
            "pause_phase": sim.pause_phase,
            "requests_in_flight": sim.requests_in_flight,
            "unsent_frames": sim.unsent_frames(),
        }
    )
    return _json(st)


async def sim_resume(request: web.Request) -> web.Response:
    """``POST /sim/resume`` ``{"barrier": N}``: a lockstep replay waiting at barrier ``N``
    goes on to the next one; ``{"ok": false}`` (409) when it does not wait there."""
    sim = request.app[SIM_KEY]
    try:
        barrier = int((await request.json())["barrier"])
    except (ValueError, KeyError, TypeError):
        return _json({"ok": False, "error": 'expected JSON {"barrier": N}'}, 400)
    if not sim.resume(barrier):
        return _json({"ok": False, "barrier": sim.barrier, "paused": sim.paused}, 409)
    return _json({"ok": True})


async def sim_orders(request: web.Request) -> web.Response:
    """Every order the account placed: client id, status and executed quantity."""
    return _json(
        [
            {
                "symbol": o.symbol,
                "clientOrderId": o.client_order_id,
                "status": o.status,
                "executedQty": fmt(o.executed_qty),
            }
            for o in request.app[SIM_KEY].engine.orders.values()
        ]
    )


FAULT_API_KINDS = ("drop", "silence", "repeat")


async def sim_fault(request: web.Request) -> web.Response:
    """``POST /sim/fault`` ``{"kind": "drop"|"silence"|"repeat", "seconds": S, "frames": K}``:
    apply it now to every market-data websocket; ``{"ok": true, "affected": n}``."""
    sim = request.app[SIM_KEY]
    try:
        body = await request.json()
        kind = str(body["kind"])
        seconds = float(body.get("seconds") or 0)
        frames = int(body.get("frames") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        return _json({"ok": False, "error": 'expected JSON {"kind": ..., ...}'}, 400)
    if kind not in FAULT_API_KINDS:
        return _json({"ok": False, "error": f"kind must be one of {FAULT_API_KINDS}"}, 400)
    if kind == "silence" and not seconds > 0:
        return _json({"ok": False, "error": "silence needs seconds > 0"}, 400)
    if kind == "repeat" and frames <= 0:
        return _json({"ok": False, "error": "repeat needs frames > 0"}, 400)
    n = sim.apply_fault(
        kind, seconds=seconds, frames=frames, at_ms=sim.engine.clock_ms, source="admin"
    )
    return _json({"ok": True, "affected": n})


async def sim_fills(request: web.Request) -> web.Response:
    return _json([f.admin() for f in request.app[SIM_KEY].engine.fills])


async def sim_balances(request: web.Request) -> web.Response:
    return _json(request.app[SIM_KEY].engine.balances())


async def sim_start(request: web.Request) -> web.Response:
    sim = request.app[SIM_KEY]
    sim.clients_event.set()
    return _json({"started": True})


# ---------------------------------------------------------------- websockets
def _valid_streams(names: list[str]) -> set[str]:
    out: set[str] = set()
    for n in names:
        m = STREAM_RE.match(n)
        if m:
            out.add(n)
    return out


async def _serve_ws(request: web.Request, sub: Subscriber) -> web.WebSocketResponse:
    sim = request.app[SIM_KEY]
    ws = sub.ws
    if sub.user:
        sub.queue = asyncio.Queue()
    sub.transport = request.transport
    sim.add_sub(sub)
    loop = asyncio.get_running_loop()

    async def sender() -> None:
        while True:
            text = await sub.queue.get()
            sub.sending = True
            try:
                if sub.silenced_until and loop.time() < sub.silenced_until:
                    sub.discarded += 1  # a stalled connection loses these frames
                    continue
                await sub.send(text, remember=not sub.user)
            finally:
                sub.sending = False

    task = asyncio.create_task(sender())
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                req = json.loads(msg.data)
                method, rid = req.get("method"), req.get("id")
                names = [str(p) for p in req.get("params") or []]
            except (ValueError, AttributeError):
                continue
            if method == "SUBSCRIBE":
                sub.streams |= _valid_streams(names)
                sim.market_changed()
                await sub.send(_enc.encode({"result": None, "id": rid}).decode(), remember=False)
            elif method == "UNSUBSCRIBE":
                sub.streams -= set(names)
                sim.market_changed()
                await sub.send(_enc.encode({"result": None, "id": rid}).decode(), remember=False)
            elif method == "LIST_SUBSCRIPTIONS":
                reply = {"result": sorted(sub.streams), "id": rid}
                await sub.send(_enc.encode(reply).decode(), remember=False)
    finally:
        sim.remove_sub(sub)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    return ws


async def ws_combined(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(autoping=True, heartbeat=None)
    await ws.prepare(request)
    names = [n for n in request.query.get("streams", "").split("/") if n]
    return await _serve_ws(request, Subscriber(ws, combined=True, streams=_valid_streams(names)))


async def ws_raw(request: web.Request) -> web.WebSocketResponse:
    sim = request.app[SIM_KEY]
    tail = request.match_info.get("tail", "")
    ws = web.WebSocketResponse(autoping=True)
    await ws.prepare(request)
    if tail in sim.listen_keys:
        return await _serve_ws(request, Subscriber(ws, combined=False, user=True))
    names = [n for n in tail.split("/") if n]
    return await _serve_ws(request, Subscriber(ws, combined=False, streams=_valid_streams(names)))


# ---------------------------------------------------------------- app
def make_app(sim: Simulator) -> web.Application:
    app = web.Application(middlewares=[_middleware])
    app[SIM_KEY] = sim
    r = app.router
    r.add_get("/api/v3/ping", ping)
    r.add_get(PATH_LIVE, health)
    r.add_get("/api/v3/time", server_time)
    r.add_get("/api/v3/exchangeInfo", exchange_info_h)
    r.add_get("/api/v3/klines", klines)
    r.add_post("/api/v3/order", new_order)
    r.add_delete("/api/v3/order", cancel_order)
    r.add_get("/api/v3/order", get_order)
    r.add_get("/api/v3/openOrders", open_orders)
    r.add_get("/api/v3/allOrders", all_orders)
    r.add_get("/api/v3/myTrades", my_trades)
    r.add_get("/api/v3/account", account)
    r.add_post("/api/v3/userDataStream", user_stream)
    r.add_put("/api/v3/userDataStream", user_stream)
    r.add_delete("/api/v3/userDataStream", user_stream)
    r.add_get("/fapi/v1/exchangeInfo", empty_exchange_info)
    r.add_get("/dapi/v1/exchangeInfo", empty_exchange_info)
    # ccxt's default load_markets also reads currencies and margin pairs: empty stubs
    r.add_get("/sapi/v1/capital/config/getall", empty_list)
    r.add_get("/sapi/v1/margin/allPairs", empty_list)
    r.add_get("/sapi/v1/margin/isolated/allPairs", empty_list)
    r.add_get("/sim/status", sim_status)
    r.add_get("/sim/fills", sim_fills)
    r.add_get("/sim/balances", sim_balances)
    r.add_post("/sim/start", sim_start)
    r.add_post("/sim/fault", sim_fault)
    r.add_post("/sim/resume", sim_resume)
    r.add_get("/sim/orders", sim_orders)
    r.add_get("/stream", ws_combined)
    r.add_get("/ws", ws_raw)
    r.add_get("/ws/{tail:.*}", ws_raw)

    async def on_startup(app: web.Application) -> None:
        sim.replay_task = asyncio.create_task(sim.run_replay())

    async def on_shutdown(app: web.Application) -> None:
        for sub in list(sim.subs):
            await sub.ws.close()

    async def on_cleanup(app: web.Application) -> None:
        if sim.replay_task is not None:
            sim.replay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sim.replay_task

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


async def start(settings: SimSettings, engine: Engine | None = None) -> tuple[web.AppRunner, str]:
    """Start the simulator in the running event loop; return ``(runner, base_url)``.

    Stop it with ``await runner.cleanup()``. The :class:`Simulator` is at
    ``runner.app[SIM_KEY]``.
    """
    sim = Simulator(settings, engine)
    runner = web.AppRunner(make_app(sim), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = settings.port
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            port = int(addr[1])
            break
    return runner, f"http://{settings.host}:{port}"


class ThreadedSimulator:
    """The simulator on its own event loop in a daemon thread (for sync clients/tests).

    ``sim = ThreadedSimulator(settings).start()``; ``sim.url``; ``sim.stop()``.
    """

    def __init__(self, settings: SimSettings, engine: Engine | None = None) -> None:
        self.settings = settings
        self._engine = engine
        self.url = ""
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    @property
    def simulator(self) -> Simulator:
        assert self._runner is not None
        return self._runner.app[SIM_KEY]

    def start(self) -> ThreadedSimulator:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                self._runner, self.url = self.loop.run_until_complete(
                    start(self.settings, self._engine)
                )
            except BaseException as exc:
                errors.append(exc)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()

        self._thread = threading.Thread(target=run, name="gridstream-simulator", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._runner is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
        fut.result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()
        self._runner = None
