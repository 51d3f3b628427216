"""The archiver's wiring: Redis consumer group in, Parquet files out, acks after the write.

The bus ``Consumer`` acknowledges each batch when its handler returns; the archiver
must hold entries unacknowledged across many reads until their file is durable, so it
runs its own small group reader with the same promises: own pending entries first
(a restart re-reads what it had buffered), XAUTOCLAIM of idle entries, undecodable
entries dead-lettered with their reason, every stream's group created at start.
Entries of kinds that are not archived are acknowledged at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gridstream.common import bus, codec, metrics
from gridstream.common.streams import DEAD_LETTER_MAXLEN, Kind, dead_letters, streams

from . import parquet
from .engine import ArchiveEngine, Batch
from .settings import ArchiverSettings
from .state import record_archived
from .store import Store

log = logging.getLogger("gridstream.archiver")

RawEntry = tuple[str, str, dict[bytes, bytes]]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def archived_streams(symbols: Sequence[str]) -> list[str]:
    """The streams the archiver reads: candles and executions of every symbol."""
    return streams(Kind.CANDLES, list(symbols)) + streams(Kind.EXECUTIONS, list(symbols))


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
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.store = store
        self.group = group
        self.consumer = consumer
        self.streams = list(streams)
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        self.clock = clock
        self.engine = ArchiveEngine(flush_rows=flush_rows, flush_interval_s=flush_interval_s)
        self.dead_letter_stream = dead_letters(group)
        self._pending_mode = True
        self._cursor: dict[str, str] = dict.fromkeys(self.streams, "0")
        self._last_claim = clock()
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
            claim_idle_ms=settings.claim_idle_ms,
            claim_interval_s=settings.claim_interval_s,
        )

    # -- set-up ----------------------------------------------------------------------------
    async def ensure_groups(self) -> None:
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

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
        now = self.clock()
        if now - self._last_claim >= self.claim_interval_s:
            self._last_claim = now
            await self._reclaim()
            await self._update_lag_metrics()
        if self._pending_mode:
            entries = await self._read(pending=True)
            if not entries:
                self._pending_mode = False
        else:
            entries = await self._read(pending=False)
        await self._accept(entries)
        await self.flush_due()
        return len(entries)

    async def _read(self, *, pending: bool) -> list[RawEntry]:
        if pending:
            ids: dict[Any, Any] = dict(self._cursor)
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, ids, count=self.batch_size
            )
        else:
            wait = self.engine.next_due_in(self.clock())
            block = self.block_ms if wait is None else min(self.block_ms, int(wait * 1000))
            ids = dict.fromkeys(self.streams, ">")
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, ids, count=self.batch_size, block=max(block, 1)
            )
        out: list[RawEntry] = []
        if not reply:
            return out
        items: Any = reply.items() if isinstance(reply, dict) else reply
        for stream_raw, entries in items:
            stream = _s(stream_raw)
            if isinstance(entries, list) and entries and isinstance(entries[0], list):
                entries = entries[0]  # RESP3 shape
            if not entries:
                continue
            if pending:
                self._cursor[stream] = _s(entries[-1][0])
            out.extend((stream, _s(eid), fields or {}) for eid, fields in entries)
        return out

    async def _reclaim(self) -> None:
        for stream in self.streams:
            start: bytes | str = "0-0"
            while True:
                reply: Any = await self.redis.xautoclaim(
                    stream,
                    self.group,
                    self.consumer,
                    min_idle_time=self.claim_idle_ms,
                    start_id=start,
                    count=self.batch_size,
                )
                next_start, claimed = reply[0], [(e, f) for e, f in reply[1] if e is not None]
                if claimed:
                    await self._accept([(stream, _s(e), f or {}) for e, f in claimed])
                if _s(next_start) in ("0-0", "0") or not claimed:
                    break
                start = next_start

    async def _accept(self, entries: list[RawEntry]) -> None:
        """Buffer archived messages; ack the rest; dead-letter what does not decode."""
        now = self.clock()
        ack_now: dict[str, list[str]] = {}
        dead: list[tuple[str, str, str, bytes]] = []
        for stream, entry_id, fields in entries:
            payload = fields.get(codec.FIELD)
            if payload is None:
                dead.append((stream, entry_id, "decode: missing field 'm'", b""))
                continue
            try:
                msg = codec.decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                dead.append((stream, entry_id, f"decode: {exc}", payload))
                continue
            metrics.MESSAGES_IN.labels(self.group, stream).inc()
            if self.engine.add(stream, entry_id, msg, now) == "ignored":
                ack_now.setdefault(stream, []).append(entry_id)
        if not ack_now and not dead:
            return
        pipe = self.redis.pipeline(transaction=True)
        for stream, entry_id, reason, payload in dead:
            pipe.xadd(
                self.dead_letter_stream,
                {
                    bus.DLQ_STREAM: stream,
                    bus.DLQ_ENTRY: entry_id,
                    bus.DLQ_REASON: reason[:2000],
                    bus.DLQ_DELIVERIES: "1",
                    bus.DLQ_PAYLOAD: payload,
                },
                maxlen=DEAD_LETTER_MAXLEN,
                approximate=True,
            )
            ack_now.setdefault(stream, []).append(entry_id)
        for stream, ids in ack_now.items():
            pipe.xack(stream, self.group, *ids)
        await pipe.execute()
        for stream, _eid, reason, _p in dead:
            metrics.DEAD_LETTERS.labels(self.group, stream, reason.split(":", 1)[0]).inc()

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
        pipe = self.redis.pipeline(transaction=True)
        for stream, ids in batch.entry_ids().items():
            pipe.xack(stream, self.group, *ids)
        await pipe.execute()
        self.engine.committed(batch)
        for stream in batch.entry_ids():
            upto = self.engine.archived_up_to(stream)
            if upto is not None:
                await record_archived(self.redis, stream, upto)

    async def _update_lag_metrics(self) -> None:
        for stream in self.streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            for info in groups:
                if _s(info["name"]) != self.group:
                    continue
                metrics.CONSUMER_PENDING.labels(self.group, stream).set(info.get("pending") or 0)
                if info.get("lag") is not None:
                    metrics.CONSUMER_LAG.labels(self.group, stream).set(info["lag"])
