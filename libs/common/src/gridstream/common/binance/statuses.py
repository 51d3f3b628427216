"""Binance spot order statuses (``X`` of an execution report, ``status`` of an order).

Pure vocabulary, no I/O: the REST/WebSocket client (:mod:`.trading`) and the kernel's
order state machine (:mod:`gridstream.core.orders`, which turns a venue report into an
order event) both read these names from here.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class VenueStatus(StrEnum):
    """Binance's order statuses (``ENUM`` ``orderStatus`` of the Spot API)."""

    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    PENDING_CANCEL = "PENDING_CANCEL"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    EXPIRED_IN_MATCH = "EXPIRED_IN_MATCH"


#: Statuses of an order that still rests on the book.
OPEN_STATUSES: Final = frozenset(
    {VenueStatus.NEW, VenueStatus.PARTIALLY_FILLED, VenueStatus.PENDING_CANCEL}
)
#: Statuses of an order closed without (fully) filling: canceled by us or expired.
CLOSED_CANCELED_STATUSES: Final = frozenset(
    {VenueStatus.CANCELED, VenueStatus.EXPIRED, VenueStatus.EXPIRED_IN_MATCH}
)
