"""Small helpers shared by the subcommands."""

from __future__ import annotations

import os
import re
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gridstream.common.settings import CommonSettings, env_name

_DB_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def redis_url() -> str:
    """``REDIS_URL``, or the default every service uses."""
    return os.environ.get(env_name("redis_url")) or CommonSettings().redis_url


def database_url() -> str:
    """``DATABASE_URL``, or the default every service uses."""
    return os.environ.get(env_name("database_url")) or CommonSettings().database_url


def s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def with_database(url: str, name: str) -> str:
    """The same server URL pointing at another database."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def database_name(url: str) -> str:
    return urlsplit(url).path.lstrip("/") or "postgres"


async def ensure_database(url: str) -> bool:
    """Create the database ``url`` names if it does not exist; True if it was created."""
    name = database_name(url)
    if not _DB_NAME.match(name):
        raise ValueError(f"refusing to create a database with the name {name!r}")
    conn = await asyncpg.connect(with_database(url, "postgres"))
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        except asyncpg.DuplicateDatabaseError:
            return False
        return True
    finally:
        await conn.close()
