"""The Redis Streams bus: a bounded batch producer and a consumer-group runner.

Delivery is at-least-once; handlers are idempotent, so effects happen once. The consumer
keeps these promises (docs/architecture.md, "Delivery"):

* **Streams are independent.** Each stream has its own state: reading its own pending
  history, reading new entries, or waiting (with its own back-off) on an entry that
  failed or must be retried later. A stream that waits blocks only itself; the others
  are read at full speed.
* **Per-stream order holds.** After a failure, a stream is re-read from the start of
  its own pending history, one entry at a time, so nothing overtakes the failing head.
  Entries reclaimed from another consumer join the pending history, in id order.
* **Delivery counts are exact.** Every handler call sees entries that Redis delivered
  for that call (a new read, or an XCLAIM of an own pending entry), so the count an
  entry carries is the number of times a handler saw it. A batch that fails is not
  retried in memory: its streams are re-read, entry by entry.
* **Dead letters lose nothing.** An entry that does not decode, is of the wrong kind
  for its stream, is larger than ``max_entry_bytes`` (by reference: id and size, not a
  copy), or whose handling fails on its N-th delivery is added to the group's
  dead-letter stream *before* it is acknowledged, in the same script.
* **Trimmed entries are recorded as lost** (metric, log line), never as empty dead
  letters.
* **Reclaim walks the whole pending list**, a bounded number of XAUTOCLAIM pages per
  timer tick, its cursor carried from tick to tick.
* The handler's outputs, dead letters and acknowledgements go in one script, which can
  first check that this replica still holds the leases of the streams (a fencing check).

Acknowledgement is ``ack="auto"`` by default: a batch is acknowledged when its handler
returns. With ``ack="manual"`` handled entries are *held* (delivered, left pending)
until the service calls :meth:`Consumer.ack` or :meth:`Consumer.dead_letter`;
:meth:`Consumer.ack_with_batch` acknowledges entries in the batch's own commit. Held
entries are never handed to the handler again while the consumer runs; after a crash
they are (the consumer name is stable). On every claim tick a manual consumer touches its
own pending entries (XCLAIM JUSTID, no delivery counted), so another replica's XAUTOCLAIM
takes them only once this one has been dead for ``claim_idle_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import string
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import asyncpg
import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gridstream.common import codec, metrics
from gridstream.common.db import is_fenced_out
from gridstream.common.messages import ALL_KINDS, AnyMessage
from gridstream.common.streams import (
    ACCEPTS,
    CONSUMERS,
    DEAD_LETTER_KIND,
    DEFAULT_BOUNDS,
    DEFAULT_MAX_ENTRY_BYTES,
    PREFIX,
    dead_letters,
    kind_of,
)
from gridstream.common.streams import (
    group as group_of,
)

log = logging.getLogger("gridstream.bus")

#: Dead-letter entry fields, defined once (``gridstream dlq`` reads them back).
DLQ_STREAM: Final = b"stream"
DLQ_ENTRY: Final = b"entry_id"
DLQ_REASON: Final = b"reason"
DLQ_DELIVERIES: Final = b"deliveries"
DLQ_PAYLOAD: Final = b"payload"
#: Size in bytes of the dead entry's payload (its payload field is then empty when the
#: entry was dead-lettered by reference, for being larger than the limit).
DLQ_SIZE: Final = b"size"
#: Field of an entry meant for one group only (a replayed dead letter): every other group
#: acknowledges it without handling it.
TARGET_GROUP: Final = b"g"

#: Longest reason text kept in a dead letter.
REASON_LIMIT: Final = 2000


def _lua(template: str) -> str:
    """A script with the field names above filled in (``$FIELD``, ``$DLQ_STREAM``, ...)."""
    names = {
        "FIELD": codec.FIELD,
        "DLQ_STREAM": DLQ_STREAM,
        "DLQ_ENTRY": DLQ_ENTRY,
        "DLQ_REASON": DLQ_REASON,
        "DLQ_DELIVERIES": DLQ_DELIVERIES,
        "DLQ_PAYLOAD": DLQ_PAYLOAD,
        "DLQ_SIZE": DLQ_SIZE,
    }
    return string.Template(template).substitute({k: f"'{v.decode()}'" for k, v in names.items()})


# One server-side script checks the fences, adds every output and dead letter (bounded
# per stream) and acknowledges the inputs. A script runs atomically, like MULTI/EXEC,
# but costs one command and one reply instead of one per entry, which is what makes a
# Python service loop fast.
#   KEYS:  every stream touched, and the lease keys checked
#   ARGV:  group, n_keys, maxlen * n_keys (0: not trimmed),
#          n_fence, (key_index, expected value) * n_fence,
#          n_out, (key_index, payload) * n_out,
#          n_dead, (key_index, stream, entry_id, reason, deliveries, payload, size) * n_dead,
#          n_ack_streams, (key_index, n_ids, id * n_ids) * n_ack_streams
#   Reply: {n_out, n_dead, n_acked}, or {-1, key index} when a fence does not hold (then
#          nothing was written).
_COMMIT_LUA: Final = _lua("""
local group = ARGV[1]
local n_keys = tonumber(ARGV[2])
local i = 3
local maxlen = {}
for k = 1, n_keys do maxlen[k] = ARGV[i]; i = i + 1 end
local n_fence = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_fence do
  local k = tonumber(ARGV[i])
  if redis.call('GET', KEYS[k]) ~= ARGV[i + 1] then return {-1, k} end
  i = i + 2
end
local n_out = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_out do
  local k = tonumber(ARGV[i])
  if maxlen[k] == '0' then
    redis.call('XADD', KEYS[k], '*', $FIELD, ARGV[i + 1])
  else
    redis.call('XADD', KEYS[k], 'MAXLEN', '~', maxlen[k], '*', $FIELD, ARGV[i + 1])
  end
  i = i + 2
end
local n_dead = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_dead do
  local k = tonumber(ARGV[i])
  redis.call('XADD', KEYS[k], 'MAXLEN', '~', maxlen[k], '*',
    $DLQ_STREAM, ARGV[i + 1], $DLQ_ENTRY, ARGV[i + 2], $DLQ_REASON, ARGV[i + 3],
    $DLQ_DELIVERIES, ARGV[i + 4], $DLQ_PAYLOAD, ARGV[i + 5], $DLQ_SIZE, ARGV[i + 6])
  i = i + 7
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
""")


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


# Safe trim: remove entries older than the retention point, but never one that a group
# of the stream still needs (its oldest pending entry, or the first it has not been
# delivered). Read and trim in one atomic script, so no group moves in between.
#   KEYS: stream   ARGV: retention point (an entry id)   Reply: entries trimmed
_TRIM_LUA: Final = """
local function parse(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  if ms == nil then return nil end
  return {tonumber(ms), tonumber(seq)}
end
local function less(a, b)
  return a[1] < b[1] or (a[1] == b[1] and a[2] < b[2])
end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local target = parse(ARGV[1])
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
for _, g in ipairs(groups) do
  local info = {}
  for j = 1, #g, 2 do info[g[j]] = g[j + 1] end
  local need = parse(info['last-delivered-id'])
  need = {need[1], need[2] + 1}
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    local oldest = parse(summary[2])
    if less(oldest, need) then need = oldest end
  end
  if less(need, target) then target = need end
end
local id = string.format('%d-%d', target[1], target[2])
return redis.call('XTRIM', KEYS[1], 'MINID', id)
"""

# XAUTOCLAIM ... JUSTID with its whole reply (the client library keeps only the ids,
# dropping the cursor and the ids of deleted entries).
#   KEYS: stream   ARGV: group, consumer, min idle ms, start id, count
#   Reply: {next start, claimed ids, deleted ids}
_AUTOCLAIM_LUA: Final = """
return redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
  'COUNT', ARGV[5], 'JUSTID')
"""

#: How a consumer acknowledges: when the handler returns, or when the service says so.
AckMode = Literal["auto", "manual"]


def _b(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return str(value).encode()


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


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

    source: Final = _COMMIT_LUA

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.sha = hashlib.sha1(_COMMIT_LUA.encode()).hexdigest().encode()

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        head = [b"EVALSHA", self.sha, _b(len(keys))]
        packed = _pack(
            head + [k.encode() for k in keys] + [a if type(a) is bytes else _b(a) for a in args]
        )
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
        except (ConnectionError, OSError, asyncio.CancelledError, RedisTimeoutError):
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)


class _Keys:
    """Assigns 1-based KEYS indexes to key names for the commit script."""

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


class EntryTooLarge(ValueError):
    """A message encodes to more bytes than the entry size limit allows."""


class WrongKind(ValueError):
    """A message of a kind the stream does not carry (e.g. a Tick on a candle stream)."""


class LeaseLost(Exception):
    """A fence of the commit did not hold: another replica owns the lease now."""

    def __init__(self, key: str) -> None:
        super().__init__(f"lease {key} is no longer held by this replica")
        self.key = key


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

#: Errors of Redis itself while reading or committing (the loop waits and goes on).
REDIS_ERRORS: Final[tuple[type[BaseException], ...]] = (
    ConnectionError,
    OSError,
    RedisConnectionError,
    RedisTimeoutError,
)

#: Why a commit may not have happened: the batch is then read again.
_UNCOMMITTED: Final[tuple[type[BaseException], ...]] = (LeaseLost, *REDIS_ERRORS)

#: Longest pause between retries of a stream blocked by a failure.
MAX_RETRY_BACKOFF_S: Final = 10.0


@dataclass(frozen=True, slots=True)
class Delivery:
    """One decoded stream entry handed to a handler.

    ``deliveries`` is the number of times a handler has been given this entry, this
    time included (Redis' delivery count).
    """

    stream: str
    entry_id: bytes
    message: AnyMessage
    deliveries: int


#: (stream, message) pairs a handler wants published.
Outgoing = tuple[str, AnyMessage]
Handler = Callable[[Sequence[Delivery]], Awaitable[Sequence[Outgoing]]]
#: The lease a stream's commits must hold: (lease key, value it must have), or None.
Fence = Callable[[str], tuple[str, str] | None]

_encode: Final = codec.encode
_TAG_OF: Final[dict[type, str]] = {cls: cast(str, cls.__struct_config__.tag) for cls in ALL_KINDS}
_TYPES_OF_TAG: Final[dict[str, type]] = {tag: cls for cls, tag in _TAG_OF.items()}


class _Checks:
    """Per-stream bounds and accepted message types, computed once per stream name."""

    def __init__(self, bounds: Mapping[str, int] | None, max_entry_bytes: int) -> None:
        self.bounds = {str(k): int(v) for k, v in (bounds or DEFAULT_BOUNDS).items()}
        self.max_entry_bytes = max_entry_bytes
        self._maxlen: dict[str, int] = {}
        self._accepts: dict[str, frozenset[type] | None] = {}

    def maxlen(self, stream: str) -> int:
        n = self._maxlen.get(stream)
        if n is None:
            kind = kind_of(stream)
            n = self.bounds.get(kind or "", 0) or max(self.bounds.values(), default=0)
            self._maxlen[stream] = n
        return n

    def accepts(self, stream: str) -> frozenset[type] | None:
        """The message types the stream carries (None: any, e.g. a stream of a test)."""
        try:
            return self._accepts[stream]
        except KeyError:
            pass
        kind = kind_of(stream)
        tags = ACCEPTS.get(kind) if kind is not None else None  # type: ignore[call-overload]
        types = frozenset(_TYPES_OF_TAG[t] for t in tags) if tags is not None else None
        self._accepts[stream] = types
        return types

    def encode(self, stream: str, msg: AnyMessage) -> bytes:
        """The message's wire form, or :class:`WrongKind` / :class:`EntryTooLarge`."""
        try:
            accepted = self._accepts[stream]
        except KeyError:
            accepted = self.accepts(stream)
        if accepted is not None and type(msg) not in accepted:
            raise WrongKind(f"{_TAG_OF.get(type(msg), type(msg).__name__)} on {stream}")
        payload = _encode(msg)
        if len(payload) > self.max_entry_bytes:
            raise EntryTooLarge(
                f"{_TAG_OF.get(type(msg), '?')} {msg.id} for {stream} is {len(payload)} bytes"
                f" (limit {self.max_entry_bytes})"
            )
        return payload


class Producer:
    """Pipelined, bounded XADD of encoded messages.

    Every message is checked against its stream (kind and size) before anything is
    sent; the first stream a producer writes also gets its durable consumer groups
    (:data:`~gridstream.common.streams.CONSUMERS`), so entries written before a
    consumer first starts are kept for it.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        bounds: Mapping[str, int] | None = None,
        maxlen: int | None = None,
        service: str = "",
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        create_groups: bool = True,
    ):
        self.redis = redis
        if maxlen is not None:
            bounds = dict.fromkeys((*DEFAULT_BOUNDS,), maxlen)
        self.checks = _Checks(bounds, max_entry_bytes)
        self.service = service
        self.create_groups = create_groups
        #: The lease every publish must still hold (the active role), or None.
        self.fence: Callable[[], tuple[str, str]] | None = None
        self._known: set[str] = set()
        self._commit = CommitScript(redis)

    @property
    def max_entry_bytes(self) -> int:
        return self.checks.max_entry_bytes

    def maxlen(self, stream: str) -> int:
        return self.checks.maxlen(stream)

    async def publish(self, items: Iterable[Outgoing]) -> int:
        """Add all items (bounded) in one round trip; returns how many.

        Raises :class:`WrongKind` or :class:`EntryTooLarge` (nothing is added then).
        """
        keys = _Keys()
        body: list[Any] = []
        per_stream: dict[str, int] = {}
        encode = self.checks.encode
        for stream, msg in items:
            body.append(keys(stream))
            body.append(encode(stream, msg))
            per_stream[stream] = per_stream.get(stream, 0) + 1
        n = len(body) // 2
        if not n:
            return 0
        if self.create_groups:
            fresh = [s for s in per_stream if s not in self._known]
            await ensure_consumer_groups(self.redis, fresh)
            self._known.update(per_stream)
        fences: list[Any] = []
        if self.fence is not None:
            lease, value = self.fence()
            fences = [keys(lease), value]
        maxlens = [self.maxlen(k) for k in keys.names]
        args: list[Any] = ["", len(keys.names), *maxlens, len(fences) // 2, *fences, n]
        args.extend(body)
        args.extend((0, 0))
        reply = await self._commit(keys.names, args)
        if reply and int(reply[0]) == -1:
            raise LeaseLost(keys.names[int(reply[1]) - 1])
        for stream, count in per_stream.items():
            metrics.MESSAGES_OUT.labels(self.service, stream).inc(count)
        return n


def group_behind(stream_last_id: bytes | str, group: Mapping[str, Any]) -> bool:
    """Whether a consumer group (an ``XINFO GROUPS`` entry) has entries of its stream
    undelivered or unacknowledged. By its last-delivered id against the stream's last id
    (``XINFO STREAM``'s ``last-generated-id``), not by ``lag``: Redis reports the lag as
    unknown (NULL) once entries were trimmed or deleted."""
    return _s(group["last-delivered-id"]) != _s(stream_last_id) or int(group["pending"]) > 0


async def ensure_consumer_groups(redis: aioredis.Redis, names: Iterable[str]) -> None:
    """Create each stream's durable consumer groups (at its start) if they are missing."""
    for name in names:
        kind = kind_of(name)
        if kind is None or kind == DEAD_LETTER_KIND:
            continue
        for service in CONSUMERS.get(kind, ()):  # type: ignore[call-overload]
            try:
                await redis.xgroup_create(name, group_of(service), id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise


#: A dead letter: (stream, entry id, reason, deliveries, raw payload, payload size).
_Dead = tuple[str, bytes, str, int, bytes, int]
#: A raw entry read from Redis: (stream, entry id, fields, deliveries).
_Raw = tuple[str, bytes, dict[bytes, bytes], int]


@dataclass(slots=True)
class _Stream:
    """What the consumer knows of one of its streams."""

    name: str
    #: True while its own pending history (from ``cursor``) is read before new entries.
    history: bool = True
    cursor: bytes = b"0"
    #: True after a failure, until its pending history is read: the stream is read on its
    #: own, ``probe_size`` entries at a time (1 after a failure, doubling on success up to
    #: the batch size), so a failing entry is found alone and the rest flows.
    probe: bool = False
    probe_size: int = 1
    #: Entries of a failed multi-entry call still to be retried alone (no growth till 0).
    singles: int = 0
    #: Monotonic time before which the stream is not read (back-off after a failure).
    ready_at: float = 0.0
    backoff: float = 0.0
    #: XAUTOCLAIM cursor, carried from one claim tick to the next.
    claim_cursor: str = "0-0"
    #: True once reclaim has walked the group's whole pending list of the stream: until
    #: then no new entry of it is read, so idle entries of a dead replica come first.
    walked: bool = False

    def reread(self) -> None:
        self.history = True
        self.cursor = b"0"


class Consumer:
    """Runs a handler over a set of streams as one member of a consumer group.

    ``ack="auto"`` (the default) acknowledges each batch with the handler's outputs.
    ``ack="manual"`` holds handled entries until :meth:`ack` or :meth:`dead_letter`.
    ``fence`` names, per stream, the lease a commit must still hold (see
    :mod:`gridstream.common.lease`).
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
        claim_pages: int = 8,
        bounds: Mapping[str, int] | None = None,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        retry_backoff_s: float = 0.2,
        ack: AckMode = "auto",
        transient: tuple[type[BaseException], ...] = (),
        fence: Fence | None = None,
        allow_empty: bool = False,
    ) -> None:
        if not streams and not allow_empty:
            raise ValueError("a consumer needs at least one stream")
        if ack not in ("auto", "manual"):
            raise ValueError(f"ack must be 'auto' or 'manual', not {ack!r}")
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.handler = handler
        self.batch_size = batch_size
        #: How long a read of new entries blocks; a service may lower it between calls.
        self.block_ms = block_ms
        self.max_deliveries = max_deliveries
        self.claim_idle_ms = claim_idle_ms
        self.claim_interval_s = claim_interval_s
        #: Most XAUTOCLAIM calls per claim tick (each scans a bounded part of the list).
        self.claim_pages = max(1, claim_pages)
        self.checks = _Checks(bounds, max_entry_bytes)
        self.retry_backoff_s = retry_backoff_s
        self.transient = TRANSIENT_ERRORS + tuple(transient)
        self.fence = fence
        self.manual = ack == "manual"
        self.dead_letter_stream = dead_letters(group)
        self._target = group.encode()
        self._commit_script = CommitScript(redis)
        self._touch_script = redis.register_script(_TOUCH_LUA)
        self._autoclaim_script = redis.register_script(_AUTOCLAIM_LUA)
        self._state: dict[str, _Stream] = {}
        for name in streams:
            self._state[name] = _Stream(name, backoff=retry_backoff_s)
        # Manual mode: entries handled and not yet acknowledged, per stream.
        self._held: dict[str, set[bytes]] = {}
        # Manual mode: entries to acknowledge with the next commit (ack_with_batch).
        self._batch_acks: list[tuple[str, bytes]] = []
        self._last_claim = 0.0
        self._claim_order: list[str] = []
        self._stop = asyncio.Event()
        #: Awaited at the top of every pass: where a lease holder adds or removes streams.
        self.between_batches: Callable[[], Awaitable[None]] | None = None
        #: Called with the lease key when a commit's fence failed.
        self.on_lease_lost: Callable[[str], None] | None = None
        self.processed = 0
        self.dead_lettered = 0
        self.lost = 0

    # -- streams ----------------------------------------------------------------------------
    @property
    def streams(self) -> list[str]:
        return list(self._state)

    @property
    def max_entry_bytes(self) -> int:
        return self.checks.max_entry_bytes

    @property
    def reading_history(self) -> bool:
        """True while some stream is still re-reading its own pending entries."""
        return any(s.history for s in self._state.values())

    def blocked(self) -> list[str]:
        """Streams waiting on a failed or postponed entry."""
        return [s.name for s in self._state.values() if s.probe]

    async def add_streams(self, names: Iterable[str], *, take_over: bool = False) -> None:
        """Start reading more streams (their own pending history first).

        ``take_over``: first claim every pending entry of the group on them, whoever
        holds it (the caller owns these streams now, e.g. through a lease), so the
        previous owner's unfinished entries come first, in order.
        """
        new = [n for n in names if n not in self._state]
        if not new:
            return
        await self._ensure(new)
        if take_over:
            for name in new:
                await self._claim_all(name)
        for name in new:
            self._state[name] = _Stream(name, backoff=self.retry_backoff_s, walked=take_over)

    def remove_streams(self, names: Iterable[str]) -> None:
        """Stop reading streams (between batches). Held entries of them stay pending."""
        for name in names:
            self._state.pop(name, None)
            self._held.pop(name, None)
            metrics.STREAM_BLOCKED.labels(self.group, name).set(0)
        self._batch_acks = [(s, e) for s, e in self._batch_acks if s in self._state]

    async def _claim_all(self, name: str) -> int:
        start = "0-0"
        total = 0
        while True:
            start, claimed = await self._autoclaim(name, 0, start, 1000)
            total += len(claimed)
            if start == "0-0":
                return total

    async def _autoclaim(
        self, name: str, min_idle_ms: int, start: str, count: int
    ) -> tuple[str, list[bytes]]:
        """One XAUTOCLAIM JUSTID page: (next cursor, claimed ids); deleted ids are lost."""
        reply: Any = await self._autoclaim_script(
            keys=[name], args=[self.group, self.consumer, min_idle_ms, start, count]
        )
        if len(reply) > 2 and reply[2]:
            self._record_lost(name, list(reply[2]))
        cursor = _s(reply[0])
        return ("0-0" if cursor in ("0-0", "0") else cursor), list(reply[1])

    # -- set-up -------------------------------------------------------------------------
    async def ensure_groups(self, start_id: str = "0") -> None:
        """Create the group on every stream (and the stream itself) if missing."""
        await self._ensure(self.streams, start_id)

    async def _ensure(self, names: Iterable[str], start_id: str = "0") -> None:
        for stream in names:
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
        encoded = [(s, self.checks.encode(s, m)) for s, m in outputs]
        reply = await self._commit(encoded, (), pairs)
        self._release(pairs)
        return int(reply[2]) if reply else 0

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Add a held entry to the dead-letter stream and acknowledge it, atomically."""
        payload = codec.encode(delivery.message)
        dead = (
            delivery.stream,
            delivery.entry_id,
            reason,
            delivery.deliveries,
            payload,
            len(payload),
        )
        await self._commit((), [dead], [(delivery.stream, delivery.entry_id)])
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
            except LeaseLost:
                continue  # its streams are dropped at the top of the next pass
            except REDIS_ERRORS as exc:
                metrics.RECONNECTS.labels(self.group, "redis").inc()
                log.warning("redis unavailable, retrying: %s", exc)
                await self._sleep(1.0)

    async def run_once(self) -> int:
        """Read and process one batch; returns the number of entries handled."""
        if self.between_batches is not None:
            await self.between_batches()
        now = time.monotonic()
        unwalked = any(not s.walked for s in self._state.values())
        if now - self._last_claim >= self.claim_interval_s:
            self._last_claim = now
            if self.manual:
                await self.touch_own()
            await self.reclaim()
            await self.update_lag_metrics()
        elif unwalked:
            await self.reclaim()  # the first walk goes on at every pass until done
        ready = [s for s in self._state.values() if s.ready_at <= now]
        history = [s for s in ready if s.history]
        if history:
            n = await self._run_history(history)
            if n or any(s.history for s in history):
                return n
            # their own history turned out empty: read new entries in this same pass
        live = [s for s in ready if not s.history and s.walked]
        waiting = [s.ready_at for s in self._state.values() if s.ready_at > now]
        wake_ms = int((min(waiting) - now) * 1000) + 1 if waiting else None
        if not live and any(not s.walked for s in self._state.values()):
            return 0  # the first reclaim walk is not finished: go on with it
        if not live:
            # Every stream waits: sleep until the first one may be retried.
            delay = self.block_ms if wake_ms is None else min(self.block_ms, wake_ms)
            await self._sleep(delay / 1000)
            return 0
        block = self.block_ms if wake_ms is None else max(1, min(self.block_ms, wake_ms))
        entries = await self._read_new(live, block)
        if not entries:
            return 0
        return await self._process(entries)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(seconds, 0.0))

    async def _run_history(self, history: list[_Stream]) -> int:
        bulk = [s for s in history if not s.probe]
        probes = [s for s in history if s.probe]
        total = 0
        for st in probes:  # each stream that failed is read and handled on its own
            entries = await self._read_history(st, st.probe_size)
            if entries and st.name in self._state:
                total += await self._process(entries)
        entries = []
        for st in bulk:
            entries.extend(await self._read_history(st, self.batch_size))
        if entries:
            total += await self._process(entries)
        return total

    # -- reading ----------------------------------------------------------------------------
    async def _read_new(self, live: list[_Stream], block: int) -> list[_Raw]:
        ids: dict[Any, Any] = {s.name: ">" for s in live}
        reply: Any = await self.redis.xreadgroup(
            self.group, self.consumer, ids, count=self.batch_size, block=block
        )
        out: list[_Raw] = []
        if not reply:
            return out
        items = reply.items() if isinstance(reply, dict) else reply
        for stream_raw, entries in items:
            stream = _s(stream_raw)
            if isinstance(entries, list) and entries and isinstance(entries[0], list):
                entries = entries[0]  # RESP3 shape
            for entry_id, fields in entries or ():
                out.append((stream, entry_id, fields or {}, 1))
        return out

    async def _read_history(self, st: _Stream, count: int) -> list[_Raw]:
        """Up to ``count`` own pending entries of one stream after its cursor, in order.

        XPENDING gives the ids and delivery counts, XCLAIM (to ourselves) delivers them
        once more, counted; held entries are skipped without being delivered. Entries
        that XCLAIM does not return were trimmed away: they are recorded as lost.
        """
        held = self._held.get(st.name) or set()
        while True:
            start = "-" if st.cursor == b"0" else "(" + _s(st.cursor)
            rows: Any = await self.redis.xpending_range(
                st.name,
                self.group,
                min=start,
                max="+",
                count=count + min(len(held), 1000),
                consumername=self.consumer,
            )
            if not rows:
                st.history = False  # own history is read: new entries from now on
                st.cursor = b"0"
                st.probe = False
                self._unblock(st)
                return []
            picked: dict[bytes, int] = {}
            for row in rows:
                if row["message_id"] in held:
                    continue
                picked[row["message_id"]] = int(row["times_delivered"])
                if len(picked) >= count:
                    break
            ids = list(picked)  # XPENDING lists in id order
            st.cursor = ids[-1] if len(ids) >= count else rows[-1]["message_id"]
            if not ids:
                continue  # a page of held entries only: read on
            claimed: Any = await self.redis.xclaim(
                st.name, self.group, self.consumer, 0, cast(list[Any], ids)
            )
            got = {eid: fields for eid, fields in claimed if eid is not None and fields}
            gone = [eid for eid in ids if eid not in got]
            if gone:
                self._record_lost(st.name, gone)
            out = [(st.name, eid, got[eid], picked[eid] + 1) for eid in ids if eid in got]
            if out:
                return out

    def _record_lost(self, stream: str, ids: Sequence[bytes | str]) -> None:
        """Pending entries whose stream entry is gone (trimmed) before they were handled."""
        self.lost += len(ids)
        metrics.LOST_ENTRIES.labels(self.group, stream).inc(len(ids))
        shown = ", ".join(_s(i) for i in ids[:20])
        more = f" (+{len(ids) - 20} more)" if len(ids) > 20 else ""
        log.error(
            "lost %d pending entries of %s for group %s (trimmed before handled): %s%s",
            len(ids),
            stream,
            self.group,
            shown,
            more,
        )

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
        """Take over entries idle longer than ``claim_idle_ms`` (dead replicas).

        At most ``claim_pages`` XAUTOCLAIM calls per tick, over the streams in turn, each
        stream's cursor carried to the next tick, so the whole pending list is walked
        however long it is. Claimed entries (JUSTID: no delivery counted) join this
        consumer's pending history, which the stream then re-reads in id order before
        anything new: nothing overtakes an older entry. Returns how many were claimed.
        """
        if not self._claim_order:
            self._claim_order = self.streams
        total = 0
        pages = 0
        while pages < self.claim_pages and self._claim_order:
            name = self._claim_order[0]
            st = self._state.get(name)
            if st is None:
                self._claim_order.pop(0)
                continue
            cursor, claimed = await self._autoclaim(
                name, self.claim_idle_ms, st.claim_cursor, self.batch_size
            )
            pages += 1
            if claimed:
                held = self._held.get(name) or set()
                fresh = [eid for eid in claimed if eid not in held]
                if fresh:
                    log.info("claimed %d idle entries of %s", len(fresh), name)
                    total += len(fresh)
                    st.reread()
            st.claim_cursor = cursor
            if cursor == "0-0":
                st.walked = True
                self._claim_order.pop(0)  # this stream's list is walked; next stream
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
        skipped: list[tuple[str, bytes]] = []
        per_stream_in: dict[str, int] = {}
        decode = codec.decode
        field = codec.FIELD
        limit = self.checks.max_entry_bytes
        accepts = self.checks.accepts
        for stream, entry_id, fields, count in entries:
            if len(fields) > 1:  # a replayed dead letter carries its target group
                target = fields.get(TARGET_GROUP)
                if target is not None and target != self._target:
                    skipped.append((stream, entry_id))  # replayed for another group
                    continue
            payload = fields.get(field)
            if payload is None:
                dead.append((stream, entry_id, "decode: no message field", count, b"", 0))
                continue
            if len(payload) > limit:
                reason = f"size: {len(payload)} bytes > limit {limit}"
                dead.append((stream, entry_id, reason, count, b"", len(payload)))
                continue
            try:
                msg = decode(payload)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                dead.append((stream, entry_id, f"decode: {exc}", count, payload, len(payload)))
                continue
            accepted = accepts(stream)
            if accepted is not None and type(msg) not in accepted:
                reason = f"kind: {_TAG_OF.get(type(msg), '?')} does not belong on {stream}"
                dead.append((stream, entry_id, reason, count, payload, len(payload)))
                continue
            deliveries.append(Delivery(stream, entry_id, msg, count))
            per_stream_in[stream] = per_stream_in.get(stream, 0) + 1
        for stream, n_in in per_stream_in.items():
            metrics.MESSAGES_IN.labels(self.group, stream).inc(n_in)

        encoded: list[tuple[str, bytes]] = []
        done: list[Delivery] = []
        failed: BaseException | None = None
        started = time.perf_counter()
        if deliveries:
            try:
                outputs = await self.handler(deliveries)
                encode = self.checks.encode
                encoded = [(s, encode(s, m)) for s, m in outputs]
                done = deliveries
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if is_fenced_out(exc):
                    raise  # another replica is active now: this one must stop
                failed = exc
            metrics.HANDLER_LATENCY.labels(self.group).observe(time.perf_counter() - started)
        if failed is not None:
            # Nothing of the failed streams is committed: they are read again from their
            # pending history (their dead letters and skips too, in their order).
            failing = {d.stream for d in deliveries}
            dead = [x for x in dead if x[0] not in failing]
            skipped = [x for x in skipped if x[0] not in failing]
            dead.extend(self._failed(deliveries, failed))
        acks_now = [*skipped, *((x[0], x[1]) for x in dead)]
        if self.manual:  # handled entries are held, but for those handed back
            acks_now.extend(self._batch_acks)
            self._batch_acks = []
        else:
            acks_now.extend((d.stream, d.entry_id) for d in done)
        try:
            await self._commit(encoded, dead, acks_now)
        except _UNCOMMITTED:
            # Nothing of the batch is committed: read it again from the pending history
            # (a stream whose lease is lost is dropped before the next read).
            for name in {e[0] for e in entries}:
                state = self._state.get(name)
                if state is not None:
                    state.reread()
            raise
        if self.manual:
            acked = set(acks_now)
            for d in done:
                if (d.stream, d.entry_id) not in acked:
                    self._held.setdefault(d.stream, set()).add(d.entry_id)
            self._release(acks_now)
        for name in {d.stream for d in done}:
            st = self._state.get(name)
            if st is not None and st.probe:
                if st.singles > 0:
                    st.singles -= 1
                else:
                    st.probe_size = min(st.probe_size * 2, self.batch_size)
                if st.ready_at:
                    self._unblock(st)
        self.processed += len(done)
        return len(done) + len(dead) + len(skipped)

    def _unblock(self, st: _Stream) -> None:
        """An entry of the stream succeeded: no more waiting (it stays one entry at a time
        until its pending history is read)."""
        st.backoff = self.retry_backoff_s
        st.ready_at = 0.0
        metrics.STREAM_BLOCKED.labels(self.group, st.name).set(0)

    def _failed(self, deliveries: list[Delivery], exc: BaseException) -> list[_Dead]:
        """Decide what a failed handler call means for each of its streams.

        A call over several entries says nothing about which one failed. Over several
        streams: each stream re-reads its part of the call on its own, at once. Over one
        stream: it re-reads its entries one at a time, each once alone, then in doubling
        steps (see :attr:`_Stream.probe`). A call over
        one entry blames that entry: a transient failure waits (the stream's back-off
        grows, nothing is dead-lettered); any other failure dead-letters it on its
        ``max_deliveries``-th delivery, else waits for its retry.
        """
        transient = isinstance(exc, self.transient)
        kind = "not handled" if transient else "failed"
        if len(deliveries) > 1:
            log.warning(
                "batch of %d %s (%s: %s); isolating its streams",
                len(deliveries),
                kind,
                type(exc).__name__,
                exc,
                exc_info=not transient,
            )
            per_stream: dict[str, int] = {}
            for d in deliveries:
                per_stream[d.stream] = per_stream.get(d.stream, 0) + 1
            several = len(per_stream) > 1
            for name, n in per_stream.items():
                st = self._state.get(name)
                if st is not None:
                    st.reread()
                    st.probe = True
                    if several:  # first find the stream: each re-reads its part alone
                        st.probe_size = n
                        st.singles = 0
                    else:  # then the entry: each of them once alone
                        st.probe_size = 1
                        st.singles = n
                    metrics.STREAM_BLOCKED.labels(self.group, name).set(1)
            return []
        d = deliveries[0]
        st = self._state.get(d.stream)
        reason = f"handler: {type(exc).__name__}: {exc}"
        if not transient and d.deliveries >= self.max_deliveries:
            log.error(
                "dead-lettering %s %s after %d deliveries: %s",
                d.stream,
                _s(d.entry_id),
                d.deliveries,
                reason,
                exc_info=exc,
            )
            payload = codec.encode(d.message)
            if st is not None:
                st.reread()  # the next entries of the stream are probed in turn
            return [(d.stream, d.entry_id, reason, d.deliveries, payload, len(payload))]
        if st is not None:
            st.reread()
            st.probe = True
            st.probe_size = 1
            st.ready_at = time.monotonic() + st.backoff
            log.warning(
                "entry %s %s %s (delivery %d%s): %s; stream waits %.1fs",
                d.stream,
                _s(d.entry_id),
                kind,
                d.deliveries,
                "" if transient else f" of {self.max_deliveries}",
                reason,
                st.backoff,
                exc_info=exc if not transient else None,
            )
            st.backoff = min(max(st.backoff * 2, self.retry_backoff_s, 0.05), MAX_RETRY_BACKOFF_S)
            metrics.STREAM_BLOCKED.labels(self.group, d.stream).set(1)
        return []

    async def _commit(
        self,
        outputs: Sequence[tuple[str, bytes]],
        dead: Sequence[_Dead],
        acks: Sequence[tuple[str, bytes]],
    ) -> Any:
        if not outputs and not dead and not acks:
            return None
        keys = _Keys()
        body: list[Any] = [len(outputs)]
        per_stream_out: dict[str, int] = {}
        for stream, payload in outputs:
            body.append(keys(stream))
            body.append(payload)
            per_stream_out[stream] = per_stream_out.get(stream, 0) + 1
        body.append(len(dead))
        if dead:
            dlq = keys(self.dead_letter_stream)
            for stream, entry_id, reason, count, payload, size in dead:
                body.extend((dlq, stream, entry_id, reason[:REASON_LIMIT], count, payload, size))
        by_stream: dict[str, list[bytes]] = {}
        for stream, entry_id in acks:
            by_stream.setdefault(stream, []).append(entry_id)
        body.append(len(by_stream))
        for stream, ids in by_stream.items():
            body.append(keys(stream))
            body.append(len(ids))
            body.extend(ids)
        fences: list[Any] = []
        if self.fence is not None:
            seen: set[str] = set()
            for stream in (*by_stream, *per_stream_out):
                f = self.fence(stream)
                if f is not None and f[0] not in seen:
                    seen.add(f[0])
                    fences.extend((keys(f[0]), f[1]))
        maxlens = [self.checks.maxlen(k) for k in keys.names]
        args: list[Any] = [self.group, len(keys.names), *maxlens, len(fences) // 2, *fences]
        args.extend(body)
        reply = await self._commit_script(keys.names, args)
        if reply and int(reply[0]) == -1:
            key = keys.names[int(reply[1]) - 1]
            log.warning("commit refused: %s is held by another replica now", key)
            if self.on_lease_lost is not None:
                self.on_lease_lost(key)
            raise LeaseLost(key)
        for stream, count in per_stream_out.items():
            metrics.MESSAGES_OUT.labels(self.group, stream).inc(count)
        for stream, _eid, reason, _c, _p, _n in dead:
            metrics.DEAD_LETTERS.labels(self.group, stream, reason.split(":", 1)[0]).inc()
        self.dead_lettered += len(dead)
        return reply


async def add_dead_letters(
    redis: aioredis.Redis,
    group: str,
    letters: Sequence[tuple[str, str, bytes]],
    *,
    maxlen: int = DEFAULT_BOUNDS[DEAD_LETTER_KIND],
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
                DLQ_REASON: reason[:REASON_LIMIT],
                DLQ_DELIVERIES: b"1",
                DLQ_PAYLOAD: payload,
                DLQ_SIZE: str(len(payload)),
            },
            maxlen=maxlen,
            approximate=True,
        )
    await pipe.execute()
    for source, reason, _ in letters:
        metrics.DEAD_LETTERS.labels(group, source, reason.split(":", 1)[0]).inc()
    return len(letters)


async def replay_dead_letters(
    redis: aioredis.Redis,
    group: str,
    *,
    limit: int = 1000,
    delete: bool = True,
    bounds: Mapping[str, int] | None = None,
) -> int:
    """Put dead letters of ``group`` back on their source streams, for ``group`` only.

    Each replayed entry carries the target group (:data:`TARGET_GROUP`): every other
    group on the stream acknowledges it without handling it, so a fix for one service
    does not make the others see the message twice. Only entries that came from a
    gridstream stream and whose payload decodes are replayed; the rest (raw exchange
    frames, entries dead-lettered by reference) stay in the dead-letter stream.
    """
    checks = _Checks(bounds, DEFAULT_MAX_ENTRY_BYTES)
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
        pipe.xadd(
            stream,
            {codec.FIELD: payload, TARGET_GROUP: group},
            maxlen=checks.maxlen(stream),
            approximate=True,
        )
        if delete:
            pipe.xdel(dlq, entry_id)
        await pipe.execute()
        n += 1
    return n


async def trim_safely(redis: aioredis.Redis, stream: str, retention_ms: int, now_ms: int) -> int:
    """Trim entries older than ``retention_ms`` that every group of the stream has handled.

    Never removes an entry a group still needs (pending, or not yet delivered), so
    trimming loses history, never state. Returns how many entries were removed.
    """
    point = f"{max(now_ms - retention_ms, 0)}-0"
    n = int(await redis.eval(_TRIM_LUA, 1, stream, point))
    return n


async def close_quietly(redis: aioredis.Redis) -> None:
    """Close a client, ignoring errors at shutdown."""
    with contextlib.suppress(Exception):
        await redis.aclose()
