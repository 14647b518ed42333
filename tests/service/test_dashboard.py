"""The Grafana dashboard only queries metrics the service exports."""

import json
import re
from pathlib import Path

from fastapi.testclient import TestClient

DASHBOARD = Path(__file__).resolve().parents[2] / "k8s" / "monitoring" / "grafana-dashboard.json"


def test_every_dashboard_metric_is_exported(client: TestClient) -> None:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bwbc_[a-z_]+", e)}
    declared = set(re.findall(r"^# TYPE (\S+)", client.get("/metrics").text, flags=re.M))
    suffixes = ("_bucket", "_sum", "_count", "_total")
    missing = {
        n
        for n in used
        if n not in declared and not any(n.endswith(s) and n[: -len(s)] in declared for s in suffixes)
    }
    assert len(used) >= 12 and missing == set()
