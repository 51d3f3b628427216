"""Ledger vocabulary shared by every service that reads or writes the Postgres ledger."""

from __future__ import annotations

from typing import Final


class LedgerStatus:
    """Order status values in the Postgres ``orders`` table (written by the executor)."""

    PENDING: Final = "pending"  # row written, request not (yet) answered
    ACCEPTED: Final = "accepted"
    PARTIALLY_FILLED: Final = "partially_filled"
    FILLED: Final = "filled"
    CANCELED: Final = "canceled"
    FAILED: Final = "failed"
    UNKNOWN: Final = "unknown"  # outcome unknown; the executor reconciles it

    #: Statuses of an order that may still rest on the book.
    OPEN: Final = (PENDING, ACCEPTED, PARTIALLY_FILLED, UNKNOWN)
