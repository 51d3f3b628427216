"""``gridstream run``: the whole stack as local child processes (what ``make run`` calls).

1. Redis and Postgres: ``REDIS_URL`` / ``DATABASE_URL`` if set, else embedded Valkey and
   Postgres under ``<data-dir>`` (kept between runs). The database named in
   ``DATABASE_URL`` is created if missing (``gridstream`` for the embedded server) and
   migrated.
2. The simulator (unless ``GS_VENUE`` is not ``simulator``), then the services, each as
   ``python -m gridstream.<name>`` with its output prefixed by its name.
3. Supervision: a child that dies is reported loudly and started again after a capped,
   jittered exponential backoff (:mod:`gridstream.cli.supervise`); a child that keeps
   dying soon after each start is shown as a crash loop. Restarts are counted in
   ``gridstream_service_restarts_total{service}`` (served on the supervisor's metrics
   port) and each child's state is kept in Redis for ``gridstream status``. A child that
   exits with the invalid-configuration status (2) is not restarted: the stack stops, as
   it does on any death with ``--exit-on-failure`` (for CI and end-to-end runs).
4. Ports: every port a child will listen on is checked free before it starts, and a
   child counts as up only once its ``/healthz`` answers with the child's own pid, never
   because some other process answers on that port.
5. Ctrl-C / SIGTERM: SIGTERM to the services, wait, SIGKILL what is left, then the
   simulator, then the embedded servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

import aiohttp
import asyncpg
import psutil
import redis.asyncio as aioredis

from gridstream.common import db, embedded, metrics
from gridstream.common.runtime import EXIT_INVALID_CONFIG, HEARTBEAT_EVERY_S, redis_client
from gridstream.common.settings import env_name, redact_url
from gridstream.common.streams import Service, supervisor_key

from .common import ensure_database, with_database
from .supervise import Backoff, BackoffPolicy, ChildState, Phase, describe_exit, encode_state

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
#: The supervisor's own metrics port: right after the services' ports.
SUPERVISOR_PORT_OFFSET: Final = len(SERVICES)
#: How long a child may take to answer its health check with its own pid at start.
UP_WITHIN_S: Final = 120.0

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
                       and base + {SUPERVISOR_PORT_OFFSET} for the supervisor's own metrics
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


class SupervisorError(Exception):
    """The stack cannot go on: a port is taken, another process answers on a child's port."""

    def __init__(self, name: str, text: str) -> None:
        super().__init__(text)
        self.name = name


@dataclass
class Child:
    """One supervised service: its current process (if any) and its record."""

    name: str
    index: int
    port: int | None
    state: ChildState
    backoff: Backoff
    proc: asyncio.subprocess.Process | None = None
    pump: asyncio.Task[None] | None = None
    task: asyncio.Task[None] | None = None
    up: asyncio.Event = field(default_factory=asyncio.Event)
    expected_exit: bool = False
    started_at: float = 0.0


@dataclass
class RunOptions:
    services: tuple[str, ...] = ALL
    explicit: bool = False
    exit_on_failure: bool = False
    metrics_base_port: int = DEFAULT_METRICS_BASE
    sim_port: int = DEFAULT_SIM_PORT
    data_dir: Path = Path(".data")
    stop_timeout_s: float = 10.0
    backoff: BackoffPolicy = field(default_factory=BackoffPolicy)
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


def port_taken(host: str, port: int) -> str | None:
    """Why ``port`` cannot be bound on ``host`` (and by whom, when that can be found), or
    None when it is free. Binds the way the servers do (``SO_REUSEADDR``), so a port in
    TIME_WAIT after a child's death counts as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            owner = listener_of(port)
            who = f" by {owner}" if owner else ""
            return f"port {port} is taken{who} ({exc.strerror})"
    return None


def listener_of(port: int) -> str | None:
    """``pid 123 (python3)`` of the process listening on ``port``, when it can be seen."""
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid is None:
                    return "another process"
                with contextlib.suppress(psutil.Error):
                    return f"pid {conn.pid} ({psutil.Process(conn.pid).name()})"
                return f"pid {conn.pid}"
    return None


async def health_pid(session: aiohttp.ClientSession, name: str, host: str, port: int) -> int | None:
    """The pid that ``/healthz`` on ``host:port`` says it is, None while nothing answers.

    Raises :class:`SupervisorError` when something answers without a pid: not one of ours.
    """
    url = f"http://{host}:{port}{metrics.PATH_LIVE}"
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
            raw = await resp.read()
    except (TimeoutError, aiohttp.ClientError, OSError):
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        body = json.loads(text)
        return int(body[metrics.HEALTH_PID])
    except (ValueError, KeyError, TypeError):
        raise SupervisorError(
            name, f"something that is not a gridstream process answers on port {port}"
        ) from None


class Stack:
    """The running stack: embedded servers and supervised child processes."""

    def __init__(self, options: RunOptions, out: Output) -> None:
        self.o = options
        self.out = out
        self.servers: list[embedded.EmbeddedServer] = []
        self.children: list[Child] = []
        self.stop = asyncio.Event()
        self.failed: list[str] = []
        self.env: dict[str, str] = {}
        self.redis: aioredis.Redis | None = None
        self.http: aiohttp.ClientSession | None = None
        self._metrics_runner: Any = None
        self._redis_warned = False

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
            env["GS_METRICS_PORT"] = str(self.port_of(name))
        return env

    def host_of(self, name: str) -> str:
        """Where a child listens, as a client reaches it (any-address binds: loopback)."""
        var = "GS_SIM_HOST" if name == SIMULATOR else "GS_METRICS_HOST"
        host = (self.env.get(var) or SIM_HOST).strip()
        return SIM_HOST if host in ("0.0.0.0", "::", "") else host

    def port_of(self, name: str) -> int:
        if name == SIMULATOR:
            return self.o.sim_port
        return self.o.metrics_base_port + SERVICES.index(name)

    @property
    def supervisor_port(self) -> int:
        return self.o.metrics_base_port + SUPERVISOR_PORT_OFFSET

    @staticmethod
    def simulated_venue(env: dict[str, str]) -> bool:
        return env.get("GS_VENUE", SIMULATOR) == SIMULATOR

    def add_child(self, name: str) -> Child:
        state = ChildState(service=name, supervisor_pid=os.getpid())
        child = Child(name, ALL.index(name), self.port_of(name), state, Backoff(self.o.backoff))
        self.children.append(child)
        return child

    async def spawn(self, child: Child) -> None:
        host = self.host_of(child.name)
        why = port_taken(host, child.port) if child.port is not None else None
        if why is not None:
            raise SupervisorError(child.name, f"cannot start {child.name}: {why}")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            f"gridstream.{child.name}",
            env=self.child_env(self.env, child.name),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,  # we stop children ourselves, in order
            limit=_LINE_LIMIT,
        )
        child.proc = proc
        child.up.clear()
        child.started_at = time.monotonic()
        child.pump = asyncio.create_task(self._pump(child, proc), name=f"pump-{child.name}")
        st = child.state
        st.phase, st.pid, st.started_ns, st.next_start_ns = Phase.STARTING, proc.pid, None, None
        st.started_ns = time.time_ns()
        extra = f", metrics :{child.port}" if child.name in SERVICES else ""
        self.out.run(f"started {child.name} pid {proc.pid}{extra}")
        await self.publish(child)

    async def _pump(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line longer than the limit: take what is there
                raw = await proc.stdout.read(_LINE_LIMIT)
            if not raw:
                return
            self.out.line(child.name, raw.decode(errors="replace").rstrip("\n"), index=child.index)

    async def _confirm_up(self, child: Child, proc: asyncio.subprocess.Process) -> None:
        """Mark the child up once its health check answers with its own pid; a foreign pid
        on its port stops the stack. Then end its streak of quick deaths once it has been
        up ``stable_s``."""
        assert self.http is not None and child.port is not None
        while proc.returncode is None:
            pid = await health_pid(self.http, child.name, self.host_of(child.name), child.port)
            if pid == proc.pid:
                break
            if pid is not None:
                raise SupervisorError(
                    child.name,
                    f"{child.name} (pid {proc.pid}) is not the process answering on port "
                    f"{child.port}: pid {pid} is",
                )
            await asyncio.sleep(0.1)
        else:
            return
        child.state.phase = Phase.UP
        child.up.set()
        await self.publish(child)
        remaining = self.o.backoff.stable_s - (time.monotonic() - child.started_at)
        if remaining > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), remaining)
        if proc.returncode is None and child.backoff.stable():
            st = child.state
            st.streak, st.streak_since_ns, st.crash_loop = 0, None, False
            metrics.SERVICE_CRASH_LOOP.labels(child.name).set(0)
            self.out.run(f"{child.name} is stable again (up {self.o.backoff.stable_s:g}s)")
            await self.publish(child)

    async def supervise(self, child: Child) -> None:
        """Start the child, and start it again each time it dies, until the stack stops."""
        try:
            while not self.stop.is_set():
                await self.spawn(child)
                proc = child.proc
                assert proc is not None
                confirm = asyncio.create_task(self._confirm_up(child, proc))
                died = asyncio.create_task(proc.wait())
                try:
                    await asyncio.wait({confirm, died}, return_when=asyncio.FIRST_COMPLETED)
                    if confirm.done() and confirm.exception() is not None:
                        raise confirm.exception()  # type: ignore[misc]
                    code = await died
                finally:
                    for task in (confirm, died):
                        if not task.done():
                            task.cancel()
                            with contextlib.suppress(asyncio.CancelledError):
                                await task
                if child.expected_exit or self.stop.is_set():
                    return
                if child.pump is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(child.pump, 2)
                if not await self.after_death(child, proc, code):
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a supervisor that cannot watch a child stops the stack
            if not isinstance(exc, SupervisorError):
                exc = SupervisorError(child.name, f"supervising {child.name} failed: {exc!r}")
            self.out.run(f"!!! {exc} !!!", loud=True)
            child.state.phase, child.state.reason = Phase.FAILED, str(exc)
            await self.publish(child)
            if child.proc is not None and child.proc.returncode is None:
                child.expected_exit = True
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()
            self.fail(child.name)

    async def after_death(self, child: Child, proc: asyncio.subprocess.Process, code: int) -> bool:
        """Report a death; wait out the backoff. False: not restarted (the stack stops)."""
        uptime = time.monotonic() - child.started_at
        st = child.state
        st.last_exit_code, st.last_exit_ns, st.pid = code, time.time_ns(), None
        st.reason = describe_exit(code)
        self.out.run(
            f"!!! {child.name} (pid {proc.pid}) DIED with {describe_exit(code)} "
            f"after {uptime:.1f}s !!!",
            loud=True,
        )
        if code == EXIT_INVALID_CONFIG:
            st.phase, st.reason = Phase.FAILED, "invalid configuration (exit code 2)"
            self.out.run(
                f"{child.name} has an invalid configuration: restarting cannot help; stopping",
                loud=True,
            )
        elif self.o.exit_on_failure:
            st.phase = Phase.FAILED
            self.out.run("stopping the rest (--exit-on-failure)", loud=True)
        if st.phase == Phase.FAILED:
            await self.publish(child)
            self.fail(child.name)
            return False
        delay = child.backoff.next_delay(uptime)
        if child.backoff.streak == 1:
            st.streak_since_ns = st.last_exit_ns
        st.streak, st.crash_loop = child.backoff.streak, child.backoff.crash_loop
        st.phase, st.backoff_s = Phase.BACKOFF, round(delay, 3)
        st.next_start_ns = time.time_ns() + int(delay * 1e9)
        metrics.SERVICE_CRASH_LOOP.labels(child.name).set(1 if st.crash_loop else 0)
        loop_note = ""
        if st.crash_loop:
            loop_note = f"; CRASH LOOP: {st.streak} quick deaths in a row"
        self.out.run(
            f"restarting {child.name} in {delay:.1f}s (restart {st.restarts + 1}){loop_note}",
            loud=st.crash_loop,
        )
        await self.publish(child)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        if self.stop.is_set():
            return False
        st.restarts += 1
        metrics.SERVICE_RESTARTS.labels(child.name).inc()
        return True

    def fail(self, name: str) -> None:
        if name not in self.failed:
            self.failed.append(name)
        self.stop.set()

    # -- what status shows -----------------------------------------------------------------
    async def publish(self, child: Child) -> None:
        """Write the child's record to Redis (a Redis outage never stops supervision)."""
        if self.redis is None:
            return
        child.state.ts = time.time_ns()
        try:
            await self.redis.hset(supervisor_key(), child.name, encode_state(child.state))
            self._redis_warned = False
        except Exception as exc:  # supervision goes on without Redis
            if not self._redis_warned:
                self.out.run(f"cannot write the supervisor state to Redis: {exc}", loud=True)
                self._redis_warned = True

    async def _refresh(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stop.wait(), HEARTBEAT_EVERY_S)
            for child in self.children:
                await self.publish(child)

    # -- shutdown -------------------------------------------------------------------------
    async def stop_children(self, children: list[Child]) -> None:
        for c in children:
            c.expected_exit = True
        for c in children:
            if c.task is not None and not c.task.done():
                c.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await c.task
        alive = [c for c in children if c.proc is not None and c.proc.returncode is None]
        for c in alive:
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError):
                c.proc.send_signal(signal.SIGTERM)
        if alive:
            waits = [asyncio.create_task(c.proc.wait()) for c in alive if c.proc is not None]
            _done, pending = await asyncio.wait(waits, timeout=self.o.stop_timeout_s)
            for task in pending:
                task.cancel()
        for c in alive:
            assert c.proc is not None
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
            if c.state.phase != Phase.FAILED:
                c.state.phase, c.state.pid = Phase.STOPPED, None
            await self.publish(c)

    async def shutdown(self) -> None:
        services = [c for c in self.children if c.name != SIMULATOR]
        sims = [c for c in self.children if c.name == SIMULATOR]
        await self.stop_children(services)
        await self.stop_children(sims)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self.http is not None:
            await self.http.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await self.redis.aclose()
        for server in reversed(self.servers):
            await asyncio.to_thread(server.stop)
            self.out.run(f"embedded {server.name} stopped")
        self.servers.clear()

    # -- all together -----------------------------------------------------------------------
    def check_ports(self, names: list[str]) -> None:
        """Every port the stack will listen on must be free before anything starts."""
        wanted = [(n, self.host_of(n), self.port_of(n)) for n in names]
        wanted.append(("the supervisor's metrics", SIM_HOST, self.supervisor_port))
        for name, host, port in wanted:
            why = port_taken(host, port)
            if why is not None:
                raise SupervisorError(name, f"cannot start {name}: {why}")

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        refresh: asyncio.Task[None] | None = None
        try:
            self.env = env = await self.start_dependencies()
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
            try:
                self.check_ports(names)
            except SupervisorError as exc:
                self.out.run(f"!!! {exc} !!!", loud=True)
                self.failed.append(exc.name)
                return 1
            self.redis = redis_client(env[env_name("redis_url")])
            with contextlib.suppress(Exception):
                await self.redis.delete(supervisor_key())
            self.http = aiohttp.ClientSession()
            self._metrics_runner, port = await metrics.serve(
                SIM_HOST, self.supervisor_port, registry=metrics.SUPERVISOR_REGISTRY
            )
            self.out.run(f"supervisor metrics on http://{SIM_HOST}:{port}{metrics.PATH_METRICS}")
            refresh = asyncio.create_task(self._refresh(), name="supervisor-state")
            for n in names:
                if self.stop.is_set():
                    break
                child = self.add_child(n)
                metrics.SERVICE_RESTARTS.labels(n)
                metrics.SERVICE_CRASH_LOOP.labels(n).set(0)
                child.task = asyncio.create_task(self.supervise(child), name=f"supervise-{n}")
                if n == SIMULATOR:
                    # the services need the venue: wait until it is up (its own pid answers)
                    await self.wait_up(child)
            if not self.stop.is_set():
                self.out.run(f"running {', '.join(names) or 'nothing'}; Ctrl-C stops everything")
            await self.stop.wait()
            self.out.run("stopping")
        finally:
            if refresh is not None:
                refresh.cancel()
            await self.shutdown()
        if self.failed:
            self.out.run(f"failed: {', '.join(self.failed)}", loud=True)
            return 1
        self.out.run("all stopped")
        return 0

    async def wait_up(self, child: Child) -> None:
        stop = asyncio.create_task(self.stop.wait())
        up = asyncio.create_task(child.up.wait())
        done, _ = await asyncio.wait({stop, up}, timeout=UP_WITHIN_S, return_when="FIRST_COMPLETED")
        for t in (stop, up):
            t.cancel()
        if not done:
            self.out.run(
                f"{child.name} did not answer on port {child.port} within {UP_WITHIN_S:g}s",
                loud=True,
            )
            self.fail(child.name)


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
