"""The order state machine: every rule of its table, unknown outcomes, late and repeated events."""

from __future__ import annotations

import itertools
from decimal import Decimal as D

import pytest

from gridstream.common.binance.statuses import VenueStatus
from gridstream.common.ledger import LedgerStatus as S
from gridstream.core import orders as o

QTY = D("1")
DEADLINE = 1_000
AFTER = DEADLINE + 1


def state(status: S = S.PENDING, filled: str = "0", **kw: object) -> o.OrderState:
    """An order of QTY with a deadline at DEADLINE, in ``status``."""
    base = o.submit("c-1", QTY, ts_event=0, deadline_ns=DEADLINE)
    fields: dict[str, object] = {"status": status, "filled_qty": D(filled), **kw}
    return o.OrderState(**{**_fields(base), **fields})  # type: ignore[arg-type]


def _fields(s: o.OrderState) -> dict[str, object]:
    return {f: getattr(s, f) for f in o.OrderState.__dataclass_fields__}


def fill(qty: str, price: str = "100", trade_id: str = "", ts: int = 10, **kw: object) -> o.Fill:
    return o.Fill(ts_event=ts, qty=D(qty), price=D(price), trade_id=trade_id, **kw)  # type: ignore[arg-type]


#: One event of each kind, as the table test applies them (the fill: 0.4 of 1).
EVENTS: dict[o.EventKind, o.OrderEvent] = {
    o.EventKind.SUBMITTED: o.Submitted(ts_event=AFTER, deadline_ns=AFTER + DEADLINE),
    o.EventKind.SEND_UNKNOWN: o.SendUnknown(ts_event=AFTER),
    o.EventKind.ACCEPTED: o.Accepted(ts_event=AFTER, venue_order_id="v-1"),
    o.EventKind.REPORTED_PARTIALLY_FILLED: o.ReportedPartiallyFilled(ts_event=AFTER),
    o.EventKind.FILL: fill("0.4", trade_id="t-1", ts=AFTER),
    o.EventKind.REPORTED_FILLED: o.ReportedFilled(ts_event=AFTER),
    o.EventKind.CANCEL_REQUESTED: o.CancelRequested(ts_event=AFTER),
    o.EventKind.CANCELED: o.Canceled(ts_event=AFTER),
    o.EventKind.CANCEL_UNKNOWN_ORDER: o.CancelUnknownOrder(ts_event=AFTER),
    o.EventKind.REJECTED: o.Rejected(ts_event=AFTER, reason="-2010 insufficient balance"),
    o.EventKind.NOT_FOUND: o.NotFound(ts_event=AFTER),
}

# The table, written out again by hand: a status is where the order goes (applied), "="
# means applied with the status kept, "dup"/"stale"/"illegal" a refusal of that verdict.
COLUMNS = (S.PENDING, S.UNKNOWN, S.ACCEPTED, S.PARTIALLY_FILLED, S.FILLED, S.CANCELED, S.FAILED)
P, U, A, PF, F, C, X = COLUMNS
EXPECTED: dict[o.EventKind, tuple[object, ...]] = {
    o.EventKind.SUBMITTED: ("=", "=", "dup", "dup", "dup", "dup", "dup"),
    o.EventKind.SEND_UNKNOWN: (U, "dup", "stale", "stale", "stale", "stale", "stale"),
    o.EventKind.ACCEPTED: (A, A, "dup", "stale", "stale", "stale", "stale"),
    o.EventKind.REPORTED_PARTIALLY_FILLED: (PF, PF, "stale", "dup", "stale", "stale", "stale"),
    o.EventKind.FILL: (PF, PF, PF, PF, "=", "=", PF),
    o.EventKind.REPORTED_FILLED: (F, F, F, F, "dup", "stale", "stale"),
    o.EventKind.CANCEL_REQUESTED: ("=", "=", "=", "=", "illegal", "dup", "illegal"),
    o.EventKind.CANCELED: (C, C, C, C, "stale", "dup", "stale"),
    o.EventKind.CANCEL_UNKNOWN_ORDER: ("stale", "stale", C, C, "stale", "dup", "stale"),
    o.EventKind.REJECTED: (X, X, "illegal", "illegal", "illegal", "illegal", "dup"),
    o.EventKind.NOT_FOUND: (X, X, "stale", "stale", "stale", "stale", "dup"),
}
VERDICTS = {"dup": o.Verdict.DUPLICATE, "stale": o.Verdict.STALE, "illegal": o.Verdict.ILLEGAL}
CASES = [
    pytest.param(kind, status, want, id=f"{status}-{kind}")
    for kind, row in EXPECTED.items()
    for status, want in zip(COLUMNS, row, strict=True)
]


def test_the_table_has_a_rule_for_every_status_and_event() -> None:
    assert set(o.TRANSITIONS) == set(itertools.product(S, o.EventKind))
    assert set(EXPECTED) == set(o.EventKind) == set(EVENTS)


@pytest.mark.parametrize(("kind", "status", "want"), CASES)
def test_every_transition_of_the_table(kind: o.EventKind, status: S, want: object) -> None:
    before = state(status)
    t = o.apply(before, EVENTS[kind])
    assert t.previous == before
    if want in VERDICTS:
        assert t.verdict is VERDICTS[str(want)]
        assert not t.applied
        assert t.state.status == status
        assert t.state.filled_qty == before.filled_qty
        assert t.reason  # a refusal always says why
    else:
        assert t.verdict is o.Verdict.APPLIED
        assert t.state.status == (status if want == "=" else want)
        assert t.state.ts_updated == AFTER


def test_unknown_outcome_resolved_by_not_found_only_after_the_deadline() -> None:
    s = o.submit("c-1", QTY, ts_event=0, deadline_ns=DEADLINE)
    s = o.apply(s, o.SendUnknown(ts_event=5)).state
    assert s.status == S.UNKNOWN and s.is_unresolved
    early = o.apply(s, o.NotFound(ts_event=DEADLINE - 1))
    assert early.verdict is o.Verdict.STALE
    assert early.state == s
    assert "deadline" in early.reason
    on_time = o.apply(s, o.NotFound(ts_event=DEADLINE))
    assert on_time.applied
    assert on_time.state.status == S.FAILED and on_time.state.is_terminal


def test_unknown_outcome_resolved_by_what_the_venue_reports() -> None:
    s = o.apply(state(), o.SendUnknown(ts_event=5)).state
    found = o.venue_report(VenueStatus.NEW, ts_event=6, venue_order_id="v-9")
    assert isinstance(found, o.Accepted)
    t = o.apply(s, found)
    assert (t.state.status, t.state.venue_order_id) == (S.ACCEPTED, "v-9")
    filled = o.venue_report(VenueStatus.FILLED, ts_event=6)
    assert filled is not None
    assert o.apply(s, filled).state.status == S.FILLED


def test_a_resend_moves_the_deadline() -> None:
    s = o.apply(state(S.UNKNOWN), o.Submitted(ts_event=5_000, deadline_ns=6_000)).state
    assert (s.status, s.deadline_ns) == (S.UNKNOWN, 6_000)
    assert o.apply(s, o.NotFound(ts_event=AFTER)).verdict is o.Verdict.STALE
    assert o.apply(s, o.NotFound(ts_event=6_000)).state.status == S.FAILED


def test_venue_statuses_map_to_events() -> None:
    want = {
        VenueStatus.NEW: o.Accepted,
        VenueStatus.PENDING_CANCEL: o.Accepted,
        VenueStatus.PARTIALLY_FILLED: o.ReportedPartiallyFilled,
        VenueStatus.FILLED: o.ReportedFilled,
        VenueStatus.CANCELED: o.Canceled,
        VenueStatus.EXPIRED: o.Canceled,
        VenueStatus.EXPIRED_IN_MATCH: o.Canceled,
        VenueStatus.REJECTED: o.Rejected,
    }
    assert set(want) == set(VenueStatus)
    for status, kind in want.items():
        assert type(o.venue_report(status, ts_event=1)) is kind
    assert o.venue_report("SOMETHING_NEW", ts_event=1) is None


def test_partial_fills_sum_to_filled_with_the_average_price() -> None:
    s = state(S.ACCEPTED)
    s, ts = o.apply_all(
        s,
        [
            fill("0.3", "100", "t-1"),
            fill("0.3", "101", "t-2"),
            fill("0.4", "102", "t-3"),
        ],
    )
    assert [t.state.status for t in ts] == [S.PARTIALLY_FILLED, S.PARTIALLY_FILLED, S.FILLED]
    assert s.filled_qty == QTY
    assert s.remaining_qty == 0
    assert s.avg_price == D("101.1")  # (30 + 30.3 + 40.8) / 1
    assert s.trade_ids == {"t-1", "t-2", "t-3"}


def test_a_fill_seen_twice_counts_once() -> None:
    s = o.apply(state(S.ACCEPTED), fill("0.4", trade_id="t-1")).state
    again = o.apply(s, fill("0.4", trade_id="t-1"))
    assert again.verdict is o.Verdict.DUPLICATE
    assert "t-1" in again.reason
    assert again.state.filled_qty == D("0.4")
    assert not again.changed


def test_fills_by_cumulative_quantity() -> None:
    s = state(S.ACCEPTED)
    s = o.apply(s, fill("0.3", "100", "t-1", cumulative_qty=D("0.3"))).state
    repeat = o.apply(s, fill("0.3", "100", cumulative_qty=D("0.3")))
    assert repeat.verdict is o.Verdict.DUPLICATE and repeat.state.filled_qty == D("0.3")
    # the cumulative decides, whatever the trade's own qty says
    s = o.apply(s, fill("0.1", "110", "t-2", cumulative_qty=D("1"))).state
    assert (s.status, s.filled_qty) == (S.FILLED, QTY)
    assert s.avg_price == D("107")  # 0.3 @ 100 + 0.7 @ 110


def test_a_fill_after_a_cancel_request_and_after_canceled_is_counted() -> None:
    s = o.apply(state(), o.Accepted(ts_event=1, venue_order_id="v-1")).state
    asked = o.apply(s, o.CancelRequested(ts_event=2))
    assert asked.applied and not asked.changed  # nothing to write: the request goes out
    # the venue matched part of it before the cancel arrived
    s = o.apply(s, fill("0.25", "100", "t-1", ts=3)).state
    assert s.status == S.PARTIALLY_FILLED
    s = o.apply(s, o.Canceled(ts_event=4)).state
    assert s.status == S.CANCELED
    # a trade reported after CANCELED happened before it: counted, still canceled
    late = o.apply(s, fill("0.25", "100", "t-2", ts=5))
    assert late.applied
    assert (late.state.status, late.state.filled_qty) == (S.CANCELED, D("0.5"))


def test_filled_wins_over_a_later_canceled() -> None:
    s = o.apply(state(S.ACCEPTED), fill("1", trade_id="t-1")).state
    assert s.status == S.FILLED
    late = o.apply(s, o.Canceled(ts_event=20))
    assert late.verdict is o.Verdict.STALE
    assert late.state.status == S.FILLED
    assert "terminal" in late.reason
    # and a trade that arrives after the venue said FILLED keeps it filled
    s = o.apply(state(S.ACCEPTED), o.ReportedFilled(ts_event=1)).state
    s = o.apply(s, fill("0.5", trade_id="t-1")).state
    assert (s.status, s.filled_qty) == (S.FILLED, D("0.5"))


def test_a_fill_of_an_order_failed_for_not_being_found_revives_it() -> None:
    s = o.apply(state(S.UNKNOWN), o.NotFound(ts_event=AFTER)).state
    assert s.status == S.FAILED
    s = o.apply(s, fill("1", trade_id="t-1")).state
    assert s.status == S.FILLED


def test_illegal_transitions_are_refused_with_a_reason() -> None:
    filled = state(S.FILLED, "1")
    t = o.apply(filled, o.CancelRequested(ts_event=5))
    assert (t.verdict, t.reason, t.state) == (o.Verdict.ILLEGAL, "order is filled", filled)
    t = o.apply(state(S.ACCEPTED), o.Rejected(ts_event=5))
    assert t.verdict is o.Verdict.ILLEGAL and t.state.status == S.ACCEPTED
    assert "rejection" in t.reason
    t = o.apply(state(S.ACCEPTED), fill("0"))
    assert t.verdict is o.Verdict.ILLEGAL and t.state.filled_qty == 0


def test_a_refused_event_still_teaches_the_venue_order_id() -> None:
    s = state(S.PARTIALLY_FILLED, "0.5")
    t = o.apply(s, o.Accepted(ts_event=5, venue_order_id="v-7"))
    assert t.verdict is o.Verdict.STALE
    assert (t.state.status, t.state.venue_order_id) == (S.PARTIALLY_FILLED, "v-7")
    assert t.changed
    # the first id learned is kept
    assert o.apply(t.state, o.Canceled(ts_event=6, venue_order_id="v-8")).state.venue_order_id == (
        "v-7"
    )


def test_an_unknown_average_price_stays_unknown() -> None:
    s = state(S.ACCEPTED, "0.5", filled_notional=None)
    s = o.apply(s, fill("0.5", "100")).state
    assert s.status == S.FILLED and s.avg_price is None
