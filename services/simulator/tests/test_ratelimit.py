"""Request weights, X-MBX-USED-WEIGHT-1M, 429 then 418 bans, against a real server."""

from __future__ import annotations

import requests
from sim_helpers import fixture, settings

from gridstream.simulator.ratelimit import RateLimiter, banned_msg, too_much_weight_msg
from gridstream.simulator.server import ThreadedSimulator

WINDOW = 2.0
BAN = 1.0


def catalog(code: int) -> list[str]:
    return next(
        c["messages"] for c in fixture("error-codes-catalog.json")["codes"] if c["code"] == code
    )


def test_messages_are_the_catalog_texts() -> None:
    msgs = catalog(-1003)
    assert too_much_weight_msg(6000, "1 MINUTE") == msgs[1] % (6000, "1 MINUTE")
    assert too_much_weight_msg(6000, "1 MINUTE") == (
        "Too much request weight used; current limit is 6000 request weight per 1 MINUTE. "
        "Please use WebSocket Streams for live updates to avoid polling the API."
    )
    assert banned_msg(1700000000000) == msgs[2] % 1700000000000
    assert RateLimiter(6000, 60, 120).interval_text() == "1 MINUTE"


def test_ban_doubles_per_repeat_and_is_capped() -> None:
    lim = RateLimiter(limit=10, window_s=60, ban_s=120)
    t = 600.0  # start of a window
    assert lim.charge("a", 10, t).status == 200
    v = lim.charge("a", 1, t + 1)
    assert (v.status, v.used, v.retry_after) == (429, 11, 59)
    v = lim.charge("a", 1, t + 2)
    assert (v.status, v.retry_after, v.banned_until_ms) == (418, 120, int((t + 122) * 1000))
    assert lim.charge("b", 1, t + 2).status == 200  # per IP
    assert lim.charge("a", 1, t + 30).status == 418  # banned: refused, not counted
    assert lim.used("a", t + 30) == 12
    # after the ban: a new window, fresh budget; abuse again -> 429, then a 240 s ban
    t2 = t + 180
    assert lim.charge("a", 10, t2).status == 200
    assert lim.charge("a", 1, t2).status == 429
    v = lim.charge("a", 1, t2)
    assert (v.status, v.retry_after) == (418, 240)
    lim.ips["a"].bans = 40
    lim.ips["a"].banned_until = 0
    lim.ips["a"].warned = True
    v = lim.charge("a", 1, t2 + 1)
    assert v.retry_after == 120 * 2160  # 3 days at Binance's scale


class Clock:
    """The simulator's request-weight clock, driven by the test (no wall-clock race)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_weights_429_and_418_over_http() -> None:
    sim = ThreadedSimulator(
        settings(weight_limit=30, weight_window_s=WINDOW, ban_seconds=BAN)
    ).start()
    clock = Clock(1_000_000.0)  # a window boundary (a multiple of WINDOW)
    sim.simulator.wall = clock
    try:
        url = sim.url

        def get(path: str, **params: object) -> requests.Response:
            return requests.get(url + path, params=params, timeout=30)

        r = get("/api/v3/ping")
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "1"
        r = get("/api/v3/klines", symbol="BTCUSDT", interval="1m", limit=5)
        assert r.status_code == 200
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "3"  # klines: 2
        r = get("/api/v3/exchangeInfo")
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "23"  # exchangeInfo: 20
        info = r.json()
        assert info["rateLimits"][0] == {
            "rateLimitType": "REQUEST_WEIGHT",
            "interval": "MINUTE",
            "intervalNum": 1,
            "limit": 30,
        }
        assert get("/sim/status").status_code == 200  # admin: not metered
        assert get("/api/v3/time").headers["X-MBX-USED-WEIGHT-1M"] == "24"
        # over the limit: 429 with Retry-After = seconds to the window's end
        clock.now += 0.5
        r = get("/api/v3/exchangeInfo")
        assert r.status_code == 429
        assert r.json() == {
            "code": -1003,
            "msg": catalog(-1003)[1] % (30, f"{WINDOW:g} SECOND"),
        }
        assert r.headers["X-MBX-USED-WEIGHT-1M"] == "44"
        assert r.headers["Retry-After"] == "2"  # 1.5 s left in the window, rounded up
        # keeps sending: banned (418), Retry-After = ban length, body names the end in ms
        r = get("/api/v3/ping")
        assert r.status_code == 418
        body = r.json()
        assert body["code"] == -1003
        until = int(body["msg"].split("banned until ")[1].split(".")[0])
        assert body["msg"] == catalog(-1003)[2] % until
        assert until == int((clock.now + BAN) * 1000)
        assert r.headers["Retry-After"] == "1"
        assert "X-MBX-USED-WEIGHT-1M" in r.headers
        # the ban holds for any endpoint, then lifts; a fresh window starts from zero
        assert get("/api/v3/time").status_code == 418
        clock.now = 1_000_000.0 + 2 * WINDOW  # ban over, next window but one
        r = get("/api/v3/ping")
        assert (r.status_code, r.headers["X-MBX-USED-WEIGHT-1M"]) == (200, "1")
        # repeat offender: 429, then a ban twice as long
        assert get("/api/v3/exchangeInfo").status_code == 200
        assert get("/api/v3/exchangeInfo").status_code == 429
        r = get("/api/v3/ping")
        assert (r.status_code, r.headers["Retry-After"]) == (418, "2")
    finally:
        sim.stop()


def test_default_limit_message_over_http() -> None:
    sim = ThreadedSimulator(settings()).start()  # GS_SIM_WEIGHT_LIMIT default 6000
    try:
        s = requests.Session()
        used = 0
        while used <= 6000:
            r = s.get(sim.url + "/api/v3/exchangeInfo", timeout=5)
            used = int(r.headers["X-MBX-USED-WEIGHT-1M"])
        # the window may have turned over mid-loop; the first over-limit answer is a 429
        assert r.status_code == 429, r.text
        assert r.json() == {
            "code": -1003,
            "msg": "Too much request weight used; current limit is 6000 request weight per "
            "1 MINUTE. Please use WebSocket Streams for live updates to avoid polling the API.",
        }
    finally:
        sim.stop()
