"""Where archive files go: a small ``Store`` interface and its local-folder implementation.

An object store (S3 / MinIO / R2 through boto3) comes later as a second implementation
of the same four methods; ``put`` must be atomic and durable when it returns.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Protocol


class Store(Protocol):
    """A flat key -> bytes store with ``/``-separated keys."""

    def put(self, key: str, data: bytes) -> None:
        """Write ``data`` under ``key`` atomically and durably (replacing any old value)."""

    def get(self, key: str) -> bytes:
        """The bytes under ``key`` (``KeyError`` if missing)."""

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds a value."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted."""


class LocalStore:
    """Files under a root folder; ``put`` = temp file + fsync + rename + fsync(dir)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        if not self.root.exists():
            return []
        out = []
        for path in self.root.rglob("*"):
            if path.is_file() and not path.name.startswith("."):
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    out.append(key)
        return sorted(out)
