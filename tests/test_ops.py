"""ops/: alert rules and dashboards refer to metrics haul really exports; rules and config pass
promtool when it is installed; the systemd units keep the settings graceful stop depends on."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest

from actors.store import TaskStore
from supervisor.daemon import Supervisor
from tests.conftest import ClaimsOnly

REPO = Path(__file__).resolve().parent.parent
OPS = REPO / "ops"
METRIC = re.compile(r"\b(haul_[a-z_]+)")


@pytest.fixture
def exported(settings: Any, store: TaskStore) -> str:
    sup = Supervisor(settings, store, ClaimsOnly())
    sup.metrics.requeues.labels("lease_expired").inc(0)
    sup.metrics.sweep_errors.labels("requeue_stuck").inc(0)
    sup.metrics.sweep_seconds.labels("requeue_stuck").observe(0.001)
    store.client.zadd(store.prefix + "slots:download", {"x": 1e12})
    return generate_latest(sup.metrics.registry).decode()


def names_in(text: str) -> set[str]:
    return set(METRIC.findall(text))


def test_alert_rules_use_exported_metrics(exported: str) -> None:
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    assert {"HaulNoWorker", "HaulTasksStuck", "HaulDeadTasksRising", "HaulLastSweepTooOld"} <= {
        rule["alert"] for group in rules["groups"] for rule in group["rules"]
    }
    missing = names_in(" ".join(exprs)) - names_in(exported)
    assert not missing, missing


def test_dashboard_uses_exported_metrics(exported: str) -> None:
    dashboard = json.loads((OPS / "grafana" / "haul-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    missing = names_in(" ".join(exprs)) - names_in(exported)
    assert not missing, missing


def counters_in(text: str) -> set[str]:
    """Sample names of the counters (``_total``) and histograms (``_bucket``, ...) in an exposition."""
    names = set(re.findall(r"^# TYPE (haul_[a-z_]+) counter$", text, re.MULTILINE))
    for name in re.findall(r"^# TYPE (haul_[a-z_]+) histogram$", text, re.MULTILINE):
        names |= {name + suffix for suffix in ("_bucket", "_count", "_sum")}
    return names


def test_increase_and_rate_apply_to_counters_only(exported: str) -> None:
    """increase() of a gauge (haul_tasks{state="dead"}, which prune lowers) reads every fall as a
    counter reset: false increases, and missed ones."""
    rules = yaml.safe_load((OPS / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((OPS / "grafana" / "haul-dashboard.json").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    exprs += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    applied = set(re.findall(r"\b(?:increase|rate|irate)\((haul_[a-z_]+)", " ".join(exprs)))
    assert applied and applied <= counters_in(exported), applied - counters_in(exported)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: prometheus)")
def test_promtool_accepts_rules_and_config_and_the_rule_tests_pass() -> None:
    """alerts_test.yml: a task that dies fires HaulDeadTasksRising once (not once per replica);
    prune lowering the dead-task gauge, or a Redis restart resetting the count, does not."""
    checks = (
        ["check", "rules", "alerts.yml"],
        ["check", "config", "prometheus.yml"],
        ["test", "rules", "alerts_test.yml"],
    )
    for args in checks:
        result = subprocess.run(["promtool", *args], cwd=OPS / "prometheus", capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("unit", ["haul-worker@.service", "haul-supervisor.service", "haul-api.service"])
def test_systemd_units_stop_gracefully_and_keep_secrets_out_of_the_environment(unit: str) -> None:
    text = (OPS / "systemd" / unit).read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["KillSignal"] == "SIGTERM" and settings["KillMode"] == "mixed"
    assert settings["Restart"] == "always" and int(settings["TimeoutStopSec"]) <= 120
    assert "LoadCredential" in settings and "HAUL_WEBHOOK_SECRET=" not in text and "HAUL_API_TOKENS=" not in text


@pytest.mark.parametrize("unit", ["haul-worker@.service", "haul-supervisor.service", "haul-api.service"])
def test_systemd_units_log_json(unit: str) -> None:
    assert "Environment=HAUL_LOG_FORMAT=json" in (OPS / "systemd" / unit).read_text().splitlines()


def test_compose_services_log_json() -> None:
    compose = yaml.safe_load((OPS / "docker" / "docker-compose.yml").read_text())
    assert compose["x-haul"]["environment"]["HAUL_LOG_FORMAT"] == "json"


def _copy_sources(source: Path) -> Path:
    """A copy of what a build reads (a build writes *.egg-info and build/ beside it)."""
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for package in ("actors", "supervisor"):
        shutil.copytree(REPO / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    return source


def test_building_haul_prints_no_setuptools_warnings(tmp_path: Path) -> None:
    # Given a copy of the sources
    source = _copy_sources(tmp_path / "src")
    # When pip builds a wheel as ops/setup's install does (an isolated build with current setuptools)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-w", str(tmp_path / "dist"),
         str(source)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0 and ("Could not find a version" in output or "NewConnectionError" in output):
        pytest.skip("no package index to fetch setuptools from")
    # Then it builds, without a warning or a deprecation, and ships the Lua scripts
    assert result.returncode == 0, output
    noisy = [line for line in output.splitlines() if "warning" in line.lower() or "deprecat" in line.lower()]
    assert noisy == [], output
    (wheel,) = (tmp_path / "dist").glob("haul-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert "actors/lua/claim.lua" in archive.namelist()
        assert "supervisor/api/static/ui.css" in archive.namelist()  # the dashboard's, no CDN


def test_ops_setup_editable_install_prints_nothing(tmp_path: Path) -> None:
    # Given ops/setup's editable install line, with the environment it sets for pip
    (line,) = [line for line in (OPS / "setup").read_text().splitlines() if "pip install" in line and " -e " in line]
    assignments = line.split(" .venv/bin/python", 1)[0].split()
    environment = dict(os.environ, **dict(item.split("=", 1) for item in assignments if "=" in item))
    source = _copy_sources(tmp_path / "src")
    target = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True, timeout=60)
    # When the same quiet editable install runs into a fresh environment
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(target / "bin" / "python"), "install", "-q", "--no-deps",
         "--disable-pip-version-check", "-e", str(source)],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0 and ("Could not find a version" in output or "NewConnectionError" in output):
        pytest.skip("no package index to fetch setuptools from")
    # Then it installs and says nothing (pip's own notes about this machine's find-links aside)
    assert result.returncode == 0, output
    said = [line for line in output.splitlines() if line.strip() and not re.search("find-links|Looking in links", line)]
    assert said == [], output


def test_compose_keeps_redis_persistent_and_secrets_in_files() -> None:
    compose = yaml.safe_load((OPS / "docker" / "docker-compose.yml").read_text())
    assert "--appendonly" in compose["services"]["redis"]["command"]
    assert set(compose["secrets"]) == {"webhook-secret", "sentry-dsn", "api-tokens", "api-signing-key"}
    assert all("healthcheck" in compose["services"][name] for name in ("redis", "worker", "supervisor", "api"))
