"""``gridstream status``: streams, consumer groups, dead letters and service health."""

from __future__ import annotations

import json
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gridstream.common.runtime import HEARTBEAT_TTL_S
from gridstream.common.streams import dead_letters, heartbeat_key, pattern_all, supervisor_key

from .common import s
from .supervise import crash_loop_text, decode_state, describe_exit

#: Prefix shared by every dead-letter stream (``gs:dlq:``).
DLQ_PREFIX = dead_letters("")


async def _groups(redis: aioredis.Redis, stream: str) -> list[dict[str, Any]]:
    try:
        infos = await redis.xinfo_groups(stream)
    except ResponseError:
        return []
    out = []
    for info in infos:
        name = s(info["name"])
        consumers = []
        try:
            for c in await redis.xinfo_consumers(stream, name):
                consumers.append(
                    {
                        "name": s(c["name"]),
                        "pending": int(c.get("pending") or 0),
                        "idle_ms": int(c.get("idle") or 0),
                    }
                )
        except ResponseError:
            pass
        lag = info.get("lag")
        out.append(
            {
                "name": name,
                "pending": int(info.get("pending") or 0),
                "lag": None if lag is None else int(lag),
                "last_delivered_id": s(info.get("last-delivered-id")),
                "consumers": consumers,
            }
        )
    return out


async def collect(redis: aioredis.Redis, *, now_ns: int | None = None) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (what ``--json`` prints)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    names = sorted(
        {s(k) async for k in redis.scan_iter(match=pattern_all(), count=500, _type="stream")}
    )
    streams: list[dict[str, Any]] = []
    dlqs: list[dict[str, Any]] = []
    for name in names:
        length = int(await redis.xlen(name))
        if name.startswith(DLQ_PREFIX):
            dlqs.append({"name": name, "group": name[len(DLQ_PREFIX) :], "length": length})
        else:
            streams.append({"name": name, "length": length, "groups": await _groups(redis, name)})
    services: list[dict[str, Any]] = []
    async for key in redis.scan_iter(match=heartbeat_key("*", "*"), count=500):
        raw = await redis.get(key)
        if raw is None:
            continue
        try:
            body = json.loads(raw)
        except ValueError:
            continue
        ts = int(body.get("ts") or 0)
        age_s = max(0.0, (now_ns - ts) / 1e9)
        services.append(
            {
                "service": body.get("service", ""),
                "replica": body.get("replica", ""),
                "ready": bool(body.get("ready")),
                "pid": body.get("pid"),
                "metrics_port": body.get("metrics_port"),
                "age_s": round(age_s, 1),
                "stale": age_s > HEARTBEAT_TTL_S,
                "role": body.get("role"),
                "symbols": body.get("symbols"),
                "fencing_token": body.get("fencing_token"),
                "lost_entries": int(body.get("lost_entries") or 0),
            }
        )
    services.sort(key=lambda x: (x["service"], x["replica"]))
    return {
        "streams": streams,
        "dead_letters": dlqs,
        "services": services,
        "supervisor": await _supervisor(redis, now_ns),
    }


async def _supervisor(redis: aioredis.Redis, now_ns: int) -> list[dict[str, Any]]:
    """What ``gridstream run`` says of its children (empty when no ``run`` supervises)."""
    raw: Any = await redis.hgetall(supervisor_key())
    out: list[dict[str, Any]] = []
    for value in raw.values():
        try:
            st = decode_state(value)
        except ValueError:
            continue
        age_s = max(0.0, (now_ns - st.ts) / 1e9)
        out.append(
            {
                "service": st.service,
                "phase": st.phase.value,
                "pid": st.pid,
                "restarts": st.restarts,
                "last_exit": None if st.last_exit_code is None else st.last_exit_code,
                "last_exit_text": ""
                if st.last_exit_code is None
                else describe_exit(st.last_exit_code),
                "crash_loop": st.crash_loop,
                "crash_loop_text": crash_loop_text(st, now_ns),
                "backoff_s": st.backoff_s if st.phase == "backoff" else None,
                "reason": st.reason,
                "supervisor_pid": st.supervisor_pid,
                "stale": age_s > HEARTBEAT_TTL_S,
            }
        )
    out.sort(key=lambda x: x["service"])
    return out


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """The human view: three tables."""
    parts: list[str] = []
    rows: list[list[str]] = []
    for st in report["streams"]:
        if not st["groups"]:
            rows.append([st["name"], str(st["length"]), "-", "", "", ""])
        for g in st["groups"]:
            consumers = ",".join(c["name"] for c in g["consumers"]) or "-"
            lag = "?" if g["lag"] is None else str(g["lag"])
            rows.append(
                [st["name"], str(st["length"]), g["name"], lag, str(g["pending"]), consumers]
            )
    parts.append("STREAMS")
    parts.append(
        _table(["stream", "length", "group", "lag", "pending", "consumers"], rows)
        if rows
        else "  (no gridstream streams)"
    )
    parts.append("")
    parts.append("DEAD LETTERS")
    dl_rows = [[d["name"], d["group"], str(d["length"])] for d in report["dead_letters"]]
    parts.append(_table(["stream", "group", "length"], dl_rows) if dl_rows else "  (none)")
    parts.append("")
    parts.append("SERVICES")
    sv_rows = []
    for sv in report["services"]:
        health = "STALE" if sv["stale"] else ("ready" if sv["ready"] else "starting")
        role = sv.get("role") or "-"
        if sv.get("fencing_token") is not None and role == "active":
            role = f"active #{sv['fencing_token']}"
        symbols = ",".join(sv.get("symbols") or []) or "-"
        sv_rows.append(
            [
                sv["service"],
                str(sv["replica"]),
                health,
                role,
                symbols,
                str(sv["pid"]),
                str(sv["metrics_port"]),
                f"{sv['age_s']}s",
                str(sv.get("lost_entries") or 0),
            ]
        )
    headers = ["service", "replica", "health", "role", "symbols", "pid", "metrics", "heartbeat"]
    parts.append(_table([*headers, "lost"], sv_rows) if sv_rows else "  (no heartbeats)")
    if report.get("supervisor"):
        parts.append("")
        parts.append("SUPERVISOR (gridstream run)")
        sup_rows = []
        for c in report["supervisor"]:
            note = c["crash_loop_text"] or c["reason"]
            if c["phase"] == "backoff" and c["backoff_s"] is not None:
                note = f"restart in {c['backoff_s']}s; {note}"
            phase = "STALE" if c["stale"] else c["phase"]
            if c["crash_loop"]:
                phase = f"{phase} CRASH-LOOP"
            sup_rows.append(
                [
                    c["service"],
                    phase,
                    "-" if c["pid"] is None else str(c["pid"]),
                    str(c["restarts"]),
                    c["last_exit_text"] or "-",
                    note,
                ]
            )
        parts.append(_table(["service", "state", "pid", "restarts", "last exit", "note"], sup_rows))
    return "\n".join(parts)


async def status(redis: aioredis.Redis, *, as_json: bool) -> str:
    report = await collect(redis)
    return json.dumps(report, indent=2) if as_json else render(report)
