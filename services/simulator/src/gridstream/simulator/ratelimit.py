"""Binance's per-IP request-weight limit: 429 over the limit, then 418 bans.

Pure: the caller passes the wall-clock time (seconds). Rules, after Binance's "LIMITS"
section (rest-api.md, binance/binance-spot-api-docs):

* each request adds its weight to the IP's count for the current window (a fixed wall
  window of ``window_s`` seconds, 60 on Binance: ``X-MBX-USED-WEIGHT-1M``); the count
  includes requests that were refused with 429, as the live header does;
* a request that brings the count over ``limit`` gets HTTP 429, code -1003, and a
  ``Retry-After`` of the seconds until the window resets;
* a further request over the limit in the same window after that 429 (the client did
  not back off) bans the IP: HTTP 418, -1003 "IP banned until <ms>", ``Retry-After`` =
  seconds until the ban ends. Every request during the ban gets the same 418 and is not
  counted. Ban length is ``ban_s`` (Binance: 2 minutes) doubling with every repeat ban,
  capped at ``ban_s * 2160`` (Binance: "from 2 minutes to 3 days"). When a ban ends the
  next request over the limit gets a 429 warning again before the next ban.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

BAN_CAP_FACTOR = 2160  # 3 days / 2 minutes


def too_much_weight_msg(limit: int, interval: str) -> str:
    """-1003 body of a 429 (errors.md; text as of the 2022-12-13 changelog)."""
    return (
        f"Too much request weight used; current limit is {limit} request weight per "
        f"{interval}. Please use WebSocket Streams for live updates to avoid polling the API."
    )


def banned_msg(until_ms: int) -> str:
    """-1003 body of a 418."""
    return (
        f"Way too much request weight used; IP banned until {until_ms}. Please use "
        "WebSocket Streams for live updates to avoid bans."
    )


@dataclass(slots=True)
class _IpState:
    window: int = -1
    used: int = 0
    warned: bool = False
    bans: int = 0
    banned_until: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    status: int  # 200 (go on), 429 or 418
    used: int
    retry_after: int = 0
    banned_until_ms: int = 0


class RateLimiter:
    def __init__(self, limit: int, window_s: float, ban_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.ban_s = ban_s
        self.ips: dict[str, _IpState] = {}

    def interval_text(self) -> str:
        """Binance's ``intervalNum`` + ``interval`` as it appears in the -1003 message."""
        if self.window_s == 60:
            return "1 MINUTE"
        return f"{self.window_s:g} SECOND"

    def used(self, ip: str, now: float) -> int:
        st = self.ips.get(ip)
        if st is None or st.window != int(now // self.window_s):
            return 0
        return st.used

    def charge(self, ip: str, weight: int, now: float) -> Verdict:
        st = self.ips.setdefault(ip, _IpState())
        w = int(now // self.window_s)
        if st.window != w:
            st.window, st.used, st.warned = w, 0, False
        if now < st.banned_until:
            return Verdict(
                418, st.used, math.ceil(st.banned_until - now), int(st.banned_until * 1000)
            )
        if st.banned_until:  # a ban just ended: warn once more before the next one
            st.banned_until = 0.0
            st.warned = False
        st.used += weight
        if st.used <= self.limit:
            return Verdict(200, st.used)
        if not st.warned:
            st.warned = True
            window_end = (w + 1) * self.window_s
            return Verdict(429, st.used, max(1, math.ceil(window_end - now)))
        st.bans += 1
        length = self.ban_s * min(2 ** (st.bans - 1), BAN_CAP_FACTOR)
        st.banned_until = now + length
        return Verdict(418, st.used, max(1, math.ceil(length)), int(st.banned_until * 1000))
