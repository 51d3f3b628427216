from __future__ import annotations

from decimal import Decimal

import msgspec
import pytest

from gridstream.common import codec
from gridstream.common import messages as m

from .factories import ALL, candle, filled, tick


@pytest.mark.parametrize("factory", ALL, ids=lambda f: f.__name__)
def test_every_kind_round_trips_exactly(factory):
    msg = factory()
    back = codec.decode(codec.encode(msg))
    assert back == msg
    assert type(back) is type(msg)


def test_every_kind_has_a_factory_and_a_unique_stable_tag():
    kinds = {type(f()) for f in ALL}
    assert kinds == set(m.ALL_KINDS)
    tags = [k.__struct_config__.tag for k in m.ALL_KINDS]
    assert len(set(tags)) == len(tags)
    assert all(isinstance(t, str) and t for t in tags)


def test_decimal_precision_survives_the_wire():
    msg = tick(price=Decimal("0.000000012345678901234567890"), qty=Decimal("123456789.123456789"))
    back = codec.decode(codec.encode(msg))
    assert back.price == Decimal("0.000000012345678901234567890")
    assert str(back.qty) == "123456789.123456789"


def test_messages_are_frozen():
    msg = candle()
    with pytest.raises(AttributeError):
        msg.close = Decimal(1)  # type: ignore[misc]


def test_older_reader_decodes_a_newer_message():
    # A future writer adds fields with defaults (schema version 2) to Candle.
    class CandleV2(m.Message, frozen=True, kw_only=True, tag=m.Tags.CANDLE):
        symbol: str
        interval: str
        open_time: int
        close_time: int
        open: Decimal
        high: Decimal
        low: Decimal
        close: Decimal
        volume: Decimal
        quote_volume: Decimal = Decimal(0)
        trades: int = 0
        source: str = "ws"
        taker_buy_volume: Decimal = Decimal(0)
        venue_latency_ns: int = 0

    src = candle()
    newer = CandleV2(
        **{f: getattr(src, f) for f in src.__struct_fields__ if f != "v"},
        v=2,
        taker_buy_volume=Decimal("1.5"),
        venue_latency_ns=42,
    )
    payload = msgspec.msgpack.encode(newer)
    old = codec.decode(payload)
    assert isinstance(old, m.Candle)
    assert old.v == 2
    assert old.close == src.close and old.open_time == src.open_time


def test_newer_reader_decodes_an_older_message_without_new_fields():
    # An older writer did not know 'source' and 'trades' (defaults fill them in).
    raw = msgspec.msgpack.encode(
        {
            "kind": "candle",
            "id": "x",
            "ts_event": 1,
            "ts_init": 2,
            "symbol": "ETHUSDT",
            "interval": "1m",
            "open_time": 0,
            "close_time": 59_999,
            "open": "1",
            "high": "2",
            "low": "0.5",
            "close": "1.5",
            "volume": "10",
        }
    )
    msg = codec.decode(raw)
    assert isinstance(msg, m.Candle) and msg.trades == 0 and msg.source == "ws" and msg.v == 1


def test_garbage_and_unknown_kinds_raise_decode_errors():
    with pytest.raises(msgspec.DecodeError):
        codec.decode(b"\xc1\xc1")
    with pytest.raises(msgspec.ValidationError):
        codec.decode(msgspec.msgpack.encode({"kind": "nope", "id": "x"}))
    with pytest.raises(msgspec.ValidationError):
        codec.decode(msgspec.msgpack.encode({"kind": "tick", "id": "x", "ts_event": 1}))


def test_ids_are_unique_and_deterministic_ids_repeat():
    ids = {m.new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert m.deterministic_id("signal", "BTCUSDT", "1m", 5) == m.deterministic_id(
        "signal", "BTCUSDT", "1m", 5
    )


def test_json_form_keeps_decimals_as_strings():
    assert b'"price":"69900.00"' in codec.to_json(filled())
