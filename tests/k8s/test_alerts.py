"""The PrometheusRule's groups pass `promtool check rules` and its unit tests (`promtool test rules`,
alerts_test.yaml), and every metric the rules read is one the running service exports (or, for the
training alert, one kube-state-metrics exports), so a renamed metric fails here, not silently in production."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from k8s_helpers import DeployedService, find, wait_for
from prometheus_client.parser import text_string_to_metric_families

HERE = Path(__file__).parent
# Series that do not come from the service, with where they come from.
EXTERNAL = {
    "kube_job_status_start_time": "kube-state-metrics (Job)",
    "kube_job_status_failed": "kube-state-metrics (Job)",
    "kube_cronjob_status_last_successful_time": "kube-state-metrics (CronJob)",
    "kube_cronjob_created": "kube-state-metrics (CronJob)",
}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "inf", "nan",
            # aggregation operators, which may stand before their `by (...)` clause instead of a "("
            "sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile",
            "count_values", "limitk", "limit_ratio"}


def rule_groups(rendered: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    return find(rendered["cpu"], "PrometheusRule")["spec"]["groups"]


def write_rules(rendered: dict[str, list[dict[str, Any]]], folder: Path, annotations: bool = True) -> Path:
    groups = copy.deepcopy(rule_groups(rendered))
    if not annotations:  # unit tests compare labels; the templates are checked by `promtool check rules`
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = folder / "wbc-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression reads: identifiers that are not functions, keywords, label names
    (inside {...} or by/on/... (...) lists), ranges or durations."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", text)
    text = re.sub(r"\boffset\s+\w+", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name not in KEYWORDS:
            names.add(name)
    return names


def exported_series(metrics_text: str) -> set[str]:
    """Every series name the exposition declares, with the suffixes each metric type produces."""
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "summary": ("_sum", "_count", "_created"), "gauge": ("",), "info": ("_info",)}
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_metric_name_extraction() -> None:
    expr = ('sum by (namespace, le) (rate(wbc_x_bucket{job="a", le=~"0.5"}[5m])) / '
            "on (namespace) group_left () (wbc:y:rate1h offset 7d) > 2 * 0.05 and up")
    assert metric_names(expr) == {"wbc_x_bucket", "wbc:y:rate1h", "up"}


def test_rules_pass_promtool_check(rendered: dict[str, list[dict[str, Any]]], promtool: str, tmp_path: Path) -> None:
    out = subprocess.run([promtool, "check", "rules", str(write_rules(rendered, tmp_path))],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_alerts_fire_when_they_should(rendered: dict[str, list[dict[str, Any]]], promtool: str, tmp_path: Path) -> None:
    write_rules(rendered, tmp_path, annotations=False)
    shutil.copy(HERE / "alerts_test.yaml", tmp_path / "alerts_test.yaml")
    out = subprocess.run([promtool, "test", "rules", "alerts_test.yaml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested(rendered: dict[str, list[dict[str, Any]]]) -> None:
    tests = yaml.safe_load((HERE / "alerts_test.yaml").read_text())
    tested = {case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])}
    alerts = {rule["alert"] for group in rule_groups(rendered) for rule in group["rules"] if "alert" in rule}
    assert alerts <= tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def test_rules_read_only_metrics_that_exist(rendered: dict[str, list[dict[str, Any]]],
                                           deployed_service: DeployedService) -> None:
    wait_for(f"{deployed_service.url}/v2/health/live", deployed_service.log, timeout=90)
    exported = exported_series(httpx.get(f"{deployed_service.url}/metrics", timeout=10).text)
    recorded = {rule["record"] for group in rule_groups(rendered) for rule in group["rules"] if "record" in rule}
    missing = []
    for group in rule_groups(rendered):
        for rule in group["rules"]:
            for name in metric_names(rule["expr"]):
                if name in recorded or name in EXTERNAL:
                    continue
                if name not in exported:
                    missing.append(f"{rule.get('alert') or rule.get('record')}: {name}")
    assert not missing, "rules read series the service does not export:\n" + "\n".join(missing)
    used = {n for g in rule_groups(rendered) for r in g["rules"] for n in metric_names(r["expr"])}
    assert {"wbc_http_requests_total", "wbc_model_ready", "wbc_abstentions_total"} <= used
    if not EXTERNAL.keys() <= used:
        pytest.fail(f"EXTERNAL lists series no rule uses: {sorted(EXTERNAL.keys() - used)}")
