"""Structured logging: JSON in containers, readable lines on a terminal; secrets redacted."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Final

_SECRET_RE: Final = re.compile(
    r"(?i)(signature=|api[_-]?secret[=:]\s*|api[_-]?key[=:]\s*|x-mbx-apikey[=:]\s*|password[=:]\s*)"
    r"[^&\s,'\"]+"
)
_URL_PW_RE: Final = re.compile(r"(://[^:/@\s]+:)[^@\s/]+@")

_RESERVED: Final = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message"}


def redact(text: str) -> str:
    """Remove signatures, keys and URL passwords from a string."""
    return _URL_PW_RE.sub(r"\1***@", _SECRET_RE.sub(r"\1***", text))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}"
            for k, v in record.__dict__.items()
            if k not in _RESERVED and not k.startswith("_")
        )
        line = super().format(record)
        return redact(f"{line} {extras}" if extras else line)


def setup(service: str, fmt: str = "auto", level: str = "INFO") -> None:
    """Configure the root logger once for a service process."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if use_json else TextFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("aiohttp.access", "websockets", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
