"""A stopping replica keeps its leases until it has closed: its last commits hold."""

from __future__ import annotations

import asyncio
import time

import redis.asyncio as aioredis

from gridstream.common.runtime import Runtime
from gridstream.common.settings import CommonSettings
from gridstream.common.streams import Service

TTL_MS = 300


async def test_leases_are_renewed_after_a_stop_until_close(redis_url):
    settings = CommonSettings(redis_url=redis_url, lease_ttl_ms=TTL_MS, metrics_port=0)
    rt = Runtime(Service.ARCHIVER, settings)
    r = aioredis.Redis.from_url(redis_url)
    try:
        await rt.start(database=False)
        assert await rt.become_active()
        assert rt.active is not None
        key, value = rt.active.fence()
        rt.request_stop()  # SIGTERM: the service now does its last work (a final flush)
        # that work may take many TTLs on a loaded machine: the lease must still be ours
        # (the fence of its commits) for as long as the runtime is not closed
        until = time.monotonic() + 6 * TTL_MS / 1000
        while time.monotonic() < until:
            got = await r.get(key)
            assert got is not None and got.decode() == value, "the lease lapsed after stop"
            await asyncio.sleep(TTL_MS / 10_000)
    finally:
        await rt.close()
    assert await r.get(key) is None  # released at close, for a quick handover
    await r.aclose()
