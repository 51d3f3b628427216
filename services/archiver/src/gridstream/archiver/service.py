"""The archiver's wiring: Redis consumer group in, Parquet files out, acks after the write.

It reads with the bus ``Consumer`` in manual-ack mode: each handled entry is *held*
(delivered, left pending) until the Parquet file holding it is durable, and only then
acknowledged. The consumer keeps the bus's promises: own pending entries first (a
restart re-reads what was buffered), XAUTOCLAIM of a dead replica's entries (a live
replica's held entries are kept fresh), undecodable entries dead-lettered with their
reason, every stream's group created at start. Entries of kinds that are not archived
are acknowledged in the commit of the batch that read them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis

from gridstream.common import bus, metrics
from gridstream.common.streams import CONSUMERS, Service, streams

from . import parquet
from .engine import ArchiveEngine, Batch
from .settings import ArchiverSettings
from .state import record_archived
from .store import Store

log = logging.getLogger("gridstream.archiver")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def archived_streams(symbols: Sequence[str]) -> list[str]:
    """The streams the archiver reads: ticks, candles and executions of every symbol.

    Every kind of stream that :data:`~gridstream.common.streams.CONSUMERS` gives the
    archiver, so nothing of them is trimmed before it is archived.
    """
    kinds = [k for k, groups in CONSUMERS.items() if Service.ARCHIVER in groups]
    return [name for kind in kinds for name in streams(kind, list(symbols))]


class Archiver:
    """One archiver replica: reads its group, buffers in the engine, writes, then acks."""

    def __init__(
        self,
        redis: aioredis.Redis,
        store: Store,
        *,
        group: str,
        consumer: str,
        streams: Sequence[str],
        flush_rows: int,
        flush_interval_s: float,
        batch_size: int = 500,
        block_ms: int = 1000,
        max_deliveries: int = 5,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.store = store
        self.group = group
        self.block_ms = block_ms
        self.clock = clock
        self.engine = ArchiveEngine(flush_rows=flush_rows, flush_interval_s=flush_interval_s)
        self.consumer = bus.Consumer(
            redis,
            group=group,
            consumer=consumer,
            streams=streams,
            handler=self._handle,
            batch_size=batch_size,
            block_ms=block_ms,
            max_deliveries=max_deliveries,
            claim_idle_ms=claim_idle_ms,
            claim_interval_s=claim_interval_s,
            ack="manual",
        )
        self.files_written = 0

    @classmethod
    def from_settings(
        cls,
        redis: aioredis.Redis,
        store: Store,
        settings: ArchiverSettings,
        *,
        group: str,
        consumer: str,
    ) -> Archiver:
        return cls(
            redis,
            store,
            group=group,
            consumer=consumer,
            streams=archived_streams(settings.symbols),
            flush_rows=settings.flush_rows,
            flush_interval_s=settings.flush_interval_s,
            batch_size=settings.batch_size,
            block_ms=settings.block_ms,
            max_deliveries=settings.max_deliveries,
            claim_idle_ms=settings.claim_idle_ms,
            claim_interval_s=settings.claim_interval_s,
        )

    @property
    def streams(self) -> list[str]:
        return self.consumer.streams

    # -- set-up ----------------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        await self.consumer.ensure_groups()

    # -- loop ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Process until ``stop`` is set, then flush every buffer (acks follow the writes)."""
        await self.ensure_groups()
        try:
            while not stop.is_set():
                try:
                    await self.poll_once()
                except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                    metrics.RECONNECTS.labels(self.group, "redis").inc()
                    log.warning("redis or disk unavailable, retrying: %s", exc)
                    await asyncio.sleep(1.0)
        finally:
            await self.flush_all()

    async def poll_once(self) -> int:
        """Read one batch (own pending first, then new), buffer it, flush what is due."""
        wait = self.engine.next_due_in(self.clock())
        block = self.block_ms if wait is None else min(self.block_ms, int(wait * 1000))
        self.consumer.block_ms = max(block, 1)
        n = await self.consumer.run_once()
        await self.flush_due()
        return n

    async def _handle(self, batch: Sequence[bus.Delivery]) -> list[bus.Outgoing]:
        """Buffer archived messages (held until written); the rest is acknowledged now."""
        now = self.clock()
        ignored = [
            d
            for d in batch
            if self.engine.add(d.stream, _s(d.entry_id), d.message, now) == "ignored"
        ]
        self.consumer.ack_with_batch(ignored)
        return []

    # -- flushing --------------------------------------------------------------------------
    async def flush_due(self) -> int:
        return await self._flush(self.engine.due(self.clock()))

    async def flush_all(self) -> int:
        """Write every buffer now (at shutdown); returns the number of files written."""
        try:
            return await self._flush(self.engine.pending_keys())
        except Exception:
            log.exception("final flush failed; the entries stay pending and come back on restart")
            return 0

    async def _flush(self, keys: Sequence[Any]) -> int:
        written = 0
        for key in keys:
            batch = self.engine.peek(key)
            started = time.perf_counter()
            await asyncio.to_thread(self._write, batch)
            await self._ack(batch)
            metrics.HANDLER_LATENCY.labels(self.group).observe(time.perf_counter() - started)
            written += 1
        return written

    def _write(self, batch: Batch) -> None:
        """Parquet file, then its sha256 sidecar; both atomic and durable when this returns."""
        key = batch.object_key()
        data = parquet.to_parquet_bytes(batch.items)
        self.store.put(key, data)
        self.store.put(f"{key}.sha256", parquet.sha256_sidecar(data, key.rsplit("/", 1)[-1]))
        self.files_written += 1
        log.info(
            "archived %d %s rows of %s %s -> %s",
            len(batch.items),
            batch.key.kind.value,
            batch.key.symbol,
            batch.key.date,
            key,
        )

    async def _ack(self, batch: Batch) -> None:
        await self.consumer.ack(
            (stream, entry_id) for stream, ids in batch.entry_ids().items() for entry_id in ids
        )
        self.engine.committed(batch)
        for stream in batch.entry_ids():
            upto = self.engine.archived_up_to(stream)
            if upto is not None:
                await record_archived(self.redis, stream, upto)
