"""Generate the settings reference from the settings classes themselves.

Writes ``libs/common/src/gridstream/common/settings_reference.py`` (the data module every
loader checks the environment against: a ``GS_*`` variable no part of gridstream reads
stops a service at start) and ``docs/settings.md`` (the same, for people).

    uv run python scripts/gen_settings_reference.py          # write both
    uv run python scripts/gen_settings_reference.py --check  # exit 1 if either is stale

``tests/test_settings_reference.py`` runs the check. Run this after adding, renaming or
documenting a setting (a ``#:`` comment above the field is its description).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, get_type_hints

import msgspec

from gridstream.common.settings import (
    SECRET_FIELDS,
    UNPREFIXED,
    CommonSettings,
    env_name,
    redact_url,
)

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "libs" / "common" / "src" / "gridstream" / "common" / "settings_reference.py"
DOC = REPO / "docs" / "settings.md"

#: Each service's settings class (service name -> module:class).
SERVICES = {
    "ingestor": "gridstream.ingestor.main:IngestorSettings",
    "signals": "gridstream.signals.main:SignalsSettings",
    "strategy": "gridstream.strategy.main:StrategySettings",
    "risk": "gridstream.risk.settings:RiskSettings",
    "executor": "gridstream.executor.settings:ExecutorSettings",
    "archiver": "gridstream.archiver.settings:ArchiverSettings",
}
#: Variables read outside any settings class: (name, who reads it, what it does).
DIRECT = (
    (
        "GS_HEALTHCHECK_URL",
        "deploy",
        "URL the container health check probes (deploy/healthcheck.py)",
    ),
)


def _class(spec: str) -> type[msgspec.Struct]:
    module, _, name = spec.partition(":")
    cls: type[msgspec.Struct] = getattr(importlib.import_module(module), name)
    return cls


def _docs(cls: type) -> dict[str, str]:
    """``#:`` comments above each field, through the class's bases."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass in (object, msgspec.Struct):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        pending: list[str] = []
        for line in lines:
            s = line.strip()
            if s.startswith("#:"):
                pending.append(s[2:].strip())
                continue
            m = re.match(r"^([a-z_][a-z0-9_]*)\s*:", s)
            if m and pending:
                out[m.group(1)] = " ".join(pending)
            if not s.startswith("#"):
                pending = []
    return out


def _type_text(tp: Any) -> str:
    text = getattr(tp, "__name__", None) if isinstance(tp, type) else None
    text = text or str(tp)
    return text.replace("typing.", "").replace("decimal.", "").replace("pathlib.", "")


def _default(field: msgspec.structs.FieldInfo) -> str:
    if field.default is not msgspec.NODEFAULT:
        value = field.default
    elif field.default_factory is not msgspec.NODEFAULT:
        value = field.default_factory()
    else:
        return "(required)"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _shown_default(field: msgspec.structs.FieldInfo) -> str:
    """The default as docs show it: a URL without any password, other secrets hidden."""
    if field.name in UNPREFIXED:
        return redact_url(_default(field))
    return "<secret>" if field.name in SECRET_FIELDS else _default(field)


def collect() -> list[dict[str, Any]]:
    rows: dict[str, dict[str, Any]] = {}
    common = {f.name for f in msgspec.structs.fields(CommonSettings)}
    for service, spec in [("common", None), *SERVICES.items()]:
        cls = CommonSettings if spec is None else _class(spec)
        hints = get_type_hints(cls)
        docs = _docs(cls)
        for f in msgspec.structs.fields(cls):
            if spec is not None and f.name in common:
                continue
            name = env_name(f.name)
            row = rows.setdefault(
                name,
                {
                    "name": name,
                    "field": f.name,
                    "owners": [],
                    "type": _type_text(hints[f.name]),
                    "default": _shown_default(f),
                    "secret": f.name in SECRET_FIELDS,
                    "doc": docs.get(f.name, ""),
                },
            )
            row["owners"].append(service)
            if not row["doc"]:
                row["doc"] = docs.get(f.name, "")
    sim = importlib.import_module("gridstream.simulator.settings")
    sim_fields = {f.name: f for f in msgspec.structs.fields(sim.SimSettings)}
    sim_hints = get_type_hints(sim.SimSettings)
    for name, field, doc in sim.SIM_VARIABLES:
        secret = field in ("api_key", "api_secret")
        rows[name] = {
            "name": name,
            "field": field,
            "owners": ["simulator"],
            "type": _type_text(sim_hints[field]),
            "default": "<secret>" if secret else _default(sim_fields[field]),
            "secret": secret,
            "doc": doc,
        }
    for name, owner, doc in DIRECT:
        rows[name] = {
            "name": name,
            "field": "",
            "owners": [owner],
            "type": "str",
            "default": "",
            "secret": False,
            "doc": doc,
        }
    return sorted(rows.values(), key=lambda r: r["name"])


def render_module(rows: list[dict[str, Any]]) -> str:
    lines = [
        '"""Every setting gridstream reads: generated by scripts/gen_settings_reference.py.',
        "",
        "Do not edit: run ``uv run python scripts/gen_settings_reference.py`` after changing a",
        "settings class. Loaders refuse a ``GS_*`` variable that is not here",
        "(:func:`gridstream.common.settings.check_environment`); ``gridstream config`` and",
        "docs/settings.md show it.",
        '"""',
        "",
        "from __future__ import annotations",
        "",
        "from typing import Final, NamedTuple",
        "",
        "",
        "class Setting(NamedTuple):",
        "    name: str",
        "    field: str",
        "    owners: tuple[str, ...]",
        "    type: str",
        "    default: str",
        "    secret: bool",
        "    doc: str",
        "",
        "",
        "SETTINGS: Final[tuple[Setting, ...]] = (",
    ]
    for r in rows:
        lines.append("    Setting(")
        for key in ("name", "field"):
            lines.append(f"        {r[key]!r},")
        lines.append(f"        {tuple(r['owners'])!r},")
        for key in ("type", "default", "secret", "doc"):
            lines.append(f"        {r[key]!r},")
        lines.append("    ),")
    lines += [
        ")",
        "",
        "#: Setting by variable name.",
        "BY_NAME: Final[dict[str, Setting]] = {s.name: s for s in SETTINGS}",
        "",
    ]
    return "\n".join(lines)


def render_doc(rows: list[dict[str, Any]]) -> str:
    out = [
        "# Settings reference",
        "",
        "Generated by `scripts/gen_settings_reference.py` from the settings classes; do not",
        "edit by hand. Every service reads `GS_<FIELD>` (and `REDIS_URL`, `DATABASE_URL`);",
        "for the services' settings `<NAME>_FILE` names a file holding the value (secrets;",
        "the simulator's and the health check's variables have no such variant). The services share one",
        "environment, so a variable of any part is valid for all; one that no part reads",
        "(a misspelling) stops a service at start, with the nearest known name.",
        "`uv run gridstream config [--service NAME]` prints the effective values, secrets",
        "masked.",
        "",
    ]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        key = "common" if "common" in r["owners"] else ", ".join(r["owners"])
        groups.setdefault(key, []).append(r)
    order = ["common", *SERVICES, "simulator", "deploy"]
    for key in sorted(groups, key=lambda k: (order.index(k) if k in order else len(order), k)):
        out += [f"## {key}", "", "| variable | type | default | description |", "|---|---|---|---|"]
        for r in groups[key]:
            default = r["default"].replace("|", "\\|") if r["default"] else ""
            doc = r["doc"].replace("|", "\\|") + (" (secret)" if r["secret"] else "")
            tp = r["type"].replace("|", "\\|")
            out.append(f"| `{r['name']}` | `{tp}` | `{default}` | {doc} |")
        out.append("")
    return "\n".join(out)


def formatted(source: str) -> str:
    """The module as ``ruff format`` leaves it (so that the lint check agrees)."""
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--stdin-filename", str(MODULE), "-"],
        input=source,
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    )
    return out.stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="exit 1 if the outputs are stale")
    args = ap.parse_args()
    rows = collect()
    outputs = {MODULE: formatted(render_module(rows)), DOC: render_doc(rows)}
    stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(
                f"{p.relative_to(REPO)} is out of date: run uv run python {Path(__file__).relative_to(REPO)}"
            )
        return 1 if stale else 0
    for p in stale:
        p.write_text(outputs[p])
        print(f"wrote {p.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
