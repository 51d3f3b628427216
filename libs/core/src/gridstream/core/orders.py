"""The order state machine: the one place that decides an order's status.

One :class:`OrderState` per client order id; :func:`apply` takes a state and one
:class:`OrderEvent` and gives a :class:`Transition`: the next state, and a
:class:`Verdict` with a reason when the event does not move the order. It never raises
on an event that comes too late or twice (the hot path goes on; the reason is logged);
an event that no rule allows is refused the same way, as :attr:`Verdict.ILLEGAL`.
Pure and synchronous: no I/O, no clock; time comes in the events (``ts_event``, ns).

The executor loads an order's ledger row into an :class:`OrderState`, applies the event
it learned (a venue answer, a user-stream report, a reconciliation finding) and writes
the resulting state; the backtester keeps the states in memory and drives the same
function. Statuses are the ledger's (:class:`~gridstream.common.ledger.LedgerStatus`).

Events, and how Binance produces them:

* :class:`Submitted`: the placement request goes out (the ledger row is written first).
  Its ``deadline_ns`` is when the venue must know the order if it ever will: Binance
  drops a request that reaches it after ``timestamp + recvWindow``.
* :class:`SendUnknown`: the request's outcome is unknown (timeout, 5xx, disconnect).
* :class:`Accepted`: the venue has the order open (``NEW``, ``PENDING_CANCEL``).
* :class:`ReportedPartiallyFilled` / :class:`ReportedFilled`: a query or an answer says
  ``PARTIALLY_FILLED`` / ``FILLED`` (its trades may arrive later, as :class:`Fill`).
* :class:`Fill`: one trade, by its incremental quantity, or by the cumulative filled
  quantity the venue reports (``z`` of an execution report). A trade id already
  counted, or a cumulative quantity already reached, counts once.
* :class:`CancelRequested`: a cancel is about to be sent.
* :class:`Canceled`: the venue canceled or expired it (``CANCELED``, ``EXPIRED``,
  ``EXPIRED_IN_MATCH``).
* :class:`CancelUnknownOrder`: a cancel was answered ``-2011 Unknown order`` and a query
  finds nothing: an order the venue had is gone (Binance purges canceled orders that
  never traded); one it never had is not canceled.
* :class:`Rejected`: the placement was refused for good (or reported ``REJECTED``).
* :class:`NotFound`: a query says the order does not exist (``-2013``). Before the
  order's deadline the request may still reach the venue, so nothing changes; after it,
  the order never reached the venue: failed.

Late and repeated events, as Binance behaves: a trade can be reported after a cancel
request and even after ``CANCELED`` (it happened before the cancel): it is counted, the
order stays canceled. ``FILLED`` is terminal: a later ``CANCELED`` (a cancel that crossed
the last trade) changes nothing. A trade of an order marked failed (it was not found in
time) proves the order reached the venue: the trade counts and moves it to partially
filled or filled. Every rule is one entry of :data:`TRANSITIONS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from enum import Enum, StrEnum
from typing import ClassVar, Final, TypeAlias

from gridstream.common.binance.statuses import (
    CLOSED_CANCELED_STATUSES,
    VenueStatus,
)
from gridstream.common.ledger import LedgerStatus

ZERO: Final = Decimal(0)

Status: TypeAlias = LedgerStatus
PENDING: Final = LedgerStatus.PENDING
UNKNOWN: Final = LedgerStatus.UNKNOWN
ACCEPTED: Final = LedgerStatus.ACCEPTED
PARTIALLY_FILLED: Final = LedgerStatus.PARTIALLY_FILLED
FILLED: Final = LedgerStatus.FILLED
CANCELED: Final = LedgerStatus.CANCELED
FAILED: Final = LedgerStatus.FAILED

#: Statuses of an order whose placement has no known outcome yet.
UNRESOLVED: Final = frozenset({PENDING, UNKNOWN})
#: Statuses the venue has confirmed and that may still trade.
WORKING: Final = frozenset({ACCEPTED, PARTIALLY_FILLED})
#: Statuses after which the order never rests on the book again.
TERMINAL: Final = frozenset({FILLED, CANCELED, FAILED})


class EventKind(StrEnum):
    """What happened to an order: the columns of :data:`TRANSITIONS`."""

    SUBMITTED = "submitted"
    SEND_UNKNOWN = "send_unknown"
    ACCEPTED = "accepted"
    REPORTED_PARTIALLY_FILLED = "reported_partially_filled"
    FILL = "fill"
    REPORTED_FILLED = "reported_filled"
    CANCEL_REQUESTED = "cancel_requested"
    CANCELED = "canceled"
    CANCEL_UNKNOWN_ORDER = "cancel_unknown_order"
    REJECTED = "rejected"
    NOT_FOUND = "not_found"


class Verdict(StrEnum):
    """How an event was taken."""

    #: A legal transition: the state is the event's effect (its status may stay the
    #: same, e.g. a trade of a canceled order, or a cancel request).
    APPLIED = "applied"
    #: The state already says what the event says (a repeat): nothing to do.
    DUPLICATE = "duplicate"
    #: A late event that no longer moves the order (it was overtaken).
    STALE = "stale"
    #: The event cannot happen to an order in this status: refused.
    ILLEGAL = "illegal"


# ----------------------------------------------------------------------------- state
@dataclass(frozen=True, slots=True, kw_only=True)
class OrderState:
    """One order, as far as its status goes.

    ``filled_notional`` is the sum of ``price * qty`` over the trades counted, for the
    average fill price; ``None`` when not known (the ledger's ``orders`` row keeps no
    notional, so a state loaded from it cannot tell). ``trade_ids`` holds the trades
    counted, so a trade seen twice counts once (a driver that dedupes trades itself,
    as the executor does with the ``fills`` table's unique key, may leave it empty).
    ``deadline_ns``: after it, an order the venue does not know never reached it.
    """

    client_order_id: str
    qty: Decimal
    status: LedgerStatus = PENDING
    filled_qty: Decimal = ZERO
    filled_notional: Decimal | None = ZERO
    venue_order_id: str = ""
    deadline_ns: int = 0
    ts_updated: int = 0
    trade_ids: frozenset[str] = frozenset()

    @property
    def avg_price(self) -> Decimal | None:
        """The average fill price; ``None`` before any fill or when not known."""
        if self.filled_notional is None or self.filled_qty <= ZERO:
            return None
        return self.filled_notional / self.filled_qty

    @property
    def remaining_qty(self) -> Decimal:
        return max(self.qty - self.filled_qty, ZERO)

    @property
    def is_open(self) -> bool:
        """May still rest on the book (``LedgerStatus.OPEN``)."""
        return self.status in LedgerStatus.OPEN

    @property
    def is_unresolved(self) -> bool:
        """The placement's outcome is not known: ask the venue before anything else."""
        return self.status in UNRESOLVED

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


def submit(client_order_id: str, qty: Decimal, *, ts_event: int, deadline_ns: int) -> OrderState:
    """The state of a new order whose placement is about to be sent (``pending``)."""
    return OrderState(
        client_order_id=client_order_id,
        qty=qty,
        status=PENDING,
        deadline_ns=deadline_ns,
        ts_updated=ts_event,
    )


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True, kw_only=True)
class Submitted:
    """The placement request goes out (again, after a lookup found nothing)."""

    kind: ClassVar[EventKind] = EventKind.SUBMITTED
    ts_event: int
    deadline_ns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SendUnknown:
    """The placement's outcome is unknown (timeout, 5xx, connection lost)."""

    kind: ClassVar[EventKind] = EventKind.SEND_UNKNOWN
    ts_event: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Accepted:
    """The venue has the order open."""

    kind: ClassVar[EventKind] = EventKind.ACCEPTED
    ts_event: int
    venue_order_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedPartiallyFilled:
    """The venue reports the order open and partially filled (its trades may follow)."""

    kind: ClassVar[EventKind] = EventKind.REPORTED_PARTIALLY_FILLED
    ts_event: int
    venue_order_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Fill:
    """One trade of the order.

    ``qty`` is the trade's quantity; when ``cumulative_qty`` is given (the venue's total
    filled quantity after this trade) it decides, and a value already reached is a
    repeat. ``trade_id`` empty: no dedupe by id.
    """

    kind: ClassVar[EventKind] = EventKind.FILL
    ts_event: int
    qty: Decimal
    price: Decimal
    trade_id: str = ""
    cumulative_qty: Decimal | None = None
    venue_order_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportedFilled:
    """The venue reports the order filled (its trades may arrive later)."""

    kind: ClassVar[EventKind] = EventKind.REPORTED_FILLED
    ts_event: int
    venue_order_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequested:
    """A cancel of the order is about to be sent."""

    kind: ClassVar[EventKind] = EventKind.CANCEL_REQUESTED
    ts_event: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Canceled:
    """The venue canceled (or expired) the order."""

    kind: ClassVar[EventKind] = EventKind.CANCELED
    ts_event: int
    venue_order_id: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelUnknownOrder:
    """A cancel was refused as ``Unknown order`` and a query does not find the order."""

    kind: ClassVar[EventKind] = EventKind.CANCEL_UNKNOWN_ORDER
    ts_event: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejected:
    """The placement was refused for good (``reason``: the venue's code and message)."""

    kind: ClassVar[EventKind] = EventKind.REJECTED
    ts_event: int
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class NotFound:
    """A query by client order id says the order does not exist."""

    kind: ClassVar[EventKind] = EventKind.NOT_FOUND
    ts_event: int


OrderEvent: TypeAlias = (
    Submitted
    | SendUnknown
    | Accepted
    | ReportedPartiallyFilled
    | Fill
    | ReportedFilled
    | CancelRequested
    | Canceled
    | CancelUnknownOrder
    | Rejected
    | NotFound
)

#: The order event a venue order status stands for (an answer, a query, a listing).
VENUE_STATUS_EVENTS: Final[Mapping[str, type[OrderEvent]]] = {
    VenueStatus.NEW: Accepted,
    VenueStatus.PENDING_CANCEL: Accepted,
    VenueStatus.PARTIALLY_FILLED: ReportedPartiallyFilled,
    VenueStatus.FILLED: ReportedFilled,
    VenueStatus.REJECTED: Rejected,
    **dict.fromkeys(CLOSED_CANCELED_STATUSES, Canceled),
}


def venue_report(
    venue_status: str, *, ts_event: int, venue_order_id: str = ""
) -> OrderEvent | None:
    """The event of a venue's order status; ``None`` for a status it does not define."""
    kind = VENUE_STATUS_EVENTS.get(venue_status)
    if kind is Accepted:
        return Accepted(ts_event=ts_event, venue_order_id=venue_order_id)
    if kind is ReportedPartiallyFilled:
        return ReportedPartiallyFilled(ts_event=ts_event, venue_order_id=venue_order_id)
    if kind is ReportedFilled:
        return ReportedFilled(ts_event=ts_event, venue_order_id=venue_order_id)
    if kind is Canceled:
        return Canceled(ts_event=ts_event, venue_order_id=venue_order_id)
    if kind is Rejected:
        return Rejected(ts_event=ts_event, reason=venue_status)
    return None


# ----------------------------------------------------------------------------- the table
class Rule(Enum):
    """A target that depends on the event, not only on the status."""

    #: Same status: the event is taken (a cancel request, a resend, a late trade).
    STAY = "stay"
    #: Filled when the filled quantity reaches the order's, else partially filled.
    BY_QTY = "by_qty"
    #: Failed once the event is at or past the order's deadline; before it, unchanged.
    FAILED_AFTER_DEADLINE = "failed_after_deadline"


@dataclass(frozen=True, slots=True)
class Refuse:
    """No transition: the verdict and why (``{status}`` is filled in)."""

    verdict: Verdict
    reason: str


Target: TypeAlias = LedgerStatus | Rule | Refuse

_ALREADY = Refuse(Verdict.DUPLICATE, "already {status}")
_NOT_RESENT = Refuse(Verdict.DUPLICATE, "already {status}; not resent")
_ANSWERED = Refuse(Verdict.STALE, "already {status}: the venue answered first")
_LATE = Refuse(Verdict.STALE, "late report: the order is already {status}")
_FILLS_DECIDE = Refuse(Verdict.STALE, "already {status}: its fills decide partially filled")
_FILLED_WINS = Refuse(Verdict.STALE, "filled is terminal: a later cancel changes nothing")
_HAD_IT = Refuse(Verdict.STALE, "the venue had the order ({status}); a query miss proves nothing")
_NOT_CANCELED = Refuse(
    Verdict.STALE, "the venue does not know the order (yet): not canceled, still {status}"
)
_CANNOT_CANCEL = Refuse(Verdict.ILLEGAL, "order is {status}")
_REJECT_AFTER = Refuse(Verdict.ILLEGAL, "order is {status}: a rejection cannot follow")

_P, _U, _A, _PF, _F, _C, _X = PENDING, UNKNOWN, ACCEPTED, PARTIALLY_FILLED, FILLED, CANCELED, FAILED
_E = EventKind

#: Every (status, event) -> target. The one table of the order's life.
TRANSITIONS: Final[Mapping[tuple[LedgerStatus, EventKind], Target]] = {
    # submitted: the first send, or a resend after a lookup found nothing
    (_P, _E.SUBMITTED): Rule.STAY,
    (_U, _E.SUBMITTED): Rule.STAY,
    (_A, _E.SUBMITTED): _NOT_RESENT,
    (_PF, _E.SUBMITTED): _NOT_RESENT,
    (_F, _E.SUBMITTED): _NOT_RESENT,
    (_C, _E.SUBMITTED): _NOT_RESENT,
    (_X, _E.SUBMITTED): _NOT_RESENT,
    # the send's outcome is unknown
    (_P, _E.SEND_UNKNOWN): _U,
    (_U, _E.SEND_UNKNOWN): _ALREADY,
    (_A, _E.SEND_UNKNOWN): _ANSWERED,
    (_PF, _E.SEND_UNKNOWN): _ANSWERED,
    (_F, _E.SEND_UNKNOWN): _ANSWERED,
    (_C, _E.SEND_UNKNOWN): _ANSWERED,
    (_X, _E.SEND_UNKNOWN): _ANSWERED,
    # the venue has it open
    (_P, _E.ACCEPTED): _A,
    (_U, _E.ACCEPTED): _A,
    (_A, _E.ACCEPTED): _ALREADY,
    (_PF, _E.ACCEPTED): _LATE,
    (_F, _E.ACCEPTED): _LATE,
    (_C, _E.ACCEPTED): _LATE,
    (_X, _E.ACCEPTED): _LATE,
    # the venue reports it partially filled
    (_P, _E.REPORTED_PARTIALLY_FILLED): _PF,
    (_U, _E.REPORTED_PARTIALLY_FILLED): _PF,
    (_A, _E.REPORTED_PARTIALLY_FILLED): _FILLS_DECIDE,
    (_PF, _E.REPORTED_PARTIALLY_FILLED): _ALREADY,
    (_F, _E.REPORTED_PARTIALLY_FILLED): _LATE,
    (_C, _E.REPORTED_PARTIALLY_FILLED): _LATE,
    (_X, _E.REPORTED_PARTIALLY_FILLED): _LATE,
    # a trade: counted in every status; it moves every status but filled and canceled
    (_P, _E.FILL): Rule.BY_QTY,
    (_U, _E.FILL): Rule.BY_QTY,
    (_A, _E.FILL): Rule.BY_QTY,
    (_PF, _E.FILL): Rule.BY_QTY,
    (_F, _E.FILL): Rule.STAY,
    (_C, _E.FILL): Rule.STAY,
    (_X, _E.FILL): Rule.BY_QTY,
    # the venue reports it filled
    (_P, _E.REPORTED_FILLED): _F,
    (_U, _E.REPORTED_FILLED): _F,
    (_A, _E.REPORTED_FILLED): _F,
    (_PF, _E.REPORTED_FILLED): _F,
    (_F, _E.REPORTED_FILLED): _ALREADY,
    (_C, _E.REPORTED_FILLED): _LATE,
    (_X, _E.REPORTED_FILLED): _LATE,
    # a cancel is about to be sent
    (_P, _E.CANCEL_REQUESTED): Rule.STAY,
    (_U, _E.CANCEL_REQUESTED): Rule.STAY,
    (_A, _E.CANCEL_REQUESTED): Rule.STAY,
    (_PF, _E.CANCEL_REQUESTED): Rule.STAY,
    (_F, _E.CANCEL_REQUESTED): _CANNOT_CANCEL,
    (_C, _E.CANCEL_REQUESTED): _ALREADY,
    (_X, _E.CANCEL_REQUESTED): _CANNOT_CANCEL,
    # the venue canceled or expired it
    (_P, _E.CANCELED): _C,
    (_U, _E.CANCELED): _C,
    (_A, _E.CANCELED): _C,
    (_PF, _E.CANCELED): _C,
    (_F, _E.CANCELED): _FILLED_WINS,
    (_C, _E.CANCELED): _ALREADY,
    (_X, _E.CANCELED): _LATE,
    # a cancel said "unknown order" and a query finds nothing
    (_P, _E.CANCEL_UNKNOWN_ORDER): _NOT_CANCELED,
    (_U, _E.CANCEL_UNKNOWN_ORDER): _NOT_CANCELED,
    (_A, _E.CANCEL_UNKNOWN_ORDER): _C,
    (_PF, _E.CANCEL_UNKNOWN_ORDER): _C,
    (_F, _E.CANCEL_UNKNOWN_ORDER): _FILLED_WINS,
    (_C, _E.CANCEL_UNKNOWN_ORDER): _ALREADY,
    (_X, _E.CANCEL_UNKNOWN_ORDER): _LATE,
    # the placement was refused
    (_P, _E.REJECTED): _X,
    (_U, _E.REJECTED): _X,
    (_A, _E.REJECTED): _REJECT_AFTER,
    (_PF, _E.REJECTED): _REJECT_AFTER,
    (_F, _E.REJECTED): _REJECT_AFTER,
    (_C, _E.REJECTED): _REJECT_AFTER,
    (_X, _E.REJECTED): _ALREADY,
    # a query says the order does not exist
    (_P, _E.NOT_FOUND): Rule.FAILED_AFTER_DEADLINE,
    (_U, _E.NOT_FOUND): Rule.FAILED_AFTER_DEADLINE,
    (_A, _E.NOT_FOUND): _HAD_IT,
    (_PF, _E.NOT_FOUND): _HAD_IT,
    (_F, _E.NOT_FOUND): _HAD_IT,
    (_C, _E.NOT_FOUND): _HAD_IT,
    (_X, _E.NOT_FOUND): _ALREADY,
}


# ----------------------------------------------------------------------------- applying
@dataclass(frozen=True, slots=True)
class Transition:
    """What :func:`apply` decided: the state after the event, and how it was taken."""

    previous: OrderState
    state: OrderState
    event: OrderEvent
    verdict: Verdict
    reason: str = ""

    @property
    def applied(self) -> bool:
        return self.verdict is Verdict.APPLIED

    @property
    def changed(self) -> bool:
        """The state differs from the one before in more than its time (a thing to write)."""
        return dataclasses.replace(self.state, ts_updated=self.previous.ts_updated) != (
            self.previous
        )

    @property
    def status_changed(self) -> bool:
        return self.state.status != self.previous.status


def _venue_id(state: OrderState, event: OrderEvent) -> str:
    """The venue's order id: the first one learned is kept."""
    return state.venue_order_id or getattr(event, "venue_order_id", "")


def _refused(state: OrderState, event: OrderEvent, verdict: Verdict, reason: str) -> Transition:
    """No transition. A venue order id the event carries is still learned: it is a fact
    about the order whatever its status, not a move of it."""
    venue_order_id = _venue_id(state, event)
    after = (
        state
        if venue_order_id == state.venue_order_id
        else dataclasses.replace(state, venue_order_id=venue_order_id)
    )
    return Transition(state, after, event, verdict, reason)


def _fill(state: OrderState, event: Fill, rule: Rule) -> Transition:
    if event.trade_id and event.trade_id in state.trade_ids:
        return _refused(state, event, Verdict.DUPLICATE, f"trade {event.trade_id} already counted")
    if event.cumulative_qty is not None:
        qty = event.cumulative_qty - state.filled_qty
        if qty <= ZERO:
            return _refused(
                state,
                event,
                Verdict.DUPLICATE,
                f"cumulative {event.cumulative_qty} already counted ({state.filled_qty})",
            )
    else:
        qty = event.qty
    if qty <= ZERO:
        return _refused(state, event, Verdict.ILLEGAL, f"a trade of {qty} is no trade")
    filled = state.filled_qty + qty
    status = state.status
    if rule is Rule.BY_QTY:
        status = FILLED if filled >= state.qty else PARTIALLY_FILLED
    notional = None if state.filled_notional is None else state.filled_notional + qty * event.price
    # every field named (not dataclasses.replace): a backtest applies one per fill
    after = OrderState(
        client_order_id=state.client_order_id,
        qty=state.qty,
        status=status,
        filled_qty=filled,
        filled_notional=notional,
        venue_order_id=_venue_id(state, event),
        deadline_ns=state.deadline_ns,
        ts_updated=event.ts_event,
        trade_ids=state.trade_ids | {event.trade_id} if event.trade_id else state.trade_ids,
    )
    reason = f"trade counted; the order stays {status}" if rule is Rule.STAY else ""
    return Transition(state, after, event, Verdict.APPLIED, reason)


def apply(state: OrderState, event: OrderEvent) -> Transition:
    """The one decision: what ``event`` does to ``state`` (see :data:`TRANSITIONS`)."""
    target = TRANSITIONS.get((state.status, event.kind))
    if target is None:  # a status outside the table (a row written by hand, say)
        return _refused(
            state, event, Verdict.ILLEGAL, f"no rule for {event.kind} when {state.status}"
        )
    if isinstance(target, Refuse):
        return _refused(state, event, target.verdict, target.reason.format(status=state.status))
    if isinstance(event, Fill):
        assert isinstance(target, Rule)
        return _fill(state, event, target)
    status: LedgerStatus = state.status
    reason = ""
    deadline = state.deadline_ns
    if target is Rule.FAILED_AFTER_DEADLINE:
        if event.ts_event < state.deadline_ns:
            return _refused(
                state,
                event,
                Verdict.STALE,
                f"not found before the deadline ({state.deadline_ns}): may still reach the venue",
            )
        status, reason = FAILED, "not found after the deadline: never reached the venue"
    elif isinstance(target, LedgerStatus):
        status = target
    if isinstance(event, Submitted):
        deadline = event.deadline_ns
    # every field named (not dataclasses.replace): a backtest applies several per order
    after = OrderState(
        client_order_id=state.client_order_id,
        qty=state.qty,
        status=status,
        filled_qty=state.filled_qty,
        filled_notional=state.filled_notional,
        venue_order_id=_venue_id(state, event),
        deadline_ns=deadline,
        ts_updated=event.ts_event,
        trade_ids=state.trade_ids,
    )
    return Transition(state, after, event, Verdict.APPLIED, reason)


def apply_all(
    state: OrderState, events: Iterable[OrderEvent]
) -> tuple[OrderState, list[Transition]]:
    """Apply events in order; the final state and every transition (for a driver's log)."""
    out: list[Transition] = []
    for event in events:
        t = apply(state, event)
        out.append(t)
        state = t.state
    return state, out
