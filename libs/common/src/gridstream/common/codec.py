"""One msgpack encoder and one decoder for the whole wire union, built once."""

from __future__ import annotations

from typing import Final

import msgspec

from gridstream.common.messages import AnyMessage

#: The one stream-entry field that holds an encoded message.
FIELD: Final = b"m"

_encoder: Final = msgspec.msgpack.Encoder(decimal_format="string")
_decoder: Final = msgspec.msgpack.Decoder(AnyMessage)
_json_encoder: Final = msgspec.json.Encoder(decimal_format="string")

DecodeError = msgspec.DecodeError


def encode(msg: AnyMessage) -> bytes:
    """Encode one message for the wire."""
    return _encoder.encode(msg)


def decode(data: bytes) -> AnyMessage:
    """Decode one message; raises :class:`DecodeError` (or ValidationError) on bad input."""
    msg: AnyMessage = _decoder.decode(data)
    return msg


def to_json(msg: AnyMessage) -> bytes:
    """A human-readable JSON form of a message (used by ``gridstream tail``)."""
    return _json_encoder.encode(msg)
