"""Each package declares what it imports; services never import each other.

The workspace installs every package into one environment, so an import that only a
sibling declared would work here and fail in that service's own Docker image (built with
`uv sync --package gridstream-<name>`). This test reads every package's source imports
and fails loudly on an undeclared third-party import or a service-to-service import.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
PACKAGES = sorted(
    p.parent
    for p in [
        *REPO.glob("libs/*/pyproject.toml"),
        *REPO.glob("services/*/pyproject.toml"),
        *REPO.glob("tools/*/pyproject.toml"),
    ]
)


def _norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _declared(pkg: Path) -> set[str]:
    data = tomllib.loads((pkg / "pyproject.toml").read_text())
    return {_norm(Requirement(r).name) for r in data["project"].get("dependencies", [])}


def _name(pkg: Path) -> str:
    return _norm(tomllib.loads((pkg / "pyproject.toml").read_text())["project"]["name"])


DECLARED = {_name(p): _declared(p) for p in PACKAGES}


def _closure(name: str) -> set[str]:
    """What a package may import: its own dependencies and theirs, transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        current = todo.pop()
        for dep in DECLARED.get(current, set()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen | _installed_requires(seen)


def _installed_requires(dists: set[str]) -> set[str]:
    from importlib.metadata import PackageNotFoundError, requires

    out: set[str] = set()
    todo = [d for d in dists if not d.startswith("gridstream-")]
    while todo:
        d = todo.pop()
        try:
            reqs = requires(d) or []
        except PackageNotFoundError:
            continue
        for r in reqs:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            n = _norm(req.name)
            if n not in out:
                out.add(n)
                todo.append(n)
    return out


def _imports(pkg: Path) -> dict[str, str]:
    """Top-level imported module -> first file importing it, for the package's src."""
    found: dict[str, str] = {}
    for path in (pkg / "src").rglob("*.py"):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n, str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_third_party_import_is_declared(pkg: Path) -> None:
    dist_of = packages_distributions()
    allowed = _closure(_name(pkg))
    missing = []
    for module, where in _imports(pkg).items():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top == "gridstream":
            continue
        dists = {_norm(d) for d in dist_of.get(top, [])}
        if not dists:
            missing.append(f"{module} ({where}): not installed at all")
        elif not dists & allowed:
            missing.append(f"{module} ({where}): from {sorted(dists)}, not declared")
    assert not missing, f"{_name(pkg)} imports undeclared packages: {missing}"


#: What each library may import of gridstream: the kernel sits on common, common on nothing.
LIB_LAYERS = {"common": {"common"}, "core": {"common", "core"}}


@pytest.mark.parametrize("pkg", PACKAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_gridstream_imports_follow_the_layering(pkg: Path) -> None:
    """Libraries: ``common`` imports no other part, the kernel (``core``) only ``common``.
    Services import ``common``, the kernel and themselves, never each other.

    Tools (``tools/*``, the command line) may use a service's pure parts for offline work
    (e.g. ``gridstream signals export`` runs the signals batch code), if they declare it.
    Every gridstream package imported must be declared.
    """
    own = pkg.name
    is_tool = pkg.parent.name == "tools"
    is_lib = pkg.parent.name == "libs"
    allowed = LIB_LAYERS[own] if is_lib else {"common", "core", own}
    bad = []
    for module, where in _imports(pkg).items():
        parts = module.split(".")
        if parts[0] != "gridstream" or len(parts) < 2:
            continue
        target = parts[1]
        declared = f"gridstream-{target}" in DECLARED[_name(pkg)]
        if is_tool and declared:
            continue
        if target not in allowed:
            bad.append(f"{module} ({where})")
        elif target != own and not declared:
            bad.append(f"{module} ({where}): gridstream-{target} not declared")
    assert not bad, f"{_name(pkg)} crosses package lines: {bad}"
