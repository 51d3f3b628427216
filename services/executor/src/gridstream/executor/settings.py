"""Executor settings: venue credentials (``GS_API_KEY``/``GS_API_SECRET`` or their ``_FILE``)."""

from __future__ import annotations

from typing import Final

from gridstream.common.settings import CommonSettings

#: The simulator's default credentials (services/simulator, GS_SIM_API_KEY/SECRET defaults).
SIMULATOR_DEFAULT_KEY: Final = "sim-key"
SIMULATOR_DEFAULT_SECRET: Final = "sim-secret"


class ExecutorSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Credentials and timings of the venue connection. Secrets never appear in the repr."""

    api_key: str = ""
    api_secret: str = ""
    recv_window_ms: int = 5000
    request_timeout_s: float = 10.0
    listen_key_keepalive_s: float = 1800.0
    reconnect_delay_s: float = 1.0
    unknown_outcome_queries: int = 3
    unknown_outcome_wait_s: float = 0.5
    #: How often execution events whose publish failed are tried again.
    outbox_retry_s: float = 1.0
    #: Least time between reconciliations asked for by malformed user-stream events.
    malformed_reconcile_s: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()  # includes the live-trading guard
        if self.venue != "simulator" and (not self.api_key or not self.api_secret):
            raise ValueError(
                "GS_API_KEY/GS_API_SECRET: required for venue "
                f"{self.venue} (env or GS_API_KEY_FILE/GS_API_SECRET_FILE)"
            )
        if self.venue == "binance" and self.mode != "live":
            raise ValueError("GS_VENUE: venue=binance (real money) needs mode=live")
        if self.mode == "paper":
            # Paper trading (live data, simulated fills) needs the paper venue, which does
            # not exist yet: refuse rather than send orders anywhere.
            raise ValueError("GS_MODE: the executor has no paper venue yet; use mode=replay")
        if not 0 < self.recv_window_ms <= 60_000:
            raise ValueError("GS_RECV_WINDOW_MS: must be within 1..60000")
        if self.request_timeout_s <= 0:
            raise ValueError("GS_REQUEST_TIMEOUT_S: must be > 0")
        if self.listen_key_keepalive_s <= 0:
            raise ValueError("GS_LISTEN_KEY_KEEPALIVE_S: must be > 0")
        if self.unknown_outcome_queries < 1:
            raise ValueError("GS_UNKNOWN_OUTCOME_QUERIES: must be >= 1")
        if self.outbox_retry_s <= 0:
            raise ValueError("GS_OUTBOX_RETRY_S: must be > 0")
        if self.malformed_reconcile_s < 0:
            raise ValueError("GS_MALFORMED_RECONCILE_S: must be >= 0")

    @property
    def key(self) -> str:
        """The API key to use (the simulator's default when none is set for the simulator)."""
        return self.api_key or SIMULATOR_DEFAULT_KEY

    @property
    def secret(self) -> str:
        return self.api_secret or SIMULATOR_DEFAULT_SECRET
