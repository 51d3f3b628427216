"""The Redis Streams bus: a bounded batch producer and a consumer-group runner.

Delivery is at-least-once; handlers are idempotent, so effects happen once.
The consumer keeps these promises:

* At start it first re-reads its own pending entries (a restarted replica has a
  stable consumer name and finds them), then reads new ones.
* Entries left idle by a dead replica are taken over with XAUTOCLAIM on a timer.
* An entry that does not decode, or whose handling fails on its N-th delivery,
  is added to the group's dead-letter stream with its reason *before* it is
  acknowledged, so a crash leaves a duplicate, never a loss.
* The handler's outputs, dead letters and the acknowledgement go in one MULTI.
* After a failure in one stream, the rest of that stream's batch is left pending
  and re-read in order, so per-symbol order holds.
* Every XADD is bounded (MAXLEN ~).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, cast

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, ResponseError

from gridstream.common import codec, metrics
from gridstream.common.messages import AnyMessage
from gridstream.common.streams import DEAD_LETTER_MAXLEN, DEFAULT_MAXLEN, PREFIX, dead_letters

log = logging.getLogger("gridstream.bus")

#: Dead-letter entry fields, defined once (``gridstream dlq`` reads them back).
DLQ_STREAM: Final = b"stream"
DLQ_ENTRY: Final = b"entry_id"
DLQ_REASON: Final = b"reason"
DLQ_DELIVERIES: Final = b"deliveries"
DLQ_PAYLOAD: Final = b"payload"


# One server-side script adds every output and dead letter (bounded) and acknowledges the
# inputs. A script runs atomically, like MULTI/EXEC, but costs one command and one reply
# instead of one per entry, which is what makes a Python service loop fast.
#   KEYS:  every stream touched
#   ARGV:  group, maxlen, dead-letter maxlen, n_out, (key_index, payload) * n_out,
#          n_dead, (key_index, stream, entry_id, reason, deliveries, payload) * n_dead,
#          n_ack_streams, (key_index, n_ids, id * n_ids) * n_ack_streams
_COMMIT_LUA: Final = """
local group = ARGV[1]
local maxlen = ARGV[2]
local dlq_maxlen = ARGV[3]
local i = 4
local n_out = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_out do
  redis.call('XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', maxlen, '*', 'm', ARGV[i + 1])
  i = i + 2
end
local n_dead = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_dead do
  redis.call('XADD', KEYS[tonumber(ARGV[i])], 'MAXLEN', '~', dlq_maxlen, '*',
    'stream', ARGV[i + 1], 'entry_id', ARGV[i + 2], 'reason', ARGV[i + 3],
    'deliveries', ARGV[i + 4], 'payload', ARGV[i + 5])
  i = i + 6
end
local n_ack = tonumber(ARGV[i]); i = i + 1
local acked = 0
for _ = 1, n_ack do
  local key = KEYS[tonumber(ARGV[i])]
  local n = tonumber(ARGV[i + 1])
  i = i + 2
  local first = i
  while first < i + n do
    local last = math.min(first + 499, i + n - 1)
    acked = acked + redis.call('XACK', key, group, unpack(ARGV, first, last))
    first = last + 1
  end
  i = i + n
end
return {n_out, n_dead, acked}
"""


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def _pack(parts: list[bytes]) -> bytes:
    """One RESP command from byte-string arguments."""
    out = [b"*%d\r\n" % len(parts)]
    append = out.append
    for p in parts:
        append(b"$%d\r\n%b\r\n" % (len(p), p))
    return b"".join(out)


class CommitScript:
    """The commit script, sent as one pre-packed EVALSHA on a pooled connection.

    redis-py packs each argument through several layers of Python; packing the RESP
    bytes here is several times cheaper for the thousands of arguments of a batch.
    The script is loaded with SCRIPT LOAD on first use and again after NOSCRIPT
    (e.g. a Redis restart).
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.sha = hashlib.sha1(_COMMIT_LUA.encode()).hexdigest().encode()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        head = [b"EVALSHA", self.sha, _b(len(keys))]
        packed = _pack(head + [_b(k) for k in keys] + [_b(a) for a in args])
        try:
            return await self._send(packed)
        except NoScriptError:
            await self.redis.script_load(_COMMIT_LUA)
            return await self._send(packed)

    async def _send(self, packed: bytes) -> Any:
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(packed)
            return await conn.read_response()
        except (ConnectionError, OSError, asyncio.CancelledError):
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)


class _Keys:
    """Assigns 1-based KEYS indexes to stream names for the commit script."""

    __slots__ = ("index", "names")

    def __init__(self) -> None:
        self.names: list[str] = []
        self.index: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        i = self.index.get(name)
        if i is None:
            self.names.append(name)
            i = self.index[name] = len(self.names)
        return i


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded stream entry handed to a handler."""

    stream: str
    entry_id: bytes
    message: AnyMessage
    deliveries: int


#: (stream, message) pairs a handler wants published.
Outgoing = tuple[str, AnyMessage]
Handler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Outgoing]]]


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class Producer:
    """Pipelined, bounded XADD of encoded messages."""

    def __init__(self, redis: aioredis.Redis, *, maxlen: int = DEFAULT_MAXLEN, service: str = ""):
        self.redis = redis
        self.maxlen = maxlen
        self.service = service

        self._commit = CommitScript(redis)

    async def publish(self, items: Iterable[Outgoing]) -> int:
        """Add all items (bounded) in one round trip; returns how many."""
        keys = _Keys()
        args: list[Any] = ["", self.maxlen, DEAD_LETTER_MAXLEN, 0]
        per_stream: dict[str, int] = {}
        encode = codec.encode
        for stream, msg in items:
            args.append(keys(stream))
            args.append(encode(msg))
            per_stream[stream] = per_stream.get(stream, 0) + 1
        n = (len(args) - 4) // 2
        if n:
            args[3] = n
            args.extend((0, 0))
            await self._commit(keys.names, args)
            for stream, count in per_stream.items():
                metrics.MESSAGES_OUT.labels(self.service, stream).inc(count)
        return n


class Consumer:
    """Runs a handler over a set of streams as one member of a consumer group."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        group: str,
        consumer: str,
        streams: Sequence[str],
        handler: Handler,
        batch_size: int = 500,
        block_ms: int = 1000,
        max_deliveries: int = 5,
        claim_idle_ms: int = 60_000,
        claim_interval_s: float = 15.0,
        maxlen: int = DEFAULT_MAXLEN,
        retry_backoff_s: float = 0.2,
    ) -> None:
        if not streams:
            raise ValueError("a consumer needs at least one stream")
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.streams = list(streams)
        self.handler = handler
        self.batch_size = batch_size
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        self.maxlen = maxlen
        self.retry_backoff_s = retry_backoff_s
        self.dead_letter_stream = dead_letters(group)
        self._commit_script = CommitScript(redis)
        # Phase: while True, read own pending history (cursor per stream) before new entries.
        self._pending_mode = True
        self._pending_cursor: dict[str, bytes] = dict.fromkeys(self.streams, b"0")
        self._last_claim = 0.0
        self._stop = asyncio.Event()
        self.processed = 0
        self.dead_lettered = 0

    # -- set-up -------------------------------------------------------------------------
    async def ensure_groups(self, start_id: str = "0") -> None:
        """Create the group on every stream (and the stream itself) if missing."""
        for stream in self.streams:
            try:
                await self.redis.xgroup_create(stream, self.group, id=start_id, mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    def stop(self) -> None:
        """Ask the loop to finish the batch in hand and return."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- main loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Process until :meth:`stop` is called."""
        await self.ensure_groups()
        while not self._stop.is_set():
            try:
                await self.run_once()
            except (ConnectionError, OSError, aioredis.ConnectionError) as exc:
                metrics.RECONNECTS.labels(self.group, "redis").inc()
                log.warning("redis unavailable, retrying: %s", exc)
                await asyncio.sleep(1.0)

    async def run_once(self) -> int:
        """Read and process one batch; returns the number of entries handled."""
        now = time.monotonic()
        if now - self._last_claim >= self.claim_interval_s:
            self._last_claim = now
            claimed = await self.reclaim()
            if claimed:
                return claimed
            await self.update_lag_metrics()
        if self._pending_mode:
            entries = await self._read(pending=True)
            if not entries:
                self._pending_mode = False
                return 0
        else:
            entries = await self._read(pending=False)
        if not entries:
            return 0
        return await self._process(entries)

    # -- reading ----------------------------------------------------------------------------
    async def _read(self, *, pending: bool) -> list[tuple[str, bytes, dict[bytes, bytes], int]]:
        if pending:
            ids: dict[Any, Any] = {s: self._pending_cursor[s] for s in self.streams}
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, ids, count=self.batch_size
            )
        else:
            ids = dict.fromkeys(self.streams, ">")
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, ids, count=self.batch_size, block=self.block_ms
            )
        out: list[tuple[str, bytes, dict[bytes, bytes], int]] = []
        reply = cast(Any, reply)
        if not reply:
            return out
        items: Any = reply.items() if isinstance(reply, dict) else reply
        for stream_raw, entries in items:
            stream = _s(stream_raw)
            if isinstance(entries, list) and entries and isinstance(entries[0], list):
                entries = entries[0]  # RESP3 shape
            if not entries:
                continue
            counts: dict[bytes, int] = {}
            if pending:
                self._pending_cursor[stream] = entries[-1][0]
                counts = await self._delivery_counts(stream, entries[0][0], entries[-1][0])
            for entry_id, fields in entries:
                out.append((stream, entry_id, fields or {}, counts.get(entry_id, 1)))
        return out

    async def _delivery_counts(self, stream: str, first: bytes, last: bytes) -> dict[bytes, int]:
        rows: Any = await self.redis.xpending_range(
            stream,
            self.group,
            min=first,
            max=last,
            count=self.batch_size,
            consumername=self.consumer,
        )
        return {row["message_id"]: int(row["times_delivered"]) for row in rows}

    async def reclaim(self) -> int:
        """Take over entries idle longer than ``claim_idle_ms`` (dead replicas); process them."""
        total = 0
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
                next_start, claimed = reply[0], reply[1]
                claimed = [(eid, f) for eid, f in claimed if eid is not None]
                if claimed:
                    counts = await self._delivery_counts(stream, claimed[0][0], claimed[-1][0])
                    entries = [(stream, eid, f or {}, counts.get(eid, 2)) for eid, f in claimed]
                    log.info("reclaimed %d idle entries from %s", len(entries), stream)
                    total += await self._process(entries)
                if _s(next_start) in ("0-0", "0") or not claimed:
                    break
                start = next_start
        return total

    async def update_lag_metrics(self) -> None:
        """Publish lag and pending counts of this group on every stream."""
        for stream in self.streams:
            try:
                groups = await self.redis.xinfo_groups(stream)
            except ResponseError:
                continue
            for info in groups:
                if _s(info["name"]) != self.group:
                    continue
                metrics.CONSUMER_PENDING.labels(self.group, stream).set(info.get("pending") or 0)
                lag = info.get("lag")
                if lag is not None:
                    metrics.CONSUMER_LAG.labels(self.group, stream).set(lag)

    # -- processing ---------------------------------------------------------------------------
    async def _process(self, entries: list[tuple[str, bytes, dict[bytes, bytes], int]]) -> int:
        deliveries: list[Delivery] = []
        dead: list[tuple[str, bytes, str, int, bytes]] = []
        per_stream_in: dict[str, int] = {}
        decode = codec.decode
        field = codec.FIELD
        for stream, entry_id, fields, count in entries:
            payload = fields.get(field)
            if payload is None:
                dead.append((stream, entry_id, "decode: missing field 'm'", count, b""))
                continue
            try:
                msg = decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                dead.append((stream, entry_id, f"decode: {exc}", count, payload))
                continue
            deliveries.append(Delivery(stream, entry_id, msg, count))
            per_stream_in[stream] = per_stream_in.get(stream, 0) + 1
        for stream, n_in in per_stream_in.items():
            metrics.MESSAGES_IN.labels(self.group, stream).inc(n_in)

        outputs: list[Outgoing] = []
        done: list[Delivery] = []
        started = time.perf_counter()
        if deliveries:
            try:
                outputs.extend(await self.handler(deliveries))
                done = deliveries
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("batch of %d failed; isolating entries", len(deliveries), exc_info=True)
                outputs, done, failed_dead = await self._process_one_by_one(deliveries)
                dead.extend(failed_dead)
        if deliveries:
            metrics.HANDLER_LATENCY.labels(self.group).observe(time.perf_counter() - started)
        await self._commit(outputs, done, dead)
        self.processed += len(done)
        return len(done) + len(dead)

    async def _process_one_by_one(
        self, deliveries: list[Delivery]
    ) -> tuple[list[Outgoing], list[Delivery], list[tuple[str, bytes, str, int, bytes]]]:
        outputs: list[Outgoing] = []
        done: list[Delivery] = []
        dead: list[tuple[str, bytes, str, int, bytes]] = []
        blocked: set[str] = set()
        for d in deliveries:
            if d.stream in blocked:
                continue  # keep per-stream order: re-read after the failed entry
            try:
                outputs.extend(await self.handler([d]))
                done.append(d)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"handler: {type(exc).__name__}: {exc}"
                if d.deliveries >= self.max_deliveries:
                    log.error(
                        "dead-lettering %s %s after %d deliveries: %s",
                        d.stream,
                        _s(d.entry_id),
                        d.deliveries,
                        reason,
                    )
                    dead.append(
                        (d.stream, d.entry_id, reason, d.deliveries, codec.encode(d.message))
                    )
                else:
                    log.warning(
                        "entry %s %s failed (delivery %d of %d): %s",
                        d.stream,
                        _s(d.entry_id),
                        d.deliveries,
                        self.max_deliveries,
                        reason,
                    )
                    blocked.add(d.stream)
        if blocked:
            # Go back to our pending history for the blocked streams, after a short pause.
            for stream in blocked:
                self._pending_cursor[stream] = b"0"
            self._pending_mode = True
            await asyncio.sleep(self.retry_backoff_s)
        return outputs, done, dead

    async def _commit(
        self,
        outputs: Sequence[Outgoing],
        done: Sequence[Delivery],
        dead: Sequence[tuple[str, bytes, str, int, bytes]],
    ) -> None:
        if not outputs and not done and not dead:
            return
        keys = _Keys()
        encode = codec.encode
        args: list[Any] = [self.group, self.maxlen, DEAD_LETTER_MAXLEN, len(outputs)]
        per_stream_out: dict[str, int] = {}
        for stream, msg in outputs:
            args.append(keys(stream))
            args.append(encode(msg))
            per_stream_out[stream] = per_stream_out.get(stream, 0) + 1
        args.append(len(dead))
        acks: dict[str, list[bytes]] = {}
        if dead:
            dlq = keys(self.dead_letter_stream)
            for stream, entry_id, reason, count, payload in dead:
                args.extend((dlq, stream, entry_id, reason[:2000], count, payload))
                acks.setdefault(stream, []).append(entry_id)
        for d in done:
            acks.setdefault(d.stream, []).append(d.entry_id)
        args.append(len(acks))
        for stream, ids in acks.items():
            args.append(keys(stream))
            args.append(len(ids))
            args.extend(ids)
        await self._commit_script(keys.names, args)
        for stream, count in per_stream_out.items():
            metrics.MESSAGES_OUT.labels(self.group, stream).inc(count)
        for stream, _eid, reason, _c, _p in dead:
            metrics.DEAD_LETTERS.labels(self.group, stream, reason.split(":", 1)[0]).inc()
        self.dead_lettered += len(dead)


async def replay_dead_letters(
    redis: aioredis.Redis, group: str, *, limit: int = 1000, delete: bool = True
) -> int:
    """Re-add dead letters of ``group`` to their source streams (after a fix); returns count.

    Only entries that came from a gridstream stream and whose payload decodes are
    replayed; the rest (raw exchange frames, garbage) stay in the dead-letter stream.
    """
    dlq = dead_letters(group)
    entries: Any = await redis.xrange(dlq, count=limit)
    n = 0
    for entry_id, fields in entries:
        payload = fields.get(DLQ_PAYLOAD)
        stream = _s(fields.get(DLQ_STREAM) or b"")
        if not payload or not stream.startswith(f"{PREFIX}:"):
            continue
        try:
            codec.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        pipe = redis.pipeline(transaction=True)
        pipe.xadd(stream, {codec.FIELD: payload}, maxlen=DEFAULT_MAXLEN, approximate=True)
        if delete:
            pipe.xdel(dlq, entry_id)
        await pipe.execute()
        n += 1
    return n


async def close_quietly(redis: aioredis.Redis) -> None:
    """Close a client, ignoring errors at shutdown."""
    with contextlib.suppress(Exception):
        await redis.aclose()
