"""Fault mode seen by real websocket clients: drop, drop-every, silence, repeat."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from sim_helpers import KEY, WINDOW_START, settings

from gridstream.simulator.server import start
from gridstream.simulator.settings import parse_faults

MIN = 60_000
STREAMS = "btcusdt@kline_1m/btcusdt@trade"


async def status(http: aiohttp.ClientSession, url: str) -> Any:
    return await (await http.get(url + "/sim/status")).json()


async def read_until_closed(
    ws: aiohttp.ClientWebSocketResponse, timeout: float = 60
) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(timeout):
        async for msg in ws:
            frames.append(json.loads(msg.data))
    return frames


async def read_until_closed_or_done(
    ws: aiohttp.ClientWebSocketResponse, http: aiohttp.ClientSession, url: str
) -> tuple[list[dict[str, Any]], bool]:
    """Frames until the server closes the connection (True) or the replay is done and
    nothing more comes (False)."""
    frames: list[dict[str, Any]] = []
    async with asyncio.timeout(60):
        while True:
            try:
                msg = await ws.receive(timeout=0.2)
            except TimeoutError:
                if (await status(http, url))["done"]:
                    return frames, False
                continue
            if msg.type != aiohttp.WSMsgType.TEXT:
                return frames, True
            frames.append(json.loads(msg.data))


def closed_opens(frames: list[dict[str, Any]]) -> list[int]:
    return [
        f["data"]["k"]["t"] for f in frames if f["data"].get("e") == "kline" and f["data"]["k"]["x"]
    ]


async def test_drop_at_minute_then_replay_waits_for_a_client() -> None:
    runner, url = await start(settings(hours=0.1, faults=parse_faults("f", "drop@2")))
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{url}/stream?streams={STREAMS}")
            frames = await read_until_closed(ws)
            assert ws.close_code == 1006  # abrupt: the TCP connection was closed
            assert closed_opens(frames) == [WINDOW_START, WINDOW_START + MIN]
            assert max(f["data"]["E"] for f in frames) < WINDOW_START + 2 * MIN
            # the replay itself says it waits (for a market-data client), then the clock
            # is where the drop left it
            async with asyncio.timeout(60):
                while not (st := await status(http, url))["replay_waiting"]:
                    await asyncio.sleep(0.02)
            # speed 0 and nobody connected: the replay waits instead of running away
            assert st["clock_ms"] == WINDOW_START + 2 * MIN - 1
            assert st["faults"][0]["kind"] == "drop"
            assert (st["faults"][0]["at_ms"], st["faults"][0]["affected"]) == (
                WINDOW_START + 2 * MIN,
                1,
            )
            assert st["market_clients"] == 0
            ws2 = await http.ws_connect(f"{url}/stream?streams={STREAMS}")
            first = json.loads((await ws2.receive(timeout=60)).data)
            assert first["data"]["e"] == "trade"
            assert first["data"]["T"] == WINDOW_START + 2 * MIN  # nothing lost meanwhile
            st = await status(http, url)
            assert (st["market_clients"], st["market_connections_total"]) == (1, 2)
            await ws2.close()
    finally:
        await runner.cleanup()


async def test_drop_every_n_minutes_loses_nothing_at_speed_0() -> None:
    runner, url = await start(settings(hours=5 / 60, faults=parse_faults("f", "drop-every@1")))
    try:
        async with aiohttp.ClientSession() as http:
            seen: list[list[int]] = []
            dropped: list[bool] = []
            for _ in range(5):
                ws = await http.ws_connect(f"{url}/stream?streams={STREAMS}")
                # speed 0: the replay waits for each new client, so the window is done only
                # once the last connection has had its minute (and it is never dropped)
                frames, closed = await read_until_closed_or_done(ws, http, url)
                await ws.close()
                seen.append(closed_opens(frames))
                dropped.append(closed)
            st = await status(http, url)
        assert [f["at_ms"] for f in st["faults"]] == [WINDOW_START + i * MIN for i in range(1, 5)]
        assert all(f["kind"] == "drop" and f["affected"] == 1 for f in st["faults"])
        assert seen[:4] == [[WINDOW_START + i * MIN] for i in range(4)]
        assert dropped == [True, True, True, True, False]
        assert st["done"] is True
    finally:
        await runner.cleanup()


async def test_silence_drops_frames_of_current_connections_only() -> None:
    # 60x: a replay minute takes 1 s of wall time; silence 1.5 s (wall) from minute 1, of a
    # 5-minute window: ~12 trades lost on a quiet machine, and on a loaded one (the replay
    # running late, then in a burst) more or fewer, but never the window's last minute
    runner, url = await start(
        settings(hours=5 / 60, speed=60.0, faults=parse_faults("f", "silence@1:1.5"))
    )
    try:
        async with aiohttp.ClientSession() as http:
            ws1 = await http.ws_connect(f"{url}/stream?streams=btcusdt@trade")
            got1: list[dict[str, Any]] = []
            got2: list[dict[str, Any]] = []

            async def drain(ws: aiohttp.ClientWebSocketResponse, out: list[Any]) -> None:
                async for m in ws:
                    out.append(json.loads(m.data)["data"])

            t1 = asyncio.create_task(drain(ws1, got1))
            async with asyncio.timeout(60):
                while not (await status(http, url))["faults"]:
                    await asyncio.sleep(0.02)
            ws2 = await http.ws_connect(f"{url}/stream?streams=btcusdt@trade")
            t2 = asyncio.create_task(drain(ws2, got2))
            async with asyncio.timeout(60):
                while not (await status(http, url))["done"]:
                    await asyncio.sleep(0.05)
                # both clients have the window's last trade (8 a minute, 5 minutes)
                last = got1[0]["t"] + 5 * 8 - 1 if got1 else None
                while not (got1 and got2 and got1[-1]["t"] == last and got2[-1]["t"] == last):
                    await asyncio.sleep(0.02)
            for ws in (ws1, ws2):
                await ws.close()
            for t in (t1, t2):
                t.cancel()
            st = await status(http, url)
        f = st["faults"][0]
        assert (f["kind"], f["at_ms"], f["affected"], f["seconds"]) == (
            "silence",
            WINDOW_START + MIN,
            1,
            1.5,
        )
        ids1 = [t["t"] for t in got1]
        all_ids = list(range(ids1[0], ids1[0] + 5 * 8))  # 8 trades a minute, 5 minutes
        missing = sorted(set(all_ids) - set(ids1))
        assert ids1 == sorted(ids1)
        assert missing, "the silenced connection lost nothing"
        assert missing == list(range(missing[0], missing[-1] + 1))  # one stretch
        t_of = {t["t"]: t["T"] for t in got2}
        ids2 = sorted(t_of)
        # connection 2, opened after the fault, lost nothing: every trade from its first on
        assert ids2 == list(range(ids2[0], all_ids[-1] + 1))
        # ... and, opened during the silence, got frames connection 1 lost
        assert missing[-1] in t_of
        # the silence began at minute 1 and ended before the window's last minute (the
        # silenced connection got frames again: it stayed open)
        assert WINDOW_START + MIN <= t_of[missing[-1]] < WINDOW_START + 4 * MIN
        assert ws1.close_code != 1006  # the silenced connection stayed open
    finally:
        await runner.cleanup()


def dup_block(texts: list[str]) -> tuple[int, int]:
    """(start index, length) of the frames that repeat earlier ones."""
    seen: set[str] = set()
    dups = []
    for i, t in enumerate(texts):
        if t in seen:
            dups.append(i)
        seen.add(t)
    assert dups == list(range(dups[0], dups[0] + len(dups))), dups
    return dups[0], len(dups)


async def test_repeat_from_env_resends_last_frames() -> None:
    runner, url = await start(settings(hours=3 / 60, faults=parse_faults("f", "repeat@1:5")))
    try:
        async with aiohttp.ClientSession() as http:
            ws = await http.ws_connect(f"{url}/stream?streams={STREAMS}")
            texts: list[str] = []
            # until the window's last frame: the close of its third (last) minute
            async with asyncio.timeout(60):
                while True:
                    texts.append((await ws.receive()).data)
                    d = json.loads(texts[-1])["data"]
                    if d["e"] == "kline" and d["k"]["x"] and d["k"]["t"] == WINDOW_START + 2 * MIN:
                        break
            await ws.close()
        start_i, n = dup_block(texts)
        assert n == 5
        block = texts[start_i : start_i + 5]
        j = texts.index(block[0])
        assert texts[j : j + 5] == block  # the same 5 frames, in the same order
        assert len(texts) - 5 == 3 * (8 + 2)  # every original frame once
    finally:
        await runner.cleanup()


async def test_admin_fault_api_and_user_stream_is_untouched() -> None:
    runner, url = await start(settings(hours=0.5))
    try:
        async with aiohttp.ClientSession(headers={"X-MBX-APIKEY": KEY}) as http:
            lk = (await (await http.post(url + "/api/v3/userDataStream")).json())["listenKey"]
            user = await http.ws_connect(f"{url}/ws/{lk}")
            ws = await http.ws_connect(f"{url}/ws/btcusdt@trade")
            texts = [(await ws.receive(timeout=60)).data for _ in range(20)]
            r = await http.post(url + "/sim/fault", json={"kind": "repeat", "frames": 3})
            assert await r.json() == {"ok": True, "affected": 1}
            async with asyncio.timeout(60):
                while len(set(texts)) == len(texts):
                    texts.append((await ws.receive()).data)
                for _ in range(2):
                    texts.append((await ws.receive()).data)
            assert dup_block(texts)[1] == 3
            r = await http.post(url + "/sim/fault", json={"kind": "silence", "seconds": 0.2})
            assert await r.json() == {"ok": True, "affected": 1}
            bad = await http.post(url + "/sim/fault", json={"kind": "melt"})
            assert bad.status == 400
            r = await http.post(url + "/sim/fault", json={"kind": "drop"})
            assert await r.json() == {"ok": True, "affected": 1}
            async with asyncio.timeout(60):
                async for _ in ws:
                    pass
            assert ws.close_code == 1006
            assert not user.closed  # the user data stream is not a market-data connection
            st = await (await http.get(url + "/sim/status")).json()
            assert [(f["kind"], f["source"]) for f in st["faults"]] == [
                ("repeat", "admin"),
                ("silence", "admin"),
                ("drop", "admin"),
            ]
            assert (st["market_clients"], st["user_clients"]) == (0, 1)
            await user.close()
    finally:
        await runner.cleanup()
