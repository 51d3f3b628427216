"""The executor's outbox: a crash between the ledger write and the publish loses nothing.

A real executor process trades against the real simulator; its producer stalls at the
publish of an ``OrderFilled`` (before, or just after, sending it) and the process is
SIGKILLed there. A restarted executor publishes what the ledger holds unpublished.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
from redis.exceptions import ConnectionError as RedisConnectionError
from test_executor import (
    Sim,
    approved,
    exec_settings,
    executions,
    fetch,
    send,
    sim,
    start_executor,
    tick_price,
    wait_for,
)

from gridstream.common.bus import Outgoing, Producer
from gridstream.common.messages import OrderFilled
from gridstream.common.runtime import Runtime
from gridstream.common.streams import Service
from gridstream.executor.main import run
from gridstream.executor.settings import ExecutorSettings

__all__ = ["sim"]  # the simulator fixture, shared with test_executor

D = Decimal

STALL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import msgspec
    from gridstream.common.bus import Producer
    from gridstream.common.messages import OrderFilled
    from gridstream.common.runtime import Runtime
    from gridstream.common.streams import Service
    from gridstream.executor.main import run
    from gridstream.executor.settings import ExecutorSettings

    WHEN = sys.argv[1]  # "before" or "after" the publish of a fill

    class Stalling(Producer):
        async def publish(self, items):
            items = list(items)
            if any(isinstance(m, OrderFilled) for _, m in items):
                if WHEN == "after":
                    await super().publish(items)
                print("@@stalled", flush=True)
                await asyncio.sleep(3600)  # SIGKILLed here
            return await super().publish(items)

    async def main():
        settings = msgspec.json.decode(sys.argv[2], type=ExecutorSettings)
        rt = Runtime(Service.EXECUTOR, settings)
        rt.producer = Stalling(rt.redis, bounds=settings.stream_bounds(), service="executor")
        await run(settings, rt)

    asyncio.run(main())
    """
)


async def crash_at_fill_publish(settings: ExecutorSettings, when: str, log_path: Path) -> None:
    """Run a real executor process until it stalls at a fill's publish, then SIGKILL it."""
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            STALL_SCRIPT,
            when,
            msgspec.json.encode(settings).decode(),
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        try:
            assert proc.stdout is not None
            while True:
                line = await asyncio.wait_for(proc.stdout.readline(), 30)
                assert line, f"executor exited early: {log_path.read_text()}"
                if line.startswith(b"@@stalled"):
                    break
        finally:
            os.kill(proc.pid, signal.SIGKILL)
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL


async def fills_published(redis_url: str) -> list[OrderFilled]:
    return [m for m in await executions(redis_url) if isinstance(m, OrderFilled)]


async def place_crossing_order(sim: Sim, redis_url: str) -> str:
    """A buy above the market: the simulator fills it at once (one trade)."""
    order = approved("BUY", tick_price(sim.last * D("1.01")), "0.0005")
    await send(redis_url, order)
    return order.client_order_id


async def test_crash_before_publish_fill_published_once_after_restart(
    sim: Sim, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    coid = await place_crossing_order(sim, redis_url)
    await crash_at_fill_publish(settings, "before", tmp_path / "executor.log")
    # the fill is in the ledger, waiting in the outbox; nothing reached the stream
    rows = await fetch(database_url, "SELECT trade_id, published_at, client_order_id FROM fills")
    assert [(r["client_order_id"], r["published_at"]) for r in rows] == [(coid, None)]
    assert await fills_published(redis_url) == []
    assert len(sim.sim.engine.fills) == 1

    ex = await start_executor(settings)  # reconciliation publishes the outbox first
    try:
        published = await fills_published(redis_url)
        assert [(m.client_order_id, m.trade_id) for m in published] == [(coid, rows[0]["trade_id"])]
        marked = await fetch(database_url, "SELECT published_at FROM fills")
        assert marked[0]["published_at"] is not None
    finally:
        await ex.stop()
    ex = await start_executor(settings)  # and again: nothing more
    try:
        assert len(await fills_published(redis_url)) == 1
        assert len(await fetch(database_url, "SELECT * FROM fills")) == 1
    finally:
        await ex.stop()


async def test_crash_after_publish_before_mark_repeats_the_same_message(
    sim: Sim, redis_url: str, database_url: str, tmp_path: Path
) -> None:
    settings = exec_settings(redis_url, database_url, sim.url)
    coid = await place_crossing_order(sim, redis_url)
    await crash_at_fill_publish(settings, "after", tmp_path / "executor.log")
    rows = await fetch(database_url, "SELECT published_at FROM fills")
    assert [r["published_at"] for r in rows] == [None]
    first = await fills_published(redis_url)
    assert [m.client_order_id for m in first] == [coid]

    ex = await start_executor(settings)
    try:
        again = await fills_published(redis_url)
        # the one duplicate a crash in that gap can make: the very same message
        assert len(again) == 2
        assert again[1] == first[0]
        assert (await fetch(database_url, "SELECT published_at FROM fills"))[0][
            "published_at"
        ] is not None
    finally:
        await ex.stop()


class FailingOnce(Producer):
    """A real producer whose first publish of a fill fails as if Redis dropped."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.failed = 0

    async def publish(self, items: Iterable[Outgoing]) -> int:
        items = list(items)
        if not self.failed and any(isinstance(m, OrderFilled) for _, m in items):
            self.failed += 1
            raise RedisConnectionError("connection reset (injected)")
        return await super().publish(items)


async def test_failed_publish_is_retried_by_the_running_executor(
    sim: Sim, redis_url: str, database_url: str
) -> None:
    settings = msgspec.structs.replace(
        exec_settings(redis_url, database_url, sim.url), outbox_retry_s=0.1
    )
    rt = Runtime(Service.EXECUTOR, settings)
    producer = FailingOnce(rt.redis, bounds=settings.stream_bounds(), service="executor")
    rt.producer = producer
    task = asyncio.create_task(run(settings, rt))
    try:

        async def ready() -> bool:
            if task.done():
                task.result()
            return rt.ready

        await wait_for(ready, what="executor ready")
        coid = await place_crossing_order(sim, redis_url)

        async def published() -> bool:
            return len(await fills_published(redis_url)) >= 1

        await wait_for(published, what="fill published after the retry")
        assert producer.failed == 1

        async def marked() -> bool:
            rows = await fetch(database_url, "SELECT published_at FROM fills")
            return bool(rows) and rows[0]["published_at"] is not None

        # once the row is marked published the outbox never sends it again: what is on
        # the stream now is all there will be
        await wait_for(marked, what="the outbox row marked published")
        got = await fills_published(redis_url)
        assert [m.client_order_id for m in got] == [coid]
    finally:
        rt.request_stop()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            await rt.close()
