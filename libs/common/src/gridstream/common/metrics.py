"""Standard Prometheus metrics, defined once, and the /metrics + health HTTP server.

Every service exposes the same names (labels say which service and stream):
``gridstream_messages_in_total``, ``gridstream_messages_out_total``,
``gridstream_handler_latency_seconds``, ``gridstream_consumer_lag``,
``gridstream_consumer_pending``, ``gridstream_dead_letters_total``,
``gridstream_reconnects_total``, ``gridstream_gaps_total``,
``gridstream_gap_candles_total``, ``gridstream_halts_total``,
``gridstream_halt_candles_total``, ``gridstream_candle_checks_total``,
``gridstream_rest_weight_used``, ``gridstream_orders_total``,
``gridstream_fills_total``, ``gridstream_rejections_total``,
``gridstream_equity``, ``gridstream_drawdown``, ``gridstream_kill_switch``,
``gridstream_up``.

The process supervisor (``gridstream run``) serves its own registry,
:data:`SUPERVISOR_REGISTRY`: ``gridstream_service_restarts_total`` and
``gridstream_service_crash_loop``, by service.

``/healthz`` answers ``{"status": "ok", "pid": <pid>}`` so that a supervisor can tell its
own child from another process answering on the same port.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

NAMESPACE: Final = "gridstream"

MESSAGES_IN: Final = Counter(
    "messages_in", "Messages consumed", ["service", "stream"], namespace=NAMESPACE
)
MESSAGES_OUT: Final = Counter(
    "messages_out", "Messages published", ["service", "stream"], namespace=NAMESPACE
)
HANDLER_LATENCY: Final = Histogram(
    "handler_latency_seconds",
    "Time to handle one batch",
    ["service"],
    namespace=NAMESPACE,
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CONSUMER_LAG: Final = Gauge(
    "consumer_lag",
    "Entries not yet delivered to the group",
    ["service", "stream"],
    namespace=NAMESPACE,
)
CONSUMER_PENDING: Final = Gauge(
    "consumer_pending",
    "Entries delivered but not acknowledged",
    ["service", "stream"],
    namespace=NAMESPACE,
)
DEAD_LETTERS: Final = Counter(
    "dead_letters",
    "Entries sent to a dead-letter stream",
    ["service", "stream", "reason"],
    namespace=NAMESPACE,
)
RECONNECTS: Final = Counter(
    "reconnects", "Reconnections to a dependency", ["service", "target"], namespace=NAMESPACE
)
GAPS: Final = Counter(
    "gaps", "Market-data gaps detected", ["service", "symbol"], namespace=NAMESPACE
)
GAP_CANDLES: Final = Counter(
    "gap_candles",
    "Candles missing from a gap and backfilled",
    ["service", "symbol"],
    namespace=NAMESPACE,
)
HALTS: Final = Counter(
    "halts",
    "Exchange halts recorded (REST confirms no candles exist)",
    ["service", "symbol"],
    namespace=NAMESPACE,
)
HALT_CANDLES: Final = Counter(
    "halt_candles",
    "Candle intervals inside recorded exchange halts",
    ["service", "symbol"],
    namespace=NAMESPACE,
)
CANDLE_CHECKS: Final = Counter(
    "candle_checks",
    "Exchange klines compared with the candle built from the same trades",
    ["service", "symbol", "result"],
    namespace=NAMESPACE,
)
REST_WEIGHT_USED: Final = Gauge(
    "rest_weight_used",
    "Venue request weight used in the current window (X-MBX-USED-WEIGHT-1M)",
    ["service"],
    namespace=NAMESPACE,
)
MALFORMED_EVENTS: Final = Counter(
    "malformed_events",
    "Venue events that could not be parsed (their effect waits for reconciliation)",
    ["service", "source"],
    namespace=NAMESPACE,
)
ORDERS: Final = Counter(
    "orders",
    "Order requests sent to a venue",
    ["service", "symbol", "action"],
    namespace=NAMESPACE,
)
FILLS: Final = Counter("fills", "Fills recorded", ["service", "symbol"], namespace=NAMESPACE)
REJECTIONS: Final = Counter(
    "rejections", "Order intents rejected", ["service", "reason"], namespace=NAMESPACE
)
EQUITY: Final = Gauge("equity", "Mark-to-market equity in quote currency", namespace=NAMESPACE)
DRAWDOWN: Final = Gauge("drawdown", "Drawdown from peak equity (fraction)", namespace=NAMESPACE)
KILL_SWITCH: Final = Gauge("kill_switch", "1 when the kill switch is tripped", namespace=NAMESPACE)
UP: Final = Gauge("up", "1 while the service is running", ["service"], namespace=NAMESPACE)
LOST_ENTRIES: Final = Counter(
    "lost_entries",
    "Pending entries trimmed away before the group handled them",
    ["service", "stream"],
    namespace=NAMESPACE,
)
TRIMMED: Final = Counter(
    "trimmed_entries",
    "Entries trimmed once every group had them (XTRIM MINID)",
    ["service", "stream"],
    namespace=NAMESPACE,
)
STREAM_BLOCKED: Final = Gauge(
    "stream_blocked",
    "1 while a stream waits on a failed or postponed entry",
    ["service", "stream"],
    namespace=NAMESPACE,
)
LEASES_HELD: Final = Gauge(
    "leases_held",
    "Leases (symbols, or the active role) this replica holds",
    ["service", "replica"],
    namespace=NAMESPACE,
)
LEASE_CHANGES: Final = Counter(
    "lease_changes",
    "Leases taken, released or lost by this replica",
    ["service", "event"],
    namespace=NAMESPACE,
)

#: The supervisor's metrics (``gridstream run``), apart from the services' standard names.
SUPERVISOR_REGISTRY: Final = CollectorRegistry()
SERVICE_RESTARTS: Final = Counter(
    "service_restarts",
    "Child processes restarted by the supervisor after they died",
    ["service"],
    namespace=NAMESPACE,
    registry=SUPERVISOR_REGISTRY,
)
SERVICE_CRASH_LOOP: Final = Gauge(
    "service_crash_loop",
    "1 while a supervised child keeps dying soon after each restart",
    ["service"],
    namespace=NAMESPACE,
    registry=SUPERVISOR_REGISTRY,
)

#: The names every service's /metrics must show (checked by the end-to-end test).
STANDARD_NAMES: Final = (
    "gridstream_messages_in_total",
    "gridstream_messages_out_total",
    "gridstream_handler_latency_seconds",
    "gridstream_consumer_lag",
    "gridstream_consumer_pending",
    "gridstream_dead_letters_total",
    "gridstream_reconnects_total",
    "gridstream_up",
)

ReadyCheck = Callable[[], Awaitable[bool]]

PATH_METRICS: Final = "/metrics"
PATH_LIVE: Final = "/healthz"
PATH_READY: Final = "/readyz"
#: The field of the ``/healthz`` answer that names the serving process.
HEALTH_PID: Final = "pid"


def health_body() -> dict[str, Any]:
    """The ``/healthz`` answer: alive, and which process answers."""
    return {"status": "ok", HEALTH_PID: os.getpid()}


def touch_standard(service: str) -> None:
    """Create the standard label sets so every name shows even before traffic."""
    UP.labels(service).set(1)
    HANDLER_LATENCY.labels(service)
    RECONNECTS.labels(service, "redis")
    for metric in (MESSAGES_IN, MESSAGES_OUT, CONSUMER_LAG, CONSUMER_PENDING):
        metric.labels(service, "")
    DEAD_LETTERS.labels(service, "", "none")


async def serve(
    host: str,
    port: int,
    ready: ReadyCheck | None = None,
    *,
    registry: CollectorRegistry = REGISTRY,
) -> tuple[web.AppRunner, int]:
    """Serve /metrics (of ``registry``), /healthz and /readyz; returns the runner and port."""

    async def metrics_view(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def live_view(_: web.Request) -> web.Response:
        return web.json_response(health_body())

    async def ready_view(_: web.Request) -> web.Response:
        ok = True if ready is None else await ready()
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get(PATH_METRICS, metrics_view)
    app.router.add_get(PATH_LIVE, live_view)
    app.router.add_get(PATH_READY, ready_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    server: Any = site._server
    if server is not None and getattr(server, "sockets", None):
        bound = int(server.sockets[0].getsockname()[1])
    return runner, bound
