"""The kernel is pure: no I/O clients imported, no clock read, nothing random.

Every module of ``gridstream.core`` is imported in a fresh interpreter, which must then
hold none of the Redis, Postgres, HTTP, websocket or S3 client packages; and the source
is read for clock reads (``time``, ``datetime.now``, ``new_id``), randomness and
environment access, which would make a replay differ from the run it replays.
"""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import gridstream.core

CORE = Path(gridstream.core.__file__).resolve().parent
FORBIDDEN_PACKAGES = (
    "redis",
    "asyncpg",
    "psycopg",
    "aiohttp",
    "httpx",
    "requests",
    "urllib3",
    "websockets",
    "boto3",
    "botocore",
    "aiobotocore",
    "s3fs",
)
#: Modules whose import alone means a clock, randomness, the environment or the network.
FORBIDDEN_IMPORTS = ("time", "datetime", "random", "os", "socket", "asyncio", "secrets")
#: Calls that read the clock or make ids from it.
FORBIDDEN_CALLS = ("now", "utcnow", "today", "time_ns", "monotonic", "perf_counter", "new_id")


def core_modules() -> list[str]:
    names = ["gridstream.core"]
    for info in pkgutil.walk_packages([str(CORE)], prefix="gridstream.core."):
        names.append(info.name)
    return sorted(names)


def test_there_is_a_kernel_to_check():
    mods = core_modules()
    for expected in (
        "gridstream.core.signals.engine",
        "gridstream.core.strategies.grid",
        "gridstream.core.risk",
        "gridstream.core.fills",
    ):
        assert expected in mods


def test_importing_the_kernel_pulls_no_io_client():
    code = (
        "import importlib, json, sys\n"
        f"for m in {core_modules()!r}: importlib.import_module(m)\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN_PACKAGES!r})\n"
        "print(json.dumps(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in FORBIDDEN_IMPORTS or top in FORBIDDEN_PACKAGES:
                    found.append(f"{path.name}:{node.lineno} import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            top = node.module.split(".")[0]
            if top in FORBIDDEN_IMPORTS or top in FORBIDDEN_PACKAGES:
                found.append(f"{path.name}:{node.lineno} from {node.module}")
            found += [
                f"{path.name}:{node.lineno} imports {a.name}"
                for a in node.names
                if a.name in FORBIDDEN_CALLS
            ]
        elif isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if name in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} calls {name}()")
    return found


def test_the_kernel_reads_no_clock_and_no_environment():
    sources = sorted(CORE.rglob("*.py"))
    assert len(sources) >= 5
    problems = [v for src in sources for v in _violations(src)]
    assert problems == []


def test_the_checker_finds_what_it_looks_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "import time\nfrom datetime import datetime\nimport redis\n"
        "from gridstream.common.messages import new_id\n"
        "def f():\n    return datetime.now(), time.monotonic()\n"
    )
    got = _violations(bad)
    assert any("import time" in v for v in got)
    assert any("from datetime" in v for v in got)
    assert any("import redis" in v for v in got)
    assert any("imports new_id" in v for v in got)
    assert any("calls now()" in v for v in got)
    assert any("calls monotonic()" in v for v in got)
