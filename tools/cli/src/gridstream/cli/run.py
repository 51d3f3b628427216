"""``gridstream run``: the whole stack as local child processes (what ``make run`` calls).

1. Redis and Postgres: ``REDIS_URL`` / ``DATABASE_URL`` if set, else embedded Valkey and
   Postgres under ``<data-dir>`` (kept between runs). The database named in
   ``DATABASE_URL`` is created if missing (``gridstream`` for the embedded server) and
   migrated.
2. The simulator (unless ``GS_VENUE`` is not ``simulator``), then the services, each as
   ``python -m gridstream.<name>`` with its output prefixed by its name.
3. Ctrl-C / SIGTERM: SIGTERM to the services, wait, SIGKILL what is left, then the
   simulator, then the embedded servers. A child that dies is reported loudly and,
   with ``--exit-on-failure`` (the default), stops the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, TextIO

import asyncpg

from gridstream.common import db, embedded
from gridstream.common.settings import env_name, redact_url
from gridstream.common.streams import Service

from .common import ensure_database, with_database

SIMULATOR: Final = Service.SIMULATOR.value
#: The services in pipeline order; metrics port = base + index.
SERVICES: Final = (
    Service.INGESTOR.value,
    Service.SIGNALS.value,
    Service.STRATEGY.value,
    Service.RISK.value,
    Service.EXECUTOR.value,
    Service.ARCHIVER.value,
)
ALL: Final = (SIMULATOR, *SERVICES)
EMBEDDED_DATABASE: Final = "gridstream"
DEFAULT_SIM_PORT: Final = 8900
DEFAULT_METRICS_BASE: Final = 9101
SIM_HOST: Final = "127.0.0.1"
#: Replay defaults for a watchable local run: one day of history served over REST for
#: warm-up, then the replay at 60x so signals, orders and fills show within a minute.
DEFAULT_SIM_SPEED: Final = "60"
DEFAULT_SIM_HISTORY_HOURS: Final = "24"

ENV_HELP: Final = f"""\
environment passed to every child:
  REDIS_URL            as given, else the embedded Valkey's URL
  DATABASE_URL         as given (its database created if missing), else the
                       embedded Postgres' database '{EMBEDDED_DATABASE}'
  GS_VENUE_REST_URL    http://{SIM_HOST}:<sim port>   (only when GS_VENUE=simulator, the default)
  GS_VENUE_WS_URL      ws://{SIM_HOST}:<sim port>     (idem)
  GS_SIM_PORT          the simulator's port (--sim-port, default $GS_SIM_PORT or {DEFAULT_SIM_PORT})
  GS_METRICS_PORT      per service: base + index; with the default base {DEFAULT_METRICS_BASE}:
                       ingestor {DEFAULT_METRICS_BASE}, signals {DEFAULT_METRICS_BASE + 1}, \
strategy {DEFAULT_METRICS_BASE + 2},
                       risk {DEFAULT_METRICS_BASE + 3}, executor {DEFAULT_METRICS_BASE + 4}, \
archiver {DEFAULT_METRICS_BASE + 5}
  GS_LOG_FORMAT        text
  PYTHONUNBUFFERED     1
  GS_SIM_SPEED         {DEFAULT_SIM_SPEED} unless set (a replayed hour takes a minute)
  GS_SIM_HISTORY_HOURS {DEFAULT_SIM_HISTORY_HOURS} unless set (history served for warm-up)
every other variable of this shell (GS_SYMBOLS, GS_MODE, GS_SIM_SPEED, ...) is passed
through unchanged.

services: {", ".join(ALL)}
"""

_COLOURS: Final = ("36", "33", "35", "32", "34", "31", "96", "93")
_LINE_LIMIT: Final = 1 << 20


class Output:
    """Writes prefixed lines to a terminal or a pipe."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.colour = stream.isatty()
        self.width = max(len(n) for n in (*ALL, "run"))

    def line(self, name: str, text: str, *, index: int = -1, loud: bool = False) -> None:
        prefix = f"{name:<{self.width}} |"
        if self.colour:
            code = "1;31" if loud else (_COLOURS[index % len(_COLOURS)] if index >= 0 else "1")
            prefix = f"\x1b[{code}m{prefix}\x1b[0m"
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.stream.write(f"{prefix} {text}\n")
            self.stream.flush()

    def run(self, text: str, *, loud: bool = False) -> None:
        self.line("run", text, loud=loud)


@dataclass
class Child:
    name: str
    index: int
    proc: asyncio.subprocess.Process
    pump: asyncio.Task[None] | None = None
    watch: asyncio.Task[None] | None = None
    expected_exit: bool = False


@dataclass
class RunOptions:
    services: tuple[str, ...] = ALL
    explicit: bool = False
    exit_on_failure: bool = True
    metrics_base_port: int = DEFAULT_METRICS_BASE
    sim_port: int = DEFAULT_SIM_PORT
    data_dir: Path = Path(".data")
    stop_timeout_s: float = 10.0
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))


def parse_services(text: str | None) -> tuple[tuple[str, ...], bool]:
    """``--services a,b`` -> (names in stack order, explicit?)."""
    if not text:
        return ALL, False
    wanted = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in ALL]
    if unknown:
        raise ValueError(f"unknown service(s): {', '.join(unknown)} (known: {', '.join(ALL)})")
    return tuple(n for n in ALL if n in wanted), True


def module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(f"gridstream.{name}.__main__") is not None
    except ModuleNotFoundError:
        return False


class Stack:
    """The running stack: embedded servers and child processes."""

    def __init__(self, options: RunOptions, out: Output) -> None:
        self.o = options
        self.out = out
        self.servers: list[embedded.EmbeddedServer] = []
        self.children: list[Child] = []
        self.stop = asyncio.Event()
        self.failed: list[str] = []

    # -- dependencies -------------------------------------------------------------------
    async def start_dependencies(self) -> dict[str, str]:
        env = dict(self.o.env)
        redis_var, db_var = env_name("redis_url"), env_name("database_url")
        data = self.o.data_dir.resolve()
        if not env.get(redis_var):
            server = await asyncio.to_thread(embedded.start_valkey, data / "valkey")
            self.servers.append(server)
            env[redis_var] = server.url
            self.out.run(f"embedded valkey on port {server.port} (data in {server.data_dir})")
        if not env.get(db_var):
            server = await asyncio.to_thread(embedded.start_postgres, data / "postgres")
            self.servers.append(server)
            env[db_var] = with_database(server.url, EMBEDDED_DATABASE)
            self.out.run(f"embedded postgres on port {server.port} (data in {server.data_dir})")
        if await ensure_database(env[db_var]):
            self.out.run(f"created database {env[db_var].rsplit('/', 1)[-1]}")
        conn = await asyncpg.connect(env[db_var])
        try:
            applied = await db.migrate(conn)
        finally:
            await conn.close()
        if applied:
            self.out.run(f"applied migrations: {', '.join(applied)}")
        self.out.run(f"REDIS_URL={_redact(env[redis_var])}")
        self.out.run(f"DATABASE_URL={_redact(env[db_var])}")
        return env

    # -- children -------------------------------------------------------------------------
    def child_env(self, base: dict[str, str], name: str) -> dict[str, str]:
        env = dict(base)
        env["GS_LOG_FORMAT"] = "text"
        env["PYTHONUNBUFFERED"] = "1"
        env["GS_SIM_PORT"] = str(self.o.sim_port)
        env.setdefault("GS_SIM_SPEED", DEFAULT_SIM_SPEED)
        env.setdefault("GS_SIM_HISTORY_HOURS", DEFAULT_SIM_HISTORY_HOURS)
        if self.simulated_venue(base):
            env["GS_VENUE_REST_URL"] = f"http://{SIM_HOST}:{self.o.sim_port}"
            env["GS_VENUE_WS_URL"] = f"ws://{SIM_HOST}:{self.o.sim_port}"
        if name in SERVICES:
            env["GS_METRICS_PORT"] = str(self.o.metrics_base_port + SERVICES.index(name))
        return env

    @staticmethod
    def simulated_venue(env: dict[str, str]) -> bool:
        return env.get("GS_VENUE", SIMULATOR) == SIMULATOR

    async def spawn(self, name: str, env: dict[str, str]) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"gridstream.{name}",
            env=self.child_env(env, name),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # we stop children ourselves, in order
            limit=_LINE_LIMIT,
        )
        child = Child(name, ALL.index(name), proc)
        child.pump = asyncio.create_task(self._pump(child), name=f"pump-{name}")
        self.children.append(child)
        extra = ""
        if name in SERVICES:
            extra = f", metrics :{self.o.metrics_base_port + SERVICES.index(name)}"
        self.out.run(f"started {name} pid {proc.pid}{extra}")
        child.watch = asyncio.create_task(self._watch(child), name=f"watch-{name}")
        return child

    async def _pump(self, child: Child) -> None:
        assert child.proc.stdout is not None
        while True:
            try:
                raw = await child.proc.stdout.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await child.proc.stdout.read(_LINE_LIMIT)
            if not raw:
                return
            self.out.line(child.name, raw.decode(errors="replace").rstrip("\n"), index=child.index)

    async def _watch(self, child: Child) -> None:
        code = await child.proc.wait()
        if child.expected_exit or self.stop.is_set():
            return
        if child.pump is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(child.pump, 2)
        self.failed.append(child.name)
        self.out.run(
            f"!!! {child.name} (pid {child.proc.pid}) DIED with exit code {code} !!!", loud=True
        )
        if self.o.exit_on_failure:
            self.out.run("stopping the rest (--exit-on-failure)", loud=True)
            self.stop.set()

    async def wait_for_port(self, port: int, child: Child, within_s: float = 60.0) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline and not self.stop.is_set():
            if child.proc.returncode is not None:
                return False
            try:
                _r, w = await asyncio.open_connection(SIM_HOST, port)
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()
                return True
            except OSError:
                await asyncio.sleep(0.1)
        return False

    # -- shutdown -------------------------------------------------------------------------
    async def stop_children(self, children: list[Child]) -> None:
        alive = [c for c in children if c.proc.returncode is None]
        for c in alive:
            c.expected_exit = True
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        if alive:
            done, pending = await asyncio.wait(
                [asyncio.create_task(c.proc.wait()) for c in alive], timeout=self.o.stop_timeout_s
            )
            del done
            for task in pending:
                task.cancel()
        for c in alive:
            if c.proc.returncode is None:
                self.out.run(
                    f"{c.name} did not stop in {self.o.stop_timeout_s}s: SIGKILL", loud=True
                )
                with contextlib.suppress(ProcessLookupError):
                    c.proc.kill()
                await c.proc.wait()
            else:
                self.out.run(f"{c.name} stopped (exit code {c.proc.returncode})")
        for c in children:
            if c.pump is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(c.pump, 5)

    async def shutdown(self) -> None:
        services = [c for c in self.children if c.name != SIMULATOR]
        sims = [c for c in self.children if c.name == SIMULATOR]
        await self.stop_children(services)
        await self.stop_children(sims)
        for server in reversed(self.servers):
            await asyncio.to_thread(server.stop)
            self.out.run(f"embedded {server.name} stopped")
        self.servers.clear()

    # -- all together -----------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        try:
            env = await self.start_dependencies()
            names = list(self.o.services)
            if SIMULATOR in names and not self.simulated_venue(env):
                self.out.run(f"GS_VENUE={env.get('GS_VENUE')}: not starting the simulator")
                names.remove(SIMULATOR)
            missing = [n for n in names if not module_exists(n)]
            if missing and self.o.explicit:
                self.out.run(f"no such service module: {', '.join(missing)}", loud=True)
                return 2
            for n in missing:
                self.out.run(f"gridstream.{n} is not installed yet: skipping it", loud=True)
                names.remove(n)
            if SIMULATOR in names and not self.stop.is_set():
                sim = await self.spawn(SIMULATOR, env)
                if not await self.wait_for_port(self.o.sim_port, sim) and not self.stop.is_set():
                    self.out.run(
                        f"the simulator does not listen on port {self.o.sim_port}", loud=True
                    )
                    if SIMULATOR not in self.failed:
                        self.failed.append(SIMULATOR)
                    self.stop.set()
            for n in names:
                if n != SIMULATOR and not self.stop.is_set():
                    await self.spawn(n, env)
            if not self.stop.is_set():
                self.out.run(f"running {', '.join(names) or 'nothing'}; Ctrl-C stops everything")
            await self.stop.wait()
            self.out.run("stopping")
        finally:
            await self.shutdown()
        if self.failed:
            self.out.run(f"failed: {', '.join(self.failed)}", loud=True)
            return 1
        self.out.run("all stopped")
        return 0


def _redact(url: str) -> str:
    return redact_url(url)


def run(options: RunOptions, stream: TextIO | None = None) -> int:
    """Run the stack until Ctrl-C / SIGTERM or a child fails; returns the exit code."""
    out = Output(stream or sys.stdout)
    try:
        return asyncio.run(Stack(options, out).run())
    except (embedded.EmbeddedError, OSError, asyncpg.PostgresError) as exc:
        out.run(f"cannot start the stack: {type(exc).__name__}: {exc}", loud=True)
        return 1
