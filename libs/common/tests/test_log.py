from __future__ import annotations

import json
import logging

from gridstream.common.log import JsonFormatter, TextFormatter, redact


def test_secrets_are_redacted_and_plain_urls_are_not():
    assert redact("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    assert "hunter2" not in redact("postgresql://app:hunter2@db:5432/gs")
    assert redact("GET /api/v3/order?symbol=BTCUSDT&signature=abcdef0123") == (
        "GET /api/v3/order?symbol=BTCUSDT&signature=***"
    )
    assert "k3y" not in redact("X-MBX-APIKEY: k3y")
    url = "ws://127.0.0.1:8900/stream?streams=btcusdt@trade/btcusdt@kline_1m"
    assert redact(url) == url


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("gridstream.test", logging.INFO, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_json_lines_carry_service_message_id_and_no_secret():
    line = JsonFormatter("executor").format(
        _record("placed via https://u:s3cret@h/x", message_id="abc-1")
    )
    data = json.loads(line)
    assert data["service"] == "executor"
    assert data["message_id"] == "abc-1"
    assert "s3cret" not in line


def test_text_lines_are_readable():
    line = TextFormatter("risk").format(_record("rejected", reason="NOTIONAL"))
    assert "rejected" in line
    assert "reason=NOTIONAL" in line
