"""``gridstream config``: the effective settings, where each comes from, secrets masked.

Reads the same environment the services read (and ``<NAME>_FILE`` secret files), against
the generated settings reference (:mod:`gridstream.common.settings_reference`). Unknown
``GS_*`` variables are listed as errors, as the services would refuse them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from gridstream.common.settings import FILE_SUFFIX, redact_url, unknown_variables
from gridstream.common.settings_reference import SETTINGS

MASK: Final = "***"
URL_SECRETS: Final = frozenset({"REDIS_URL", "DATABASE_URL"})


def effective(env: Mapping[str, str], service: str | None = None) -> list[dict[str, Any]]:
    rows = []
    for s in SETTINGS:
        if service is not None and service not in s.owners and "common" not in s.owners:
            continue
        source, value = "default", s.default
        if s.name in env:
            source, value = "env", env[s.name]
        elif s.name + FILE_SUFFIX in env:
            path = Path(env[s.name + FILE_SUFFIX])
            source = f"file {path}"
            try:
                value = path.read_text().strip()
            except OSError as exc:
                value = f"<unreadable: {exc.strerror}>"
        if s.secret and source != "default":
            value = redact_url(value) if s.name in URL_SECRETS else MASK
        rows.append({"name": s.name, "value": value, "source": source, "owners": list(s.owners)})
    return rows


def render(rows: list[dict[str, Any]], unknown: list[str]) -> str:
    width = max((len(r["name"]) for r in rows), default=10)
    vwidth = min(48, max((len(str(r["value"])) for r in rows), default=5))
    lines = [f"{'variable':<{width}}  {'value':<{vwidth}}  source    used by"]
    for r in rows:
        lines.append(
            f"{r['name']:<{width}}  {r['value']!s:<{vwidth}}  {r['source']:<8}  "
            + ",".join(r["owners"])
        )
    for name in unknown:
        lines.append(f"ERROR: {name} is not a gridstream setting (services refuse to start)")
    return "\n".join(lines)


def config(
    service: str | None, as_json: bool, env: Mapping[str, str] | None = None
) -> tuple[str, int]:
    env = os.environ if env is None else env
    rows = effective(env, service)
    unknown = unknown_variables(env)
    if as_json:
        return json.dumps({"settings": rows, "unknown": unknown}, indent=2), 1 if unknown else 0
    return render(rows, unknown), 1 if unknown else 0
