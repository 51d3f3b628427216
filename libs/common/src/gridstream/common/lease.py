"""Replica ids, symbol leases and the active role, in Redis: who may handle what.

No consensus of our own: every claim is a Redis key with an expiry (``SET NX PX``),
renewed by its holder and compared-and-deleted on release, so a replica that dies loses
what it held when its keys expire and the others take it over.

* :class:`ReplicaRegistry`: replica ids unique by construction. A replica claims
  ``gs:replica:<service>:<id>`` at start (the lowest free id when none is set); an id held
  by a live replica is refused. A key left by a dead process of this host (its pid is
  gone) is taken over at once, so a restart keeps its id and consumer name.
* :class:`SymbolLeases`: the replicas of one service split its symbols. Every replica
  computes the same assignment from the same view of live replicas (symbols and replica
  ids sorted, dealt round-robin), releases what is no longer its own and takes what is
  free and assigned to it. A lease is a key ``gs:lease:<service>:<SYMBOL>`` whose value
  names the holder's incarnation, and the bus's commit checks it (a fence), so a replica
  that lost a lease cannot write for that symbol.
* :class:`ActiveLease`: one active replica of a service and standbys (risk, the
  executor). Taking the role increments a fencing token, which the active replica sets on
  its Postgres sessions; the ledger's triggers refuse writes under an older token.

Timing: a lease lives ``ttl_ms`` unless renewed; holders renew every ``ttl_ms / 4``.
A replica that cannot renew for ``ttl_ms`` must assume it lost everything.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis.asyncio as aioredis

from gridstream.common import metrics
from gridstream.common.streams import ACTIVE_LEASE, fence_key, lease_key, replica_key, replicas_key

log = logging.getLogger("gridstream.lease")

#: How often a holder renews, as a fraction of the TTL.
RENEW_FRACTION: Final = 0.25


class DuplicateReplica(RuntimeError):
    """The replica id asked for is held by another live replica."""


def incarnation() -> str:
    """This process's identity: ``host:pid:start_ns`` (unique across restarts)."""
    return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"


def _holder_is_dead(value: bytes | str | None, own: str) -> bool:
    """True when a key names a process of this host that no longer runs (``own``: this
    process's incarnation, so that an earlier one with the same pid counts as dead)."""
    if not value:
        return True
    text = value.decode(errors="replace") if isinstance(value, bytes) else value
    parts = text.rsplit(":", 2)
    if len(parts) != 3:
        return False
    host, pid_text, _ = parts
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's: only its expiry tells
    pid = int(pid_text)
    if pid == os.getpid():
        return text != own  # our pid: an earlier incarnation (a pid reused after restart)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


# Take a key: set if absent, or replace the value of a holder known to be dead.
#   KEYS: key   ARGV: new value, ttl ms, expected stale value ('' if none)
_TAKE_LUA: Final = """
local cur = redis.call('GET', KEYS[1])
if cur == false or cur == ARGV[3] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# Renew keys held with a value; report the ones not held any more.
#   KEYS: keys   ARGV: value, ttl ms   Reply: 1-based indexes of keys lost
_RENEW_LUA: Final = """
local lost = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"""

# Delete keys only where they still hold our value.
_RELEASE_LUA: Final = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then n = n + redis.call('DEL', key) end
end
return n
"""

# Membership: refresh our entry (score = expiry in Redis time), drop expired ones, list.
#   KEYS: members zset   ARGV: member, ttl ms   Reply: live members
_MEMBERS_LUA: Final = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[1] ~= '' then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 10)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

# The active role: take it if free and count a new fencing token in the same step.
#   KEYS: lease key, fence counter   ARGV: value, ttl ms   Reply: token, or 0 if held
_ACTIVE_LUA: Final = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return 0
"""


class ReplicaRegistry:
    """Claims a unique replica id for one service and keeps it alive."""

    def __init__(self, redis: aioredis.Redis, service: str, ttl_ms: int) -> None:
        self.redis = redis
        self.service = service
        self.ttl_ms = ttl_ms
        self.value = incarnation()
        self.replica = ""
        self._take = redis.register_script(_TAKE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)
        self._members = redis.register_script(_MEMBERS_LUA)

    async def claim(self, requested: str = "", *, max_id: int = 1000) -> str:
        """Take ``requested`` (or the lowest free id); :class:`DuplicateReplica` if held."""
        if requested:
            if not await self._try(requested):
                holder = await self.redis.get(replica_key(self.service, requested))
                shown = holder.decode(errors="replace") if isinstance(holder, bytes) else holder
                raise DuplicateReplica(
                    f"GS_REPLICA={requested}: replica id {requested!r} of {self.service} is"
                    f" held by a live replica ({shown}); give each replica its own id, or"
                    " leave GS_REPLICA unset to take the lowest free one"
                )
            self.replica = requested
        else:
            for i in range(max_id):
                if await self._try(str(i)):
                    self.replica = str(i)
                    break
            else:
                raise DuplicateReplica(f"no free replica id below {max_id} for {self.service}")
        await self.members()
        return self.replica

    async def _try(self, replica: str) -> bool:
        key = replica_key(self.service, replica)
        current = await self.redis.get(key)
        stale = current if current is not None and _holder_is_dead(current, self.value) else b""
        return bool(await self._take(keys=[key], args=[self.value, self.ttl_ms, stale or b""]))

    async def renew(self) -> bool:
        """Keep the id; False if it was lost (expired and taken by another process)."""
        lost = await self._renew(
            keys=[replica_key(self.service, self.replica)], args=[self.value, self.ttl_ms]
        )
        await self.members()
        return not lost

    async def members(self) -> list[str]:
        """The live replica ids of the service (ours included), sorted."""
        raw: Any = await self._members(
            keys=[replicas_key(self.service)], args=[self.replica, self.ttl_ms]
        )
        return sorted((m.decode() if isinstance(m, bytes) else str(m)) for m in raw)

    async def release(self) -> None:
        await self._release(keys=[replica_key(self.service, self.replica)], args=[self.value])
        await self.redis.zrem(replicas_key(self.service), self.replica)


def assignment(symbols: Sequence[str], replicas: Sequence[str]) -> dict[str, str]:
    """Which replica each symbol belongs to: both sorted, symbols dealt round-robin.

    Every replica with the same view of live replicas computes the same answer.
    """
    live = sorted(replicas, key=_replica_order)
    if not live:
        return {}
    return {sym: live[i % len(live)] for i, sym in enumerate(sorted(symbols))}


def _replica_order(replica: str) -> tuple[int, int | str]:
    return (0, int(replica)) if replica.isdigit() else (1, replica)


@dataclass
class LeaseChanges:
    """What one :meth:`SymbolLeases.tick` decided."""

    gained: list[str] = field(default_factory=list)
    #: Leases this replica must stop using now, then :meth:`SymbolLeases.release`.
    to_release: list[str] = field(default_factory=list)
    #: Leases that expired or were taken (not ours any more; nothing to release).
    lost: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.gained or self.to_release or self.lost)


class SymbolLeases:
    """This replica's share of a service's symbols, kept by periodic :meth:`tick` calls."""

    def __init__(
        self,
        redis: aioredis.Redis,
        registry: ReplicaRegistry,
        symbols: Iterable[str],
        ttl_ms: int,
    ) -> None:
        self.redis = redis
        self.registry = registry
        self.service = registry.service
        self.symbols = sorted({s.upper() for s in symbols})
        self.ttl_ms = ttl_ms
        self.value = f"{registry.replica}@{registry.value}"
        self.held: set[str] = set()
        #: Symbols given up by :meth:`tick` and not yet released.
        self.releasing: set[str] = set()
        self._take = redis.register_script(_TAKE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    def key(self, symbol: str) -> str:
        return lease_key(self.service, symbol)

    async def renew_held(self) -> LeaseChanges:
        """Renew what is held, and nothing else (a stopping replica takes no new symbol)."""
        changes = LeaseChanges()
        held = sorted(self.held)
        if held:
            lost_idx: Any = await self._renew(
                keys=[self.key(s) for s in held], args=[self.value, self.ttl_ms]
            )
            for i in lost_idx or ():
                sym = held[int(i) - 1]
                self.held.discard(sym)
                self.releasing.discard(sym)
                changes.lost.append(sym)
        return changes

    async def tick(self) -> LeaseChanges:
        """Renew what is held, give up what is no longer ours, take what is ours and free."""
        changes = await self.renew_held()
        members = await self.registry.members()
        mine = {
            s for s, r in assignment(self.symbols, members).items() if r == self.registry.replica
        }
        for sym in sorted(self.held - mine - self.releasing):
            self.releasing.add(sym)
            changes.to_release.append(sym)
        for sym in sorted(mine - self.held):
            if await self._take(keys=[self.key(sym)], args=[self.value, self.ttl_ms, b""]):
                self.held.add(sym)
                changes.gained.append(sym)
        self._count(changes)
        return changes

    async def release(self, symbols: Iterable[str]) -> None:
        """Give leases back (after the replica stopped using them)."""
        syms = sorted(symbols)
        if not syms:
            return
        await self._release(keys=[self.key(s) for s in syms], args=[self.value])
        for s in syms:
            self.held.discard(s)
            self.releasing.discard(s)

    async def release_all(self) -> None:
        await self.release(list(self.held))

    def fence(self, symbol: str) -> tuple[str, str]:
        """The (key, value) a commit for ``symbol`` must find in Redis."""
        return self.key(symbol), self.value

    def _count(self, changes: LeaseChanges) -> None:
        for event, syms in (
            ("gained", changes.gained),
            ("released", changes.to_release),
            ("lost", changes.lost),
        ):
            if syms:
                metrics.LEASE_CHANGES.labels(self.service, event).inc(len(syms))
                log.info("%s leases %s: %s", self.service, event, ", ".join(syms))
        metrics.LEASES_HELD.labels(self.service, self.registry.replica).set(len(self.held))


class ActiveLease:
    """The single active role of a service; the others wait as standbys."""

    def __init__(self, redis: aioredis.Redis, registry: ReplicaRegistry, ttl_ms: int) -> None:
        self.redis = redis
        self.registry = registry
        self.service = registry.service
        self.ttl_ms = ttl_ms
        self.value = f"{registry.replica}@{registry.value}"
        self.token = 0
        self._active = redis.register_script(_ACTIVE_LUA)
        self._renew = redis.register_script(_RENEW_LUA)
        self._release = redis.register_script(_RELEASE_LUA)

    @property
    def key(self) -> str:
        return lease_key(self.service, ACTIVE_LEASE)

    @property
    def held(self) -> bool:
        return self.token > 0

    async def try_take(self) -> bool:
        """Take the role if it is free; on success :attr:`token` is the new fencing token."""
        token = int(
            await self._active(
                keys=[self.key, fence_key(self.service)], args=[self.value, self.ttl_ms]
            )
        )
        if token:
            self.token = token
            metrics.LEASE_CHANGES.labels(self.service, "gained").inc()
            metrics.LEASES_HELD.labels(self.service, self.registry.replica).set(1)
            log.info(
                "%s replica %s is active (fencing token %d)",
                self.service,
                self.registry.replica,
                token,
            )
        return bool(token)

    async def renew(self) -> bool:
        """Keep the role; False once it is lost."""
        lost = await self._renew(keys=[self.key], args=[self.value, self.ttl_ms])
        if lost:
            self.token = 0
            metrics.LEASE_CHANGES.labels(self.service, "lost").inc()
            metrics.LEASES_HELD.labels(self.service, self.registry.replica).set(0)
        return not lost

    async def release(self) -> None:
        await self._release(keys=[self.key], args=[self.value])
        self.token = 0
        metrics.LEASES_HELD.labels(self.service, self.registry.replica).set(0)

    def fence(self) -> tuple[str, str]:
        return self.key, self.value
