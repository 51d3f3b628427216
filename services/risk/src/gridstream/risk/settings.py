"""Risk settings: ``GS_MAX_EXPOSURE_QUOTE`` (default 250, in the quote asset)."""

from __future__ import annotations

from decimal import Decimal

from gridstream.common.settings import CommonSettings
from gridstream.core.risk import DEFAULT_MAX_EXPOSURE_QUOTE


class RiskSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Limits risk enforces on top of the exchange filters."""

    max_exposure_quote: Decimal = DEFAULT_MAX_EXPOSURE_QUOTE
    exchange_info_retry_s: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_exposure_quote <= 0:
            raise ValueError("GS_MAX_EXPOSURE_QUOTE: must be > 0")
        if self.exchange_info_retry_s <= 0:
            raise ValueError("GS_EXCHANGE_INFO_RETRY_S: must be > 0")
