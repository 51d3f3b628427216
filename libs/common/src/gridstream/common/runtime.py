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
from gridstream.common.bus import Consumer, Handler, Producer, close_quietly, trim_safely
from gridstream.common.lease import (
    RENEW_FRACTION,
    ActiveLease,
    DuplicateReplica,
    LeaseChanges,
    ReplicaRegistry,
    SymbolLeases,
)
from gridstream.common.settings import (
    REDIS_SOCKET_TIMEOUT_S,
    CommonSettings,
    SettingsError,
    load_settings,
    redact_url,
)
from gridstream.common.streams import PRODUCERS, Service, consumer, group, heartbeat_key, symbol_of
from gridstream.common.streams import streams as streams_of_kind

logger = logging.getLogger("gridstream.runtime")

HEARTBEAT_TTL_S: Final = 15
#: Exit status of a process whose configuration is invalid: restarting it cannot help.
EXIT_INVALID_CONFIG: Final = 2
#: After a stop, leases are renewed this many TTLs at most while the service finishes.
STOP_GRACE_TTLS: Final = 10
#: Exit status of a replica that stopped because a lease it needed was lost.
EXIT_LEASE_LOST: Final = 4
HEARTBEAT_EVERY_S: Final = 5.0

S = TypeVar("S", bound=CommonSettings)


def load_or_exit(cls: type[S]) -> S:
    """Load settings or stop the process with the failing variable named
    (:data:`EXIT_INVALID_CONFIG`)."""
    try:
        return load_settings(cls)
    except SettingsError as exc:
        print(f"gridstream: invalid configuration: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_INVALID_CONFIG) from None


def redis_client(url: str, socket_timeout_s: float = REDIS_SOCKET_TIMEOUT_S) -> aioredis.Redis:
    """A Redis client with the settings every service uses.

    Bytes out, health checks, keep-alive, and a socket timeout, so a Redis that stops
    answering (a half-open connection) fails a call instead of hanging it forever.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_keepalive=True,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=min(socket_timeout_s, 10.0),
    )


class Runtime:
    """Holds one service's connections, metrics server, heartbeat and stop signal."""

    def __init__(self, service: Service, settings: CommonSettings) -> None:
        self.service = service
        self.settings = settings
        self.redis: aioredis.Redis = redis_client(
            settings.redis_url, settings.redis_socket_timeout_s
        )
        self.pool: asyncpg.Pool | None = None
        self.producer = Producer(
            self.redis,
            bounds=settings.stream_bounds(),
            service=service.value,
            max_entry_bytes=settings.max_entry_bytes,
        )
        self.stop_event = asyncio.Event()
        self.metrics_port = 0
        self.ready = False
        self.started_ns = time.time_ns()
        self._tasks: list[asyncio.Task[Any]] = []
        self._runner: Any = None
        self._consumers: list[Consumer] = []
        self.status: dict[str, Any] = {}
        #: This replica's id: ``GS_REPLICA``, or the lowest free one (set by :meth:`start`).
        self.replica = settings.replica
        self.registry = ReplicaRegistry(self.redis, service.value, settings.lease_ttl_ms)
        self.symbol_leases: SymbolLeases | None = None
        self.active: ActiveLease | None = None
        self._changes = LeaseChanges()
        self._last_renewal = time.monotonic()
        #: Exit status when the replica had to stop (a lease it needed was lost).
        self.exit_code = 0

    @property
    def consumer_name(self) -> str:
        return consumer(self.service, self.replica)

    @property
    def lease_every_s(self) -> float:
        return self.settings.lease_ttl_ms / 1000 * RENEW_FRACTION

    async def start(self, *, database: bool = False) -> None:
        """Connect (retrying while dependencies come up), migrate, serve metrics, heartbeat."""
        log.setup(self.service.value, self.settings.log_format, self.settings.log_level)
        logger.info(
            "starting %s replica=%s mode=%s redis=%s",
            self.service.value,
            self.settings.replica or "(auto)",
            self.settings.mode,
            redact_url(self.settings.redis_url),
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, self.request_stop)
        await self._retry("redis", self.redis.ping)
        try:
            self.replica = await self.registry.claim(self.settings.replica)
        except DuplicateReplica as exc:
            print(f"gridstream: invalid configuration: {exc}", file=sys.stderr)
            raise SystemExit(EXIT_INVALID_CONFIG) from None
        logger.info("replica id %s (consumer %s)", self.replica, self.consumer_name)
        self._last_renewal = time.monotonic()
        self._tasks.append(asyncio.create_task(self._lease_loop(), name="leases"))
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
        if PRODUCERS.get(self.service):
            self._tasks.append(asyncio.create_task(self._trim_loop(), name="trim"))

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

    async def trim_outputs(self) -> int:
        """Trim this service's output streams of what every group has and retention allows."""
        s = self.settings
        retention_ms = int(s.stream_retention_s * 1000)
        now_ms = time.time_ns() // 1_000_000
        total = 0
        for kind in PRODUCERS.get(self.service, ()):
            for name in streams_of_kind(kind, s.symbols):
                n = await trim_safely(self.redis, name, retention_ms, now_ms)
                if n:
                    metrics.TRIMMED.labels(self.service.value, name).inc(n)
                    total += n
        return total

    async def _trim_loop(self) -> None:
        task = asyncio.current_task()
        while not self.stop_event.is_set():
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), self.settings.stream_trim_interval_s)
            if self.stop_event.is_set():
                return
            try:
                await self.trim_outputs()
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                logger.warning("cannot trim streams (%s)", exc)

    # -- leases -----------------------------------------------------------------------------
    async def _lease_loop(self) -> None:
        """Renew the replica id and every lease; rebalance symbols; stop if they are lost.

        After a stop is requested it goes on renewing what is held (taking nothing new)
        until :meth:`close`, for at most :data:`STOP_GRACE_TTLS` TTLs: the service's last
        work (a final flush, the batch in hand) still commits under its fences on a loaded
        machine, and a shutdown that hangs still lets the other replicas take over.
        """
        task = asyncio.current_task()
        ttl_s = self.settings.lease_ttl_ms / 1000
        stopped_at: float | None = None
        while True:
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            stopping = self.stop_event.is_set()
            if stopping:
                stopped_at = stopped_at or time.monotonic()
                if time.monotonic() - stopped_at > STOP_GRACE_TTLS * ttl_s:
                    # a shutdown stuck this long must not keep the symbols from the others
                    logger.warning(
                        "still not closed %.0fs after the stop: leases lapse",
                        (time.monotonic() - stopped_at),
                    )
                    return
            try:
                if not await self.registry.renew():
                    self._fatal(f"replica id {self.replica} was lost (taken after expiry)")
                    return
                if self.active is not None and self.active.held and not await self.active.renew():
                    self._fatal("the active role was lost to another replica")
                    return
                if self.symbol_leases is not None:
                    leases = self.symbol_leases
                    self._merge(await (leases.renew_held() if stopping else leases.tick()))
                self._last_renewal = time.monotonic()
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                logger.warning("cannot renew leases (%s)", exc)
                if time.monotonic() - self._last_renewal > ttl_s:
                    self._expire_all()
            if stopping:
                await asyncio.sleep(self.lease_every_s)
            else:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop_event.wait(), self.lease_every_s)

    def _fatal(self, why: str) -> None:
        logger.error("%s: stopping this replica (a restart joins again)", why)
        self.exit_code = _exit_status[0] = EXIT_LEASE_LOST
        self.request_stop()

    def _expire_all(self) -> None:
        """Leases not renewed for a TTL must be assumed gone: stop using them."""
        if self.active is not None and self.active.held:
            self._fatal("the active role could not be renewed for a whole TTL")
        if self.symbol_leases is not None and self.symbol_leases.held:
            lost = sorted(self.symbol_leases.held)
            self.symbol_leases.held.clear()
            self._merge(LeaseChanges(lost=lost))

    def _merge(self, changes: LeaseChanges) -> None:
        c = self._changes
        for sym in changes.lost + changes.to_release:
            if sym in c.gained:
                c.gained.remove(sym)
        c.gained.extend(s for s in changes.gained if s not in c.gained)
        c.to_release.extend(s for s in changes.to_release if s not in c.to_release)
        c.lost.extend(s for s in changes.lost if s not in c.lost)

    async def consume_sharded(
        self,
        symbols: Sequence[str],
        streams_of: Callable[[str], Sequence[str]],
        handler: Handler,
        *,
        on_acquire: Callable[[list[str]], Awaitable[None]] | None = None,
        on_release: Callable[[list[str]], Awaitable[None]] | None = None,
    ) -> None:
        """Consume the streams of the symbols this replica holds leases for, until stop.

        The replicas of the service split ``symbols`` (see :mod:`gridstream.common.lease`).
        A symbol taken over starts with ``on_acquire`` (rebuild its state) and the previous
        holder's pending entries of its streams, in order; a symbol given up is dropped
        between batches, ``on_release`` is called, then its lease is released.
        """
        leases = SymbolLeases(self.redis, self.registry, symbols, self.settings.lease_ttl_ms)
        self.symbol_leases = leases
        c = self.consumer([], handler, allow_empty=True)
        c.fence = lambda stream: leases.fence(symbol_of(stream) or "")
        c.on_lease_lost = lambda key: self._merge(LeaseChanges(lost=[key.rsplit(":", 1)[-1]]))
        await c.ensure_groups()

        async def between() -> None:
            changes, self._changes = self._changes, LeaseChanges()
            gone = [*changes.lost, *changes.to_release]
            for sym in gone:
                c.remove_streams(streams_of(sym))
            if gone and on_release is not None:
                await on_release(gone)
            if changes.to_release:
                await leases.release(changes.to_release)
            for sym in changes.gained:
                if sym not in leases.held:
                    continue  # lost again meanwhile
                if on_acquire is not None:
                    await on_acquire([sym])
                await c.add_streams(streams_of(sym), take_over=True)
            if changes:
                self.status["symbols"] = sorted(leases.held)

        c.between_batches = between
        self._merge(await leases.tick())
        self.ready = True
        try:
            await c.run()
        finally:
            with contextlib.suppress(Exception):
                await leases.release_all()  # a clean stop hands the symbols over at once

    async def become_active(self) -> bool:
        """Wait as a standby until this replica holds the service's active role.

        Returns False if stop was requested first. Once active, every commit of this
        replica's consumers and producer is fenced by the role's lease, and its Postgres
        sessions carry the role's fencing token (the ledger refuses older tokens).
        """
        active = ActiveLease(self.redis, self.registry, self.settings.lease_ttl_ms)
        self.active = active
        self.status["role"] = "standby"
        logger.info("%s replica %s is standby", self.service.value, self.replica)
        while not self.stop_event.is_set():
            try:
                if await active.try_take():
                    break
            except (OSError, aioredis.ConnectionError, aioredis.TimeoutError) as exc:
                logger.warning("cannot reach redis for the active role (%s)", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop_event.wait(), self.lease_every_s)
        if not active.held:
            return False
        self.status["role"] = "active"
        self.status["fencing_token"] = active.token
        self.producer.fence = active.fence
        for c in self._consumers:
            c.fence = lambda _stream: active.fence()
        if self.pool is not None:
            await db.take_fence(self.pool, self.service.value, active.token)
        return True

    async def is_ready(self) -> bool:
        return self.ready and not self.stop_event.is_set()

    def request_stop(self) -> None:
        if not self.stop_event.is_set():
            logger.info("stop requested; finishing the batch in hand")
        self.stop_event.set()
        for c in self._consumers:
            c.stop()

    def consumer(
        self, streams: Sequence[str], handler: Handler, *, allow_empty: bool = False
    ) -> Consumer:
        """A consumer in this service's group with a stable per-replica name."""
        s = self.settings
        active = self.active
        c = Consumer(
            self.redis,
            group=group(self.service),
            consumer=self.consumer_name,
            streams=streams,
            handler=handler,
            allow_empty=allow_empty,
            fence=(lambda _stream: active.fence()) if active is not None and active.held else None,
            batch_size=s.batch_size,
            block_ms=s.block_ms,
            max_deliveries=s.max_deliveries,
            claim_idle_ms=s.claim_idle_ms,
            claim_interval_s=s.claim_interval_s,
            bounds=s.stream_bounds(),
            max_entry_bytes=s.max_entry_bytes,
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
        key = heartbeat_key(self.service.value, self.replica)
        task = asyncio.current_task()
        while not self.stop_event.is_set():
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
            body = {
                "service": self.service.value,
                "replica": self.replica,
                "pid": os.getpid(),
                "ready": self.ready,
                "metrics_port": self.metrics_port,
                "ts": time.time_ns(),
                "started": self.started_ns,
                "lost_entries": sum(c.lost for c in self._consumers),
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
            await self.redis.delete(heartbeat_key(self.service.value, self.replica))
        with contextlib.suppress(Exception):
            if self.active is not None and self.active.held:
                await self.active.release()
        with contextlib.suppress(Exception):
            if self.replica:
                await self.registry.release()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.pool is not None:
            await self.pool.close()
        await close_quietly(self.redis)
        metrics.UP.labels(self.service.value).set(0)
        logger.info("%s stopped", self.service.value)


#: The exit status a replica asked for (see :data:`EXIT_LEASE_LOST`).
_exit_status: list[int] = [0]


def run_service(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a service's async main; Ctrl-C exits quietly; a lost lease exits non-zero."""
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    if _exit_status[0]:
        sys.exit(_exit_status[0])
