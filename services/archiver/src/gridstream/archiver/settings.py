"""Archiver settings (env ``GS_ARCHIVE_DIR``, ``GS_FLUSH_ROWS``, ``GS_FLUSH_INTERVAL_S``)."""

from __future__ import annotations

from gridstream.common.settings import CommonSettings


class ArchiverSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where and how often the archiver writes Parquet files."""

    archive_dir: str = "./.data/archive"
    flush_rows: int = 10_000
    flush_interval_s: float = 60.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.flush_rows < 1:
            raise ValueError("GS_FLUSH_ROWS: must be >= 1")
        if self.flush_interval_s <= 0:
            raise ValueError("GS_FLUSH_INTERVAL_S: must be > 0")
        if not self.archive_dir.strip():
            raise ValueError("GS_ARCHIVE_DIR: must not be empty")
