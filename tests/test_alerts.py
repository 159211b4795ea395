"""deploy/prometheus: the alert rules and their unit tests, checked by the real promtool, and the
metric names the alerts and the Grafana dashboard use, checked against those the server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from nextword.server.metrics import Metrics

ROOT = Path(__file__).resolve().parent.parent
ALERTS = "deploy/prometheus/alerts.yml"
ALERTS_TEST = "deploy/prometheus/alerts_test.yml"
PROMETHEUS_CONFIG = "deploy/prometheus.yml"
# deploy/prometheus.yml, and any other Prometheus configuration of docker-compose.yml beside it.
PROMETHEUS_CONFIGS = sorted(
    path.relative_to(ROOT).as_posix() for path in (ROOT / "deploy").glob("prometheus*.yml")
)
DASHBOARD = "deploy/grafana/dashboards/nextword.json"

EXPECTED_ALERTS = {
    "NextwordDown",
    "NextwordHighErrorRatio",
    "NextwordLatencyP99High",
    "NextwordQueueWaitHigh",
    "NextwordSessionStoreDown",
    "NextwordSessionsNearLimit",
    "NextwordWorkerRestarting",
    "NextwordWorkersMissing",
}
# The worker supervisor's own metrics (`nextword serve --workers N`), by type; and Prometheus's `up`.
SUPERVISOR_METRICS = {
    "nextword_workers": "gauge",
    "nextword_workers_alive": "gauge",
    "nextword_worker_restarts": "counter",
}
PROMETHEUS_METRICS = {"up"}

# Series names a metric family of each type puts on /metrics (prometheus_client names a counter
# family without its _total and an info family without its _info).
EXPOSED_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("", "_count", "_sum"),
    "info": ("_info",),
}
PROMQL_FUNCTIONS = {
    "abs", "absent", "absent_over_time", "avg", "avg_over_time", "bottomk", "ceil", "changes", "clamp",
    "clamp_max", "clamp_min", "count", "count_over_time", "count_values", "day_of_month", "day_of_week",
    "days_in_month", "delta", "deriv", "exp", "floor", "group", "histogram_quantile", "holt_winters",
    "hour", "idelta", "increase", "irate", "label_join", "label_replace", "last_over_time", "ln",
    "log10", "log2", "max", "max_over_time", "min", "min_over_time", "minute", "month",
    "predict_linear", "present_over_time", "quantile", "quantile_over_time", "rate", "resets", "round",
    "scalar", "sgn", "sort", "sort_desc", "sqrt", "stddev", "stddev_over_time", "stdvar",
    "stdvar_over_time", "sum", "sum_over_time", "time", "timestamp", "topk", "vector", "year",
}  # fmt: skip
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless"}
PROMQL_KEYWORDS |= {"bool", "offset", "inf", "nan"}


# ---------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool of Debian's prometheus package, installed by scripts/install-services.sh if missing."""
    found = shutil.which("promtool")
    if found is None:
        script = ROOT / "scripts" / "install-services.sh"
        done = subprocess.run(
            ["bash", str(script), "prometheus"], cwd=ROOT, capture_output=True, text=True, timeout=900
        )
        if done.returncode != 0:
            pytest.fail(
                f"promtool is missing and `{script.relative_to(ROOT)} prometheus` failed "
                f"(exit {done.returncode}):\n{done.stdout}{done.stderr}"
            )
        found = shutil.which("promtool")
        if found is None:
            pytest.fail(
                f"promtool still missing after `{script.relative_to(ROOT)} prometheus`:\n{done.stderr}"
            )
    return found


def run_promtool(promtool: str, *args: str) -> str:
    done = subprocess.run([promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"promtool {' '.join(args)} exited {done.returncode}:\n{output}"
    return output


def test_promtool_check_rules(promtool: str) -> None:
    output = run_promtool(promtool, "check", "rules", ALERTS)
    assert "SUCCESS" in output


def test_promtool_test_rules(promtool: str) -> None:
    output = run_promtool(promtool, "test", "rules", ALERTS_TEST)
    assert "SUCCESS" in output and "FAILED" not in output


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS)
def test_promtool_check_config_finds_the_rules(promtool: str, config: str) -> None:
    # A rule file named literally must exist, or check config fails; it checks the rules it names too.
    output = run_promtool(promtool, "check", "config", config)
    assert "rule files found" in output and f"Checking {ALERTS}" in output


# ---------------------------------------------------------------------------- the rule files


def load_yaml(relative: str) -> Any:
    return yaml.safe_load((ROOT / relative).read_text())


def rules() -> list[dict[str, Any]]:
    groups = load_yaml(ALERTS)["groups"]
    assert [group["name"] for group in groups] == ["nextword"]
    return [rule for group in groups for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in rules() if "alert" in rule}


def test_alerts_have_severity_and_actionable_annotations() -> None:
    found = alerts()
    assert set(found) == EXPECTED_ALERTS
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert len(rule["annotations"]["description"]) > 100, name
    # The objectives are stated where the person on call reads them.
    assert "50 ms" in found["NextwordLatencyP99High"]["annotations"]["description"]
    assert "0.05" in found["NextwordLatencyP99High"]["expr"]
    ratio = found["NextwordHighErrorRatio"]["annotations"]["description"]
    for code in ("INTERNAL", "UNKNOWN", "DEADLINE_EXCEEDED", "UNAVAILABLE", "INVALID_ARGUMENT"):
        assert code in ratio
    for name, flag in (
        ("NextwordSessionsNearLimit", "--max-sessions"),
        ("NextwordWorkersMissing", "--workers"),
        ("NextwordDown", "--metrics-port"),
    ):
        assert flag in found[name]["annotations"]["description"], name


def test_every_alert_is_unit_tested_firing_and_healthy_input_fires_none() -> None:
    spec = load_yaml(ALERTS_TEST)
    assert spec["rule_files"] == ["alerts.yml"]
    cases = [case for test in spec["tests"] for case in test.get("alert_rule_test", [])]
    fired = {case["alertname"] for case in cases if case.get("exp_alerts")}
    assert fired == EXPECTED_ALERTS
    quiet = [case for case in cases if not case.get("exp_alerts")]
    assert len(quiet) >= 2
    # The first test is a healthy replica: every alert is checked there and none fires.
    healthy = spec["tests"][0]["alert_rule_test"]
    assert {case["alertname"] for case in healthy} == EXPECTED_ALERTS
    assert not any(case.get("exp_alerts") for case in healthy)


def test_compose_mounts_the_rule_files_where_the_config_names_them() -> None:
    """rule_files are relative to the configuration file, in the checkout and in the container."""
    services = load_yaml("docker-compose.yml")["services"]
    prometheuses = {
        name: s for name, s in services.items() if s.get("image", "").startswith("prom/prometheus:")
    }
    assert "prometheus" in prometheuses
    for name, service in prometheuses.items():
        mounts = {}
        for volume in service["volumes"]:
            source, target, *_ = volume.split(":")
            mounts[PurePosixPath(target)] = (ROOT / source).resolve()
        (flag,) = (arg for arg in service["command"] if arg.startswith("--config.file="))
        config_in_container = PurePosixPath(flag.partition("=")[2])
        config_file = mounts[config_in_container]
        if name == "prometheus":
            assert config_file == (ROOT / PROMETHEUS_CONFIG).resolve()
        rule_files = yaml.safe_load(config_file.read_text())["rule_files"]
        assert rule_files, f"{config_file.name} loads no rule file"
        for rule_file in rule_files:
            in_checkout = (config_file.parent / rule_file).resolve()
            assert in_checkout == (ROOT / ALERTS).resolve() and in_checkout.is_file(), rule_file
            in_container = config_in_container.parent / rule_file
            assert mounts.get(in_container) == in_checkout, (
                f"{name}: {rule_file} not mounted at {in_container}"
            )


# ---------------------------------------------------------------------------- metric names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (functions, keywords and label names left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, regexes
    expr = re.sub(r"\{[^}]*\}", " ", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", " ", expr)  # ranges: [5m], [$__rate_interval]
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", expr):
        word = match.group()
        if word.lower() in PROMQL_KEYWORDS:
            continue
        if word in PROMQL_FUNCTIONS and expr[match.end() :].lstrip().startswith("("):
            continue
        names.add(word)
    return names


def test_metric_names_parses_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, method) (rate(a_seconds_bucket{method="Session", le=~"1e-3"}'
        "[$__rate_interval]))) / on (instance) group_left () (b_total > 0) or vector(1e-3) * c:d:rate5m"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:d:rate5m"}


def exposed_names() -> set[str]:
    """Every series name the server and its worker supervisor put on /metrics, and Prometheus's up."""
    families = {family.name: family.type for family in Metrics().registry.collect()}
    assert "nextword_request_duration_seconds" in families
    families.update(SUPERVISOR_METRICS)
    names = {name + suffix for name, kind in families.items() for suffix in EXPOSED_SUFFIXES[kind]}
    return names | PROMETHEUS_METRICS


def test_alerts_and_dashboard_use_only_metrics_the_server_exports() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    known = exposed_names() | recorded
    dashboard = json.loads((ROOT / DASHBOARD).read_text())
    sources = {f"{ALERTS}: {rule.get('alert') or rule['record']}": rule["expr"] for rule in rules()}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            sources[f"{DASHBOARD}: panel {panel['id']} {target['refId']}"] = target["expr"]
    used: set[str] = set()
    for where, expr in sources.items():
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= known, f"{where}: {sorted(names - known)} not exported by the server"
        used |= names
    for name in ("nextword_errors_total", "nextword_workers_alive", "nextword_session_store_up", "up"):
        assert name in used
    # Recording rules are used, and named level:metric:operations.
    assert recorded and all(name.count(":") == 2 for name in recorded)
    assert recorded <= used


# ---------------------------------------------------------------------------- dashboard layout


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    dashboard = json.loads((ROOT / DASHBOARD).read_text())
    assert dashboard["schemaVersion"] == 39 and dashboard["uid"] == "nextword"
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], int] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"panels {cells[(x, y)]} and {panel['id']} overlap at {(x, y)}"
                cells[(x, y)] = panel["id"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}
    titles = " ".join(panel["title"] for panel in panels)
    for words in ("by worker", "by replica", "Workers alive", "restarts", "Session store", "--max-sessions"):
        assert words in titles
