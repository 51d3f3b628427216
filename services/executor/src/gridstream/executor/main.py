"""Executor wiring: reconcile with the venue, then place/cancel approved orders."""

from __future__ import annotations

import asyncio
import contextlib
import logging

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


async def run(settings: ExecutorSettings, rt: Runtime, venue: Venue | None = None) -> None:
    """Start, follow the venue's events (reconciling first), then consume approved orders."""
    await rt.start(database=True)
    assert rt.pool is not None
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
        stop_event=rt.stop_event,
    )
    rt.status["venue"] = settings.venue
    events = asyncio.create_task(executor.follow_events(), name="user-stream")
    outbox = asyncio.create_task(executor.outbox_loop(), name="outbox")
    try:
        waiters = [
            asyncio.create_task(executor.reconciled.wait()),
            asyncio.create_task(rt.stop_event.wait()),
        ]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for w in waiters:
            w.cancel()
        if not rt.stop_event.is_set():
            await rt.consume(streams(Kind.ORDERS, settings.symbols), executor.handle)
    finally:
        for task in (events, outbox):
            task.cancel()
        for task in (events, outbox):
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
    run_service(amain)


if __name__ == "__main__":
    main()
