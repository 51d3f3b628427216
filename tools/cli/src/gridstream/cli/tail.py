"""``gridstream tail`` and ``gridstream dlq``: stream entries as one JSON line each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis

from gridstream.common import bus, codec
from gridstream.common.streams import dead_letters

from .common import s

_json = msgspec.json.Encoder()


def _decode(payload: bytes | None) -> tuple[msgspec.Raw | None, str | None]:
    if not payload:
        return None, "no payload"
    try:
        return msgspec.Raw(codec.to_json(codec.decode(payload))), None
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        return None, f"decode: {exc}"


def format_entry(stream: str, entry_id: bytes | str, fields: dict[bytes, bytes]) -> bytes:
    """One entry as one JSON line: ``{"stream", "entry_id", "message"}``.

    A dead-letter entry also has ``dead_letter`` (source stream, entry id, reason,
    deliveries, the payload's ``size`` in bytes, and ``by_reference``: true when the
    entry was too large to copy and only its id and size were kept); an entry that does
    not decode has ``error`` and ``message: null``.
    """
    out: dict[str, Any] = {"stream": stream, "entry_id": s(entry_id)}
    if bus.DLQ_REASON in fields:
        out["dead_letter"] = {
            "stream": s(fields.get(bus.DLQ_STREAM)),
            "entry_id": s(fields.get(bus.DLQ_ENTRY)),
            "reason": s(fields.get(bus.DLQ_REASON)),
            "deliveries": int(fields.get(bus.DLQ_DELIVERIES) or 0),
        }
        payload = fields.get(bus.DLQ_PAYLOAD)
        size = int(fields.get(bus.DLQ_SIZE) or 0)
        out["dead_letter"]["size"] = size
        out["dead_letter"]["by_reference"] = not payload and size > 0
    else:
        payload = fields.get(codec.FIELD)
    message, error = _decode(payload)
    out["message"] = message
    if error is not None:
        out["error"] = error
    return _json.encode(out)


async def tail(
    redis: aioredis.Redis,
    stream: str,
    write: Callable[[bytes], None],
    *,
    from_id: str | None = None,
    last: int | None = None,
    follow: bool = False,
    block_ms: int = 1000,
    stop: Callable[[], bool] = lambda: False,
    following: Callable[[str], None] | None = None,
) -> int:
    """Write entries of ``stream`` (from an id, or the last N), then follow if asked.

    ``following`` is told the id after which new entries will be printed, once the
    cursor is fixed: every entry added after that call is printed.
    """
    count = 0
    cursor: Any
    entries: Any
    if from_id is not None:
        entries = await redis.xrange(stream, min=from_id)
    else:
        n = 10 if last is None else last
        entries = list(reversed(await redis.xrevrange(stream, count=n) or [])) if n > 0 else []
    for entry_id, fields in entries:
        write(format_entry(stream, entry_id, fields))
        count += 1
    if not follow:
        return count
    if entries:
        cursor = entries[-1][0]
    else:
        newest: Any = await redis.xrevrange(stream, count=1)
        cursor = newest[0][0] if newest else "0-0"
    if following is not None:
        following(s(cursor))
    while not stop():
        reply: Any = await redis.xread({stream: cursor}, block=block_ms, count=500)
        if not reply:
            continue
        items = reply.items() if isinstance(reply, dict) else reply
        for _name, got in items:
            if got and isinstance(got[0], list) and got[0] and isinstance(got[0][0], list):
                got = got[0]  # RESP3 shape
            for entry_id, fields in got:
                write(format_entry(stream, entry_id, fields))
                cursor = entry_id
                count += 1
    return count


async def dlq_list(redis: aioredis.Redis, group: str, write: Callable[[bytes], None]) -> int:
    """Every dead letter of ``group``, oldest first."""
    stream = dead_letters(group)
    count = 0
    entries: Any = await redis.xrange(stream)
    for entry_id, fields in entries:
        write(format_entry(stream, entry_id, fields))
        count += 1
    return count


async def dlq_replay(redis: aioredis.Redis, group: str, *, limit: int) -> int:
    """Move dead letters back to their source streams."""
    return await bus.replay_dead_letters(redis, group, limit=limit)
