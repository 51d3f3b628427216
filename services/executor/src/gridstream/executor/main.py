"""Executor wiring: reconcile with the venue, then place/cancel approved orders."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

from gridstream.common.runtime import Runtime, load_or_exit, run_service
from gridstream.common.streams import Kind, Service, streams
from gridstream.executor.service import Executor
from gridstream.executor.settings import ExecutorSettings
from gridstream.executor.venue import BinanceVenue, Venue

log = logging.getLogger("gridstream.executor")


def make_venue(settings: ExecutorSettings) -> Venue:
    """The venue for the settings: the simulator, the testnet and live all speak Binance."""
    return BinanceVenue(
        name=settings.venue,
        rest_url=settings.venue_rest_url,
        ws_url=settings.venue_ws_url,
        api_key=settings.key,
        api_secret=settings.secret,
        recv_window_ms=settings.recv_window_ms,
        timeout_s=settings.request_timeout_s,
        keepalive_s=settings.listen_key_keepalive_s,
        reconnect_delay_s=settings.reconnect_delay_s,
        service=Service.EXECUTOR.value,
    )


class BackgroundTaskDied(RuntimeError):
    """The user-stream or outbox task ended while the service was not stopping."""


#: Exit status when a background task died (the process supervisor restarts us).
EXIT_TASK_DIED = 3


def _died(task: asyncio.Task[None], stopping: bool) -> bool:
    """True when a supervised task ended for any reason other than a requested stop."""
    if not task.done() or task.cancelled():
        return False
    return task.exception() is not None or not stopping


async def run(settings: ExecutorSettings, rt: Runtime, venue: Venue | None = None) -> None:
    """Start, follow the venue's events (reconciling first), then consume approved orders.

    Crash-only: the user-stream and outbox tasks are supervised. If either ends while
    the service is not stopping, no further order is sent, the service turns not ready,
    the consumer finishes the batch in hand, and :class:`BackgroundTaskDied` is raised
    (``main`` exits with :data:`EXIT_TASK_DIED`; the restart reconciles before trading).
    """
    await rt.start(database=True)
    assert rt.pool is not None
    # The single writer of orders: one active replica, the others standbys. Its ledger
    # sessions carry the role's fencing token, its publishes the role's lease.
    if not await rt.become_active():
        return
    venue = venue or make_venue(settings)
    executor = Executor(
        venue=venue,
        pool=rt.pool,
        producer=rt.producer,
        symbols=settings.symbols,
        service=Service.EXECUTOR.value,
        unknown_outcome_queries=settings.unknown_outcome_queries,
        unknown_outcome_wait_s=settings.unknown_outcome_wait_s,
        reconnect_delay_s=settings.reconnect_delay_s,
        outbox_retry_s=settings.outbox_retry_s,
        malformed_reconcile_s=settings.malformed_reconcile_s,
        recv_window_ms=settings.recv_window_ms,
        stop_event=rt.stop_event,
    )
    rt.status["venue"] = settings.venue
    # the positions of its fills (the kernel's portfolio), shown in its heartbeat
    await executor.load_positions()
    rt.status["positions"] = executor.positions
    events = asyncio.create_task(executor.follow_events(), name="user-stream")
    outbox = asyncio.create_task(executor.outbox_loop(), name="outbox")
    supervised = (events, outbox)
    helpers: list[asyncio.Task[Any]] = []
    try:
        helpers = [
            asyncio.create_task(executor.reconciled.wait()),
            asyncio.create_task(rt.stop_event.wait()),
        ]
        await asyncio.wait([*helpers, *supervised], return_when=asyncio.FIRST_COMPLETED)
        if not any(_died(t, rt.stop_event.is_set()) for t in supervised) and (
            not rt.stop_event.is_set()
        ):
            consume = asyncio.create_task(
                rt.consume(streams(Kind.ORDERS, settings.symbols), executor.handle),
                name="consume",
            )
            helpers.append(consume)
            await asyncio.wait([consume, *supervised], return_when=asyncio.FIRST_COMPLETED)
            if consume.done():
                consume.result()  # a consumer failure propagates as before
        dead = [t for t in supervised if _died(t, rt.stop_event.is_set())]
        if dead:
            task = dead[0]
            exc = task.exception()
            # No order may go out while venue events are not recorded.
            executor.reconciled.clear()
            rt.ready = False
            log.error(
                "%s task ended (%s); stopping the executor so that a restart reconciles",
                task.get_name(),
                "returned" if exc is None else f"{type(exc).__name__}: {exc}",
                exc_info=exc,
            )
            rt.request_stop()
            for h in helpers:
                if h.get_name() == "consume":
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(h, 30)
            raise BackgroundTaskDied(f"{task.get_name()} task ended") from exc
    finally:
        for task in (*helpers, *supervised):
            task.cancel()
        for task in (*helpers, *supervised):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await venue.close()


async def amain() -> None:
    settings = load_or_exit(ExecutorSettings)
    rt = Runtime(Service.EXECUTOR, settings)
    try:
        await run(settings, rt)
    finally:
        await rt.close()


def main() -> None:
    try:
        run_service(amain)
    except BackgroundTaskDied:
        sys.exit(EXIT_TASK_DIED)


if __name__ == "__main__":
    main()
