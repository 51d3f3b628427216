"""The deployment files agree with the code: compose stack, Dockerfile, Prometheus, Grafana.

Checks run without a Docker engine. ``promtool`` (Debian package ``prometheus``) and
``docker compose`` / ``docker-compose`` are used when installed and skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from gridstream.common import metrics as std_metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gridstream.json"
HEALTHCHECK = DEPLOY / "healthcheck.py"

PIPELINE = ("ingestor", "signals", "strategy", "risk", "executor", "archiver")
APP_SERVICES = ("simulator", *PIPELINE)
STACK = ("redis", "postgres", *APP_SERVICES, "prometheus", "grafana")
IMAGE_SERVICES = (*APP_SERVICES, "cli")

EXPECTED_ENV = {
    "REDIS_URL": "redis://redis:6379/0",
    "DATABASE_URL": "postgresql://postgres@postgres:5432/gridstream",
    "GS_VENUE_REST_URL": "http://simulator:8900",
    "GS_VENUE_WS_URL": "ws://simulator:8900",
    "GS_SIM_HOST": "0.0.0.0",
    "GS_METRICS_HOST": "0.0.0.0",
    "GS_METRICS_PORT": "9100",
}

METRIC_RE = re.compile(r"\bgridstream_[a-z0-9_]+\b")


# ---------------------------------------------------------------- helpers
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    svc = compose()["services"][name]
    assert isinstance(svc, dict)
    return svc


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def registry_names() -> set[str]:
    """Every sample name the standard metrics expose (``_total``, ``_bucket``, ...).

    Only collectors defined in :mod:`gridstream.common.metrics` count, so a metric some other
    module registers in the same process cannot make a dashboard query look valid.
    """
    standard = [obj for obj in vars(std_metrics).values() if isinstance(obj, MetricWrapperBase)]
    registered = {
        family.name
        for registry in (REGISTRY, std_metrics.SUPERVISOR_REGISTRY)  # services', gridstream run's
        for family in registry.collect()
    }
    names: set[str] = set()
    for collector in standard:
        for family in collector.describe():
            assert family.name in registered, f"{family.name} is in no gridstream registry"
            if family.type == "counter":
                names |= {f"{family.name}_total", f"{family.name}_created"}
            elif family.type == "histogram":
                names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
            else:
                names.add(family.name)
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        exprs.append(query["query"] if isinstance(query, dict) else str(query))
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool not installed (Debian: apt-get install prometheus)")
    assert path is not None
    return path


def missing(why: str) -> None:
    """Skip on a developer's machine; fail in CI, which installs every tool (.ci/run)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{why}: CI must install it")
    pytest.skip(why)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- compose
def test_compose_has_every_service_of_the_stack_with_a_healthcheck() -> None:
    services = compose()["services"]
    missing = [name for name in STACK if name not in services]
    assert not missing, f"missing from docker-compose.yml: {missing}"
    for name in STACK:
        hc = services[name].get("healthcheck")
        assert hc and hc.get("test"), f"{name} has no healthcheck"
        assert not hc.get("disable"), f"{name} disables its healthcheck"
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["image"] == "redis:7.4-alpine"
    assert services["postgres"]["image"] == "postgres:17-alpine"
    assert env_of(services["postgres"])["POSTGRES_DB"] == "gridstream"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_service_is_built_from_the_dockerfile_with_the_shared_env(name: str) -> None:
    svc = service(name)
    build = svc["build"]
    assert build["dockerfile"] == "deploy/Dockerfile"
    assert (ROOT / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert build["args"]["SERVICE"] == name
    env = env_of(svc)
    for key, value in EXPECTED_ENV.items():
        assert env.get(key) == value, f"{name}: {key}={env.get(key)!r}, want {value!r}"
    assert svc["restart"] == "unless-stopped"
    assert svc["healthcheck"]["test"] == ["CMD", "python", "/app/healthcheck.py"]


@pytest.mark.parametrize("name", PIPELINE)
def test_pipeline_service_waits_for_healthy_dependencies(name: str) -> None:
    deps = service(name)["depends_on"]
    assert set(deps) >= {"redis", "postgres", "simulator"}
    assert all(dep["condition"] == "service_healthy" for dep in deps.values())


def test_compose_volumes_and_observability_mounts() -> None:
    data = compose()
    assert set(data["volumes"]) >= {"redis-data", "postgres-data", "archive-data", "grafana-data"}
    services = data["services"]
    mounts = {name: " ".join(services[name].get("volumes", [])) for name in services}
    assert "redis-data:/data" in mounts["redis"]
    assert "postgres-data:" in mounts["postgres"]
    assert "archive-data:" in mounts["archiver"]
    assert "./deploy/prometheus:/etc/prometheus" in mounts["prometheus"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning" in mounts["grafana"]
    assert "./deploy/grafana/dashboards:/etc/grafana/dashboards" in mounts["grafana"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    ports = {name: services[name].get("ports", []) for name in services}
    assert "127.0.0.1:3000:3000" in ports["grafana"]
    assert "127.0.0.1:9090:9090" in ports["prometheus"]
    assert "127.0.0.1:8900:8900" in ports["simulator"]


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, check=False
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy is not None else None


def test_docker_compose_config_accepts_the_file() -> None:
    cmd = _compose_command()
    if cmd is None:
        missing("neither `docker compose` nor `docker-compose` is installed")
    assert cmd is not None
    result = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------- Dockerfile
def workspace_members() -> list[Path]:
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    members: list[Path] = []
    for pattern in root["tool"]["uv"]["workspace"]["members"]:
        members.extend(p for p in sorted(ROOT.glob(pattern)) if (p / "pyproject.toml").is_file())
    return members


def package_dir(svc: str) -> Path:
    """The workspace member whose project name is ``gridstream-<svc>``."""
    for member in workspace_members():
        project = tomllib.loads((member / "pyproject.toml").read_text())["project"]
        if project["name"] == f"gridstream-{svc}":
            return member
    raise AssertionError(f"no workspace package named gridstream-{svc}")


def test_dockerfile_copies_every_workspace_pyproject_before_the_source() -> None:
    text = DOCKERFILE.read_text()
    source_copy = text.index("COPY libs ./libs")
    for member in workspace_members():
        rel = member.relative_to(ROOT).as_posix()
        line = f"COPY {rel}/pyproject.toml {rel}/"
        assert line in text, f"Dockerfile lacks `{line}`: uv sync --frozen would fail"
        assert text.index(line) < source_copy
    assert "--no-install-workspace" in text
    assert 'ENTRYPOINT ["/bin/sh", "-c", "exec python -m \\"gridstream.${SERVICE}\\"' in text


@pytest.mark.parametrize("svc", IMAGE_SERVICES)
def test_dockerfile_service_arg_is_a_runnable_workspace_package(svc: str) -> None:
    member = package_dir(svc)
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    assert f"gridstream-{svc}" in {p["name"] for p in lock["package"]}
    main = member / "src" / "gridstream" / svc / "__main__.py"
    assert main.is_file(), f"`python -m gridstream.{svc}` needs {main.relative_to(ROOT)}"


def test_compose_builds_only_known_services() -> None:
    built = {
        svc["build"]["args"]["SERVICE"] for svc in compose()["services"].values() if "build" in svc
    }
    assert built <= set(IMAGE_SERVICES)
    assert built >= set(APP_SERVICES)


# ---------------------------------------------------------------- health check script
@pytest.fixture
def metrics_server() -> Iterator[int]:
    """A real gridstream metrics server (/healthz) in a thread; yields its port."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        runner, port = await std_metrics.serve("127.0.0.1", 0)
        holder["runner"], holder["port"] = runner, port
        holder["stop"] = asyncio.Event()
        started.set()
        await holder["stop"].wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield int(holder["port"])
    finally:
        loop.call_soon_threadsafe(holder["stop"].set)
        thread.join(10)
        loop.close()


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK)],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def test_healthcheck_passes_on_a_live_healthz(metrics_server: int) -> None:
    result = run_healthcheck({"SERVICE": "risk", "GS_METRICS_PORT": str(metrics_server)})
    assert result.returncode == 0, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    result = run_healthcheck({"SERVICE": "risk", "GS_METRICS_PORT": str(free_port())})
    assert result.returncode == 1
    assert "/healthz" in result.stderr


def test_healthcheck_probes_the_simulator_ping_not_healthz(metrics_server: int) -> None:
    # The metrics server has no /api/v3/ping: a simulator check against it must fail.
    result = run_healthcheck({"SERVICE": "simulator", "GS_SIM_PORT": str(metrics_server)})
    assert result.returncode == 1
    assert "/api/v3/ping" in result.stderr


# ---------------------------------------------------------------- metric names
def test_registry_knows_the_standard_names() -> None:
    names = registry_names()
    assert "gridstream_handler_latency_seconds_bucket" in names
    assert "gridstream_messages_in_total" in names
    assert "gridstream_kill_switch" in names


def test_dashboard_uses_only_standard_metric_names() -> None:
    used = {m for expr in dashboard_exprs() for m in METRIC_RE.findall(expr)}
    unknown = used - registry_names()
    assert not unknown, f"dashboard uses names not in gridstream.common.metrics: {unknown}"
    wanted = {
        "gridstream_messages_in_total",
        "gridstream_messages_out_total",
        "gridstream_handler_latency_seconds_bucket",
        "gridstream_consumer_lag",
        "gridstream_consumer_pending",
        "gridstream_dead_letters_total",
        "gridstream_reconnects_total",
        "gridstream_gaps_total",
        "gridstream_orders_total",
        "gridstream_fills_total",
        "gridstream_rejections_total",
        "gridstream_equity",
        "gridstream_drawdown",
        "gridstream_kill_switch",
        "gridstream_up",
    }
    assert wanted <= used, f"dashboard has no panel for {wanted - used}"


def test_dashboard_panels_use_the_provisioned_datasource() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ds = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uid = ds["datasources"][0]["uid"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert panels
    assert all(p["datasource"]["uid"] == uid for p in panels)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def test_alert_rules_use_only_standard_metric_names() -> None:
    rules = alert_rules()
    used = {m for rule in rules for m in METRIC_RE.findall(rule["expr"])}
    unknown = used - registry_names()
    assert not unknown, f"alerts use names not in gridstream.common.metrics: {unknown}"
    exprs = " ".join(rule["expr"] for rule in rules)
    assert 'up{job="gridstream"} == 0' in exprs
    assert "gridstream_up == 0" in exprs
    assert "gridstream_dead_letters_total" in exprs
    assert "gridstream_consumer_lag" in exprs
    assert 'rate(gridstream_messages_out_total{stream=~"gs:candles:.*"}[5m])' in exprs
    assert "gridstream_kill_switch" in exprs


def test_prometheus_scrapes_every_pipeline_service_on_9100() -> None:
    config = yaml.safe_load(PROM_CONFIG.read_text())
    targets = {
        target
        for job in config["scrape_configs"]
        for static in job.get("static_configs", [])
        for target in static["targets"]
    }
    assert {f"{name}:9100" for name in PIPELINE} <= targets
    assert set(compose()["services"]) >= {t.split(":")[0] for t in targets} - {"localhost"}


# ---------------------------------------------------------------- promtool
def test_promtool_accepts_config_and_rules() -> None:
    tool = promtool()
    for args in (["check", "config", str(PROM_CONFIG)], ["check", "rules", str(ALERTS)]):
        result = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_fire_as_specified() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", str(ALERTS_TEST)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    tool = promtool()
    grafana_vars = {"$__rate_interval": "1m", "$__range": "1h", "$service": ".*"}
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        if expr.startswith("label_values("):
            continue
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"unknown Grafana variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [tool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- CI and hooks
def test_ci_script_is_executable_strict_bash() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.stat().st_mode & 0o111, ".ci/run must be executable"
    text = ci.read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(ci)], check=False).returncode == 0


def test_pre_commit_hooks_are_local() -> None:
    config = yaml.safe_load((ROOT / ".pre-commit-config.yaml").read_text())
    assert all(repo["repo"] == "local" for repo in config["repos"])
    hooks = [hook for repo in config["repos"] for hook in repo["hooks"]]
    assert {hook["entry"] for hook in hooks} == {
        "uv run ruff check",
        "uv run ruff format --check",
        "uv run mypy",
    }
    assert all(hook["language"] == "system" for hook in hooks)
