"""The archived-up-to watermark per stream, kept in Redis for the (later) trimmer.

One hash, field = stream name, value = the entry id up to which (inclusive) the
stream's entries are durably archived. The value only ever moves forward (a Lua
script compares entry ids), so a late or replayed flush never moves it back.
Nothing is trimmed here: trimming market-data streams is a later step.
"""

from __future__ import annotations

from typing import Final

import redis.asyncio as aioredis

from gridstream.common.streams import PREFIX


def archived_key() -> str:
    """The Redis hash holding the archived-up-to entry id per stream."""
    return f"{PREFIX}:state:archived_upto"


_ADVANCE: Final = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  local cms, cseq = string.match(cur, '^(%d+)-(%d+)$')
  local nms, nseq = string.match(ARGV[2], '^(%d+)-(%d+)$')
  cms = tonumber(cms); cseq = tonumber(cseq); nms = tonumber(nms); nseq = tonumber(nseq)
  if cms > nms or (cms == nms and cseq >= nseq) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


async def record_archived(redis: aioredis.Redis, stream: str, entry_id: str) -> bool:
    """Advance the watermark of ``stream`` to ``entry_id``; False if it was already past it."""
    done = await redis.eval(_ADVANCE, 1, archived_key(), stream, entry_id)
    return bool(done)


async def archived_up_to(redis: aioredis.Redis) -> dict[str, str]:
    """Every stream's watermark."""
    raw = await redis.hgetall(archived_key())
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }
