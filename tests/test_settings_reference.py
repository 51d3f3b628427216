"""One reference of every setting; a misspelt ``GS_*`` variable stops a service at start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from gridstream.common.settings import SettingsError, env_name, load_settings
from gridstream.common.settings_reference import BY_NAME
from gridstream.executor.settings import ExecutorSettings
from gridstream.risk.settings import RiskSettings
from gridstream.simulator.settings import SIM_VARIABLES, SimSettings, load_sim_settings
from gridstream.simulator.settings import SettingsError as SimSettingsError

REPO = Path(__file__).resolve().parents[1]
GENERATOR = REPO / "scripts" / "gen_settings_reference.py"


def test_the_generated_reference_and_docs_are_up_to_date():
    run = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_field_of_every_service_is_in_the_reference():
    for cls in (RiskSettings, ExecutorSettings):
        for f in msgspec.structs.fields(cls):
            assert env_name(f.name) in BY_NAME, f.name
    sim_fields = {f.name for f in msgspec.structs.fields(SimSettings)}
    assert {field for _n, field, _d in SIM_VARIABLES} == sim_fields
    assert BY_NAME["GS_API_SECRET"].secret and BY_NAME["GS_API_SECRET"].default == "<secret>"
    text = (REPO / "docs" / "settings.md").read_text()
    assert all(f"`{name}`" in text for name in BY_NAME)


def test_a_misspelt_variable_is_refused_with_the_nearest_name():
    with pytest.raises(SettingsError) as err:
        load_settings(RiskSettings, {"GS_MAX_EXPOSRE_QUOTE": "10"})
    assert "GS_MAX_EXPOSRE_QUOTE is not a gridstream setting" in str(err.value)
    assert "did you mean GS_MAX_EXPOSURE_QUOTE?" in str(err.value)
    with pytest.raises(SimSettingsError, match="GS_SIM_SPEDE is not a gridstream setting"):
        load_sim_settings({"GS_SIM_SPEDE": "2"})


def test_a_setting_of_another_part_is_accepted_everywhere():
    other = {
        "GS_SIM_SPEED": "5",  # the simulator's
        "GS_API_KEY_FILE": "/dev/null",  # a secret file of the executor's key
        "GS_HEALTHCHECK_URL": "http://x",  # the container health check's
        "GS_MAX_EXPOSURE_QUOTE": "10",
    }
    got = load_settings(RiskSettings, other)
    assert str(got.max_exposure_quote) == "10"
    assert load_sim_settings({"GS_MAX_EXPOSURE_QUOTE": "10", "GS_SIM_SPEED": "5"}).speed == 5


def test_a_service_started_with_a_misspelt_variable_exits_naming_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env["GS_MAX_EXPOSRE_QUOTE"] = "10"
    run = subprocess.run(
        [sys.executable, "-m", "gridstream.risk"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 2
    assert "GS_MAX_EXPOSRE_QUOTE" in run.stderr and "GS_MAX_EXPOSURE_QUOTE" in run.stderr


def test_config_prints_effective_settings_with_sources_and_secrets_masked(tmp_path):
    secret = tmp_path / "key"
    secret.write_text("file-held-key\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GS_")}
    env.update(
        GS_API_SECRET="topsecret-value",
        GS_API_KEY_FILE=str(secret),
        GS_MAX_EXPOSURE_QUOTE="123",
        DATABASE_URL="postgresql://me:hunter2@db:5432/gridstream",
    )

    def config(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gridstream.cli", "config", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    run = config("--json")
    assert run.returncode == 0, run.stderr
    assert "topsecret" not in run.stdout and "file-held-key" not in run.stdout
    assert "hunter2" not in run.stdout
    rows = {r["name"]: r for r in __import__("json").loads(run.stdout)["settings"]}
    assert rows["GS_API_SECRET"] == {**rows["GS_API_SECRET"], "value": "***", "source": "env"}
    assert rows["GS_API_KEY"]["source"] == f"file {secret}" and rows["GS_API_KEY"]["value"] == "***"
    assert rows["GS_MAX_EXPOSURE_QUOTE"]["value"] == "123"
    assert rows["GS_BATCH_SIZE"] == {**rows["GS_BATCH_SIZE"], "value": "500", "source": "default"}
    assert rows["DATABASE_URL"]["value"] == "postgresql://me:***@db:5432/gridstream"
    risk_only = config("--service", "risk")
    assert "GS_MAX_EXPOSURE_QUOTE" in risk_only.stdout and "GS_API_SECRET" not in risk_only.stdout
    env["REDIS_URL"] = "redis://cache:6379/0?password=hunter3"
    masked = config("--json")
    assert "hunter3" not in masked.stdout and "password=***" in masked.stdout
    env["GS_SIM_API_SECRET_FILE"] = str(secret)  # the simulator reads no _FILE variant
    assert "ERROR: GS_SIM_API_SECRET_FILE" in config().stdout
    del env["GS_SIM_API_SECRET_FILE"]
    env["GS_MAX_EXPOSRE_QUOTE"] = "1"
    bad = config()
    assert bad.returncode == 1 and "ERROR: GS_MAX_EXPOSRE_QUOTE" in bad.stdout
