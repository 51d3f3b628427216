"""Service wiring shared by every service: the prose of STYLE.md as code.

Load settings and fail fast; open pools; ensure groups; serve metrics; re-read own
pending entries; then loop. On SIGTERM the batch in hand is finished and nothing
unprocessed is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Final, TypeVar

import asyncpg
import redis.asyncio as aioredis

from gridstream.common import db, log, metrics
from gridstream.common.bus import Consumer, Handler, Producer, close_quietly
from gridstream.common.settings import CommonSettings, SettingsError, load_settings, redact_url
from gridstream.common.streams import Service, consumer, group, heartbeat_key

logger = logging.getLogger("gridstream.runtime")

HEARTBEAT_TTL_S: Final = 15
HEARTBEAT_EVERY_S: Final = 5.0

S = TypeVar("S", bound=CommonSettings)


def load_or_exit(cls: type[S]) -> S:
    """Load settings or stop the process with the failing variable named (exit code 2)."""
    try:
        return load_settings(cls)
    except SettingsError as exc:
        print(f"gridstream: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def redis_client(url: str) -> aioredis.Redis:
    """A Redis client with the settings every service uses (bytes, health checks)."""
    return aioredis.Redis.from_url(
        url, decode_responses=False, health_check_interval=30, socket_keepalive=True
    )


class Runtime:
    """Holds one service's connections, metrics server, heartbeat and stop signal."""

    def __init__(self, service: Service, settings: CommonSettings) -> None:
        self.service = service
        self.settings = settings
        self.redis: aioredis.Redis = redis_client(settings.redis_url)
        self.pool: asyncpg.Pool | None = None
        self.producer = Producer(self.redis, maxlen=settings.stream_maxlen, service=service.value)
        self.stop_event = asyncio.Event()
        self.metrics_port = 0
        self.ready = False
        self.started_ns = time.time_ns()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: Any = None
        self._consumers: list[Consumer] = []
        self.status: dict[str, Any] = {}

    @property
    def consumer_name(self) -> str:
        return consumer(self.service, self.settings.replica)

    async def start(self, *, database: bool = False) -> None:
        """Connect (retrying while dependencies come up), migrate, serve metrics, heartbeat."""
        log.setup(self.service.value, self.settings.log_format, self.settings.log_level)
        logger.info(
            "starting %s replica=%s mode=%s redis=%s",
            self.service.value,
            self.settings.replica,
            self.settings.mode,
            redact_url(self.settings.redis_url),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._retry("redis", self.redis.ping)
        if database:
            self.pool = await self._retry(
                "postgres", lambda: db.create_pool(self.settings.database_url)
            )
            await db.migrate(self.pool)
        metrics.touch_standard(self.service.value)
        self._runner, self.metrics_port = await metrics.serve(
            self.settings.metrics_host, self.settings.metrics_port, self.is_ready
        )
        logger.info(
            "metrics on http://%s:%d/metrics", self.settings.metrics_host, self.metrics_port
        )
        self._tasks.append(asyncio.create_task(self._heartbeat(), name="heartbeat"))

    async def _retry(self, what: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        delay = 0.2
        while True:
            try:
                return await fn()
            except (OSError, aioredis.ConnectionError, asyncpg.PostgresError) as exc:
                if self.stop_event.is_set():
                    raise
                metrics.RECONNECTS.labels(self.service.value, what).inc()
                logger.warning("%s not reachable (%s); retrying in %.1fs", what, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def is_ready(self) -> bool:
        return self.ready and not self.stop_event.is_set()

    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            logger.info("stop requested; finishing the batch in hand")
        self.stop_event.set()
        for c in self._consumers:
            c.stop()

    def consumer(self, streams: Sequence[str], handler: Handler) -> Consumer:
        """A consumer in this service's group with a stable per-replica name."""
        s = self.settings
        c = Consumer(
            self.redis,
            group=group(self.service),
            consumer=self.consumer_name,
            streams=streams,
            handler=handler,
            batch_size=s.batch_size,
            block_ms=s.block_ms,
            max_deliveries=s.max_deliveries,
            claim_idle_ms=s.claim_idle_ms,
            claim_interval_s=s.claim_interval_s,
            maxlen=s.stream_maxlen,
        )
        self._consumers.append(c)
        return c

    async def consume(self, streams: Sequence[str], handler: Handler) -> None:
        """Run one consumer until stop is requested."""
        c = self.consumer(streams, handler)
        await c.ensure_groups()
        self.ready = True
        await c.run()

    async def _heartbeat(self) -> None:
        key = heartbeat_key(self.service.value, self.settings.replica)
        task = asyncio.current_task()
        while not self.stop_event.is_set():
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            body = {
                "service": self.service.value,
                "replica": self.settings.replica,
                "pid": os.getpid(),
                "ready": self.ready,
                "metrics_port": self.metrics_port,
                "ts": time.time_ns(),
                "started": self.started_ns,
                **self.status,
            }
            with contextlib.suppress(Exception):
                await self.redis.set(key, json.dumps(body, default=str), ex=HEARTBEAT_TTL_S)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), HEARTBEAT_EVERY_S)

    async def close(self) -> None:
        self.stop_event.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        with contextlib.suppress(Exception):
            await self.redis.delete(heartbeat_key(self.service.value, self.settings.replica))
        if self._runner is not None:
            await self._runner.cleanup()
        if self.pool is not None:
            await self.pool.close()
        await close_quietly(self.redis)
        metrics.UP.labels(self.service.value).set(0)
        logger.info("%s stopped", self.service.value)


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's async main; Ctrl-C exits quietly."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
