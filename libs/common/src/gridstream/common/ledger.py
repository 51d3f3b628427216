"""Ledger vocabulary shared by every service that reads or writes the Postgres ledger.

Each enum here is the one definition of the values a ledger column may hold: code uses
the members, and the migrations render the same enums into their SQL (``{{LedgerStatus}}``
-> ``'pending', 'accepted', ...``; see :mod:`gridstream.common.db`), so the CHECK
constraints in the database are the enums, never a second copy. Adding a value here is
all it takes: the repeatable migration ``R__vocabulary.sql`` re-renders and is applied
again at the next start.
"""

from __future__ import annotations

from enum import StrEnum, nonmember
from typing import Final

from gridstream.common.messages import Actions, IntentAction


class LedgerStatus(StrEnum):
    """``orders.status``: where an order stands (written by the executor)."""

    PENDING = "pending"  # row written, request not (yet) answered
    ACCEPTED = "accepted"
    PARTIALLY_FILLED = "partially_filled"
    FILLED = "filled"
    CANCELED = "canceled"
    FAILED = "failed"
    UNKNOWN = "unknown"  # outcome unknown; the executor reconciles it

    #: Statuses of an order that may still rest on the book.
    OPEN = nonmember((PENDING, ACCEPTED, PARTIALLY_FILLED, UNKNOWN))


class OrderEventKind(StrEnum):
    """``order_events.kind``: what happened to an order, one row per event.

    ``detail`` holds, by kind: the venue trade id (``fill``), the filled quantity when
    canceled (``canceled``), ``"<code> <reason>"`` of the refusal (``*_failed``).
    """

    ACCEPTED = "accepted"
    FILL = "fill"
    CANCELED = "canceled"
    PLACE_FAILED = "place_failed"
    CANCEL_FAILED = "cancel_failed"

    @classmethod
    def failed(cls, action: IntentAction) -> OrderEventKind:
        """The kind recorded when the venue refused a request of ``action``."""
        return cls.PLACE_FAILED if action == Actions.PLACE else cls.CANCEL_FAILED


class RiskVerdict(StrEnum):
    """``risk_verdicts.verdict``: what risk answered to an intent.

    (Named apart from the risk engine's ``Verdict``, the message union
    ``OrderApproved | OrderRejected`` these values stand for.)
    """

    APPROVED = "approved"
    REJECTED = "rejected"


#: The ledger's fills, oldest first: the rows every portfolio is rebuilt from
#: (``gridstream.core.portfolio.book_from_fills``). ``$1``: the symbols (NULL: every one).
SELECT_FILLS: Final = (
    "SELECT venue, symbol, trade_id, side, price, qty, fee, fee_asset FROM fills"
    " WHERE $1::text[] IS NULL OR symbol = ANY($1::text[]) ORDER BY ts_event, seq"
)
