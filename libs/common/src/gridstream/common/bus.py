"""The Redis Streams bus: a bounded batch producer and a consumer-group runner.

Delivery is at-least-once; handlers are idempotent, so effects happen once.
The consumer keeps these promises:

* At start it first re-reads its own pending entries (a restarted replica has a
  stable consumer name and finds them), then reads new ones.
* Entries left idle by a dead replica are taken over with XAUTOCLAIM on a timer.
* An entry that does not decode, or whose handling fails on its N-th delivery,
  is added to the group's dead-letter stream with its reason *before* it is
  acknowledged, so a crash leaves a duplicate, never a loss.
* The handler's outputs, dead letters and the acknowledgement go in one script.
* After a failure in one stream, the rest of that stream's batch is left pending
  and re-read in order, so per-symbol order holds.
* Every XADD is bounded (MAXLEN ~).

Acknowledgement is ``ack="auto"`` by default: a batch is acknowledged when its handler
returns. With ``ack="manual"`` the handled entries are *held* (delivered, left pending)
until the service calls :meth:`Consumer.ack` (e.g. once a file holding them is durable)
or :meth:`Consumer.dead_letter`; a handler can also hand back entries it does not want
to hold with :meth:`Consumer.ack_with_batch`, acknowledged in the batch's own commit.
Held entries are never re-read as own pending while the consumer runs; after a crash
they are (the consumer name is stable). On every claim tick the consumer first touches
its own pending entries (XCLAIM JUSTID, no delivery counted), so a live replica's held
entries never look idle to another replica; a dead one's are claimed after
``claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

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


# Manual-ack mode: reset the idle time of every entry this consumer owns on one stream
# (XCLAIM ... JUSTID does not count a delivery), so that another replica's XAUTOCLAIM
# does not take entries a live replica holds. Ownership is read and the claim made in
# one atomic script, so an entry another replica already took is never taken back.
#   KEYS: stream   ARGV: group, consumer, page size
_TOUCH_LUA: Final = """
local group = ARGV[1]
local consumer = ARGV[2]
local page = tonumber(ARGV[3])
local start = '-'
local touched = 0
while true do
  local rows = redis.call('XPENDING', KEYS[1], group, start, '+', page, consumer)
  if #rows == 0 then break end
  local args = {'XCLAIM', KEYS[1], group, consumer, 0}
  for j = 1, #rows do args[#args + 1] = rows[j][1] end
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
  touched = touched + #rows
  if #rows < page then break end
  start = '(' .. rows[#rows][1]
end
return touched
"""

#: How a consumer acknowledges: when the handler returns, or when the service says so.
AckMode = Literal["auto", "manual"]


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


class RetryLater(Exception):
    """Raised by a handler when an entry cannot be handled *now* for a reason outside the
    entry itself (a dependency is down, a venue rate limit, an outcome still unknown).

    Such failures are retried with a growing back-off and never dead-lettered: only a
    failure of the entry itself counts toward ``max_deliveries``.
    """


#: Exceptions that mean "a dependency failed", not "this entry is bad".
TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    RetryLater,
    ConnectionError,
    TimeoutError,
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
)

#: Longest pause between retries of a stream blocked by a transient failure.
MAX_RETRY_BACKOFF_S: Final = 10.0


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


#: A dead letter: (stream, entry id, reason, deliveries, raw payload).
_Dead = tuple[str, bytes, str, int, bytes]
#: A raw entry read from Redis: (stream, entry id, fields, deliveries).
_Raw = tuple[str, bytes, dict[bytes, bytes], int]


class Consumer:
    """Runs a handler over a set of streams as one member of a consumer group.

    ``ack="auto"`` (the default) acknowledges each batch with the handler's outputs.
    ``ack="manual"`` holds handled entries until :meth:`ack` or :meth:`dead_letter`.
    """

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
        ack: AckMode = "auto",
        transient: tuple[type[BaseException], ...] = (),
    ) -> None:
        if not streams:
            raise ValueError("a consumer needs at least one stream")
        if ack not in ("auto", "manual"):
            raise ValueError(f"ack must be 'auto' or 'manual', not {ack!r}")
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.streams = list(streams)
        self.handler = handler
        self.batch_size = batch_size
        #: How long a read of new entries blocks; a service may lower it between calls.
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        self.maxlen = maxlen
        self.retry_backoff_s = retry_backoff_s
        self.transient = TRANSIENT_ERRORS + tuple(transient)
        # Streams blocked by a failure are probed one entry at a time (so only the failing
        # head entry's delivery count grows) until an entry of theirs succeeds.
        self._probe: set[str] = set()
        self._backoff = retry_backoff_s
        self.manual = ack == "manual"
        self.dead_letter_stream = dead_letters(group)
        self._commit_script = CommitScript(redis)
        self._touch_script = redis.register_script(_TOUCH_LUA)
        # Phase: while True, read own pending history (cursor per stream still being read)
        # before new entries.
        self._pending_mode = True
        self._pending_cursor: dict[str, bytes] = dict.fromkeys(self.streams, b"0")
        # Manual mode: entries handled and not yet acknowledged, per stream.
        self._held: dict[str, set[bytes]] = {}
        # Manual mode: entries to acknowledge with the next commit (ack_with_batch).
        self._batch_acks: list[tuple[str, bytes]] = []
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

    # -- manual acknowledgement -----------------------------------------------------------
    @property
    def held(self) -> int:
        """How many handled entries wait for :meth:`ack` (manual mode)."""
        return sum(len(ids) for ids in self._held.values())

    def is_held(self, stream: str, entry_id: bytes | str) -> bool:
        return _b(entry_id) in self._held.get(stream, ())

    def ack_with_batch(self, deliveries: Iterable[Delivery]) -> None:
        """Manual mode: acknowledge these entries in the commit of the batch in hand.

        For entries a handler does not want to hold (e.g. kinds it ignores): they go
        in the same script as the batch's outputs, at no extra round trip. In auto
        mode every handled entry is acknowledged with its batch anyway.
        """
        if self.manual:
            self._batch_acks.extend((d.stream, d.entry_id) for d in deliveries)

    async def ack(
        self,
        entries: Iterable[Delivery | tuple[str, bytes | str]],
        outputs: Sequence[Outgoing] = (),
    ) -> int:
        """Manual mode: acknowledge held entries (with optional outputs, atomically).

        Returns the number of entries Redis acknowledged.
        """
        pairs = [
            (e.stream, e.entry_id) if isinstance(e, Delivery) else (e[0], _b(e[1])) for e in entries
        ]
        if not pairs and not outputs:
            return 0
        reply = await self._commit(outputs, (), (), pairs)
        self._release(pairs)
        return int(reply[2]) if reply else 0

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Add a held entry to the dead-letter stream and acknowledge it, atomically."""
        dead = (
            delivery.stream,
            delivery.entry_id,
            reason,
            delivery.deliveries,
            codec.encode(delivery.message),
        )
        await self._commit((), (), [dead])
        self._release([(delivery.stream, delivery.entry_id)])

    def _release(self, pairs: Iterable[tuple[str, bytes]]) -> None:
        for stream, entry_id in pairs:
            held = self._held.get(stream)
            if held is not None:
                held.discard(entry_id)
                if not held:
                    del self._held[stream]

    # -- main loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Process until :meth:`stop` is called."""
        await self.ensure_groups()
        task = asyncio.current_task()
        while not self._stop.is_set():
            # A cancellation swallowed on the way (Python 3.11's wait_for/timeout races with
            # a cancel arriving as the awaited operation completes) must still end the loop.
            if task is not None and task.cancelling():
                raise asyncio.CancelledError
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
            if self.manual:
                await self.touch_own()
            claimed = await self.reclaim()
            if claimed:
                return claimed
            await self.update_lag_metrics()
        if self._pending_mode:
            entries = await self._read(pending=True)
            if not self._pending_cursor:
                self._pending_mode = False
        else:
            entries = await self._read(pending=False)
        if not entries:
            return 0
        return await self._process(entries)

    # -- reading ----------------------------------------------------------------------------
    async def _read(self, *, pending: bool) -> list[_Raw]:
        out: list[_Raw] = []
        while True:
            if pending:
                if not self._pending_cursor:
                    return out
                ids: dict[Any, Any] = dict(self._pending_cursor)
                count = 1 if self._probe else self.batch_size
                reply = await self.redis.xreadgroup(self.group, self.consumer, ids, count=count)
            else:
                ids = dict.fromkeys(self.streams, ">")
                reply = await self.redis.xreadgroup(
                    self.group, self.consumer, ids, count=self.batch_size, block=self.block_ms
                )
            reply = cast(Any, reply)
            items: Any = (reply.items() if isinstance(reply, dict) else reply) if reply else ()
            still_pending: set[str] = set()
            for stream_raw, entries in items:
                stream = _s(stream_raw)
                if isinstance(entries, list) and entries and isinstance(entries[0], list):
                    entries = entries[0]  # RESP3 shape
                if not entries:
                    continue
                counts: dict[bytes, int] = {}
                held: set[bytes] | None = None
                if pending:
                    still_pending.add(stream)
                    self._pending_cursor[stream] = entries[-1][0]
                    held = self._held.get(stream)
                    counts = await self._delivery_counts(stream, entries[0][0], entries[-1][0])
                if held:  # manual mode: held entries were handled; they are no retry
                    entries = [e for e in entries if e[0] not in held]
                for entry_id, fields in entries:
                    out.append((stream, entry_id, fields or {}, counts.get(entry_id, 1)))
            if not pending:
                return out
            for stream in [s for s in self._pending_cursor if s not in still_pending]:
                del self._pending_cursor[stream]  # this stream's own history is read
            if out or not still_pending:
                return out
            # a page of held entries only: read on (the cursor moved past them)

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

    async def touch_own(self) -> int:
        """Reset the idle time of every entry this consumer owns (no delivery counted).

        Manual mode runs it on every claim tick, before XAUTOCLAIM: entries a live
        replica holds never reach ``claim_idle_ms``, so only a dead replica's are taken.
        """
        total = 0
        for stream in self.streams:
            total += int(
                await self._touch_script(
                    keys=[stream], args=[self.group, self.consumer, min(self.batch_size, 1000)]
                )
            )
        return total

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
                held = self._held.get(stream)
                if held:
                    claimed = [(eid, f) for eid, f in claimed if eid not in held]
                if claimed:
                    counts = await self._delivery_counts(stream, claimed[0][0], claimed[-1][0])
                    entries = [(stream, eid, f or {}, counts.get(eid, 2)) for eid, f in claimed]
                    log.info("reclaimed %d idle entries from %s", len(entries), stream)
                    total += await self._process(entries)
                if _s(next_start) in ("0-0", "0") or not reply[1]:
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
    async def _process(self, entries: list[_Raw]) -> int:
        deliveries: list[Delivery] = []
        dead: list[_Dead] = []
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
            except self.transient as exc:
                # A dependency failed: nothing in the batch is at fault. Keep it pending and
                # probe each stream again after a growing pause.
                log.warning(
                    "batch of %d not handled (%s: %s); retrying in %.1fs",
                    len(deliveries),
                    type(exc).__name__,
                    exc,
                    self._backoff,
                )
                self._block({d.stream for d in deliveries})
                await self._pause()
            except Exception:
                log.warning("batch of %d failed; isolating entries", len(deliveries), exc_info=True)
                outputs, done, failed_dead = await self._process_one_by_one(deliveries)
                dead.extend(failed_dead)
        if done:
            self._probe.difference_update(d.stream for d in done)
            if not self._probe:
                self._backoff = self.retry_backoff_s
        if deliveries:
            metrics.HANDLER_LATENCY.labels(self.group).observe(time.perf_counter() - started)
        try:
            if self.manual:
                acks, self._batch_acks = self._batch_acks, []
                await self._commit(outputs, (), dead, acks)
                acked = set(acks)
                for d in done:
                    if (d.stream, d.entry_id) not in acked:
                        self._held.setdefault(d.stream, set()).add(d.entry_id)
                self._release(acks)
            else:
                await self._commit(outputs, done, dead)
        except (ConnectionError, OSError, aioredis.ConnectionError):
            # Nothing of the batch is committed: read it again from the pending history.
            self._reread(d.stream for d in done)
            raise
        self.processed += len(done)
        return len(done) + len(dead)

    def _reread(self, streams: Iterable[str]) -> None:
        for stream in set(streams):
            self._pending_cursor[stream] = b"0"
            self._pending_mode = True

    async def _process_one_by_one(
        self, deliveries: list[Delivery]
    ) -> tuple[list[Outgoing], list[Delivery], list[_Dead]]:
        outputs: list[Outgoing] = []
        done: list[Delivery] = []
        dead: list[_Dead] = []
        blocked: set[str] = set()
        for d in deliveries:
            if d.stream in blocked:
                continue  # keep per-stream order: re-read after the failed entry
            try:
                outputs.extend(await self.handler([d]))
                done.append(d)
            except asyncio.CancelledError:
                raise
            except self.transient as exc:
                log.warning(
                    "entry %s %s not handled (%s: %s); will retry",
                    d.stream,
                    _s(d.entry_id),
                    type(exc).__name__,
                    exc,
                )
                blocked.add(d.stream)
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
            # Go back to our pending history for the blocked streams, after a pause.
            self._block(blocked)
            await self._pause()
        return outputs, done, dead

    def _block(self, streams: set[str]) -> None:
        """Re-read these streams from their pending history, one entry at a time."""
        self._reread(streams)
        self._probe.update(streams)

    async def _pause(self) -> None:
        delay = self._backoff
        self._backoff = min(self._backoff * 2, MAX_RETRY_BACKOFF_S)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)

    async def _commit(
        self,
        outputs: Sequence[Outgoing],
        done: Sequence[Delivery],
        dead: Sequence[_Dead],
        extra_acks: Sequence[tuple[str, bytes]] = (),
    ) -> Any:
        if not outputs and not done and not dead and not extra_acks:
            return None
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
        for stream, entry_id in extra_acks:
            acks.setdefault(stream, []).append(entry_id)
        args.append(len(acks))
        for stream, ids in acks.items():
            args.append(keys(stream))
            args.append(len(ids))
            args.extend(ids)
        reply = await self._commit_script(keys.names, args)
        for stream, count in per_stream_out.items():
            metrics.MESSAGES_OUT.labels(self.group, stream).inc(count)
        for stream, _eid, reason, _c, _p in dead:
            metrics.DEAD_LETTERS.labels(self.group, stream, reason.split(":", 1)[0]).inc()
        self.dead_lettered += len(dead)
        return reply


async def add_dead_letters(
    redis: aioredis.Redis, group: str, letters: Sequence[tuple[str, str, bytes]]
) -> int:
    """Dead-letter input that never was a stream entry (e.g. a malformed exchange frame).

    ``letters`` are ``(source, reason, raw payload)``; the entries have the same fields as
    the consumer's own dead letters (no entry id, one delivery) and are counted likewise.
    """
    if not letters:
        return 0
    pipe = redis.pipeline(transaction=False)
    for source, reason, payload in letters:
        pipe.xadd(
            dead_letters(group),
            {
                DLQ_STREAM: source,
                DLQ_ENTRY: b"",
                DLQ_REASON: reason[:2000],
                DLQ_DELIVERIES: b"1",
                DLQ_PAYLOAD: payload,
            },
            maxlen=DEAD_LETTER_MAXLEN,
            approximate=True,
        )
    await pipe.execute()
    for source, reason, _ in letters:
        metrics.DEAD_LETTERS.labels(group, source, reason.split(":", 1)[0]).inc()
    return len(letters)


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
