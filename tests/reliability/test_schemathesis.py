"""Schemathesis against the service's own OpenAPI document, over HTTP to a real server process.

Every operation in /openapi.json gets generated requests, valid (positive) and invalid (negative) by its
schema; the answer must never be a 5xx and the server must never log a traceback. The default run sends a
about two hundred cases; `-m slow` sends more than 2,000.

The server runs with authentication off (loopback), so every route's input handling is reached without
credentials; /v1/admin/model/* then needs WBC_ADMIN_TOKEN, which is sent to those paths only. Its
registry holds three versions, so generated promotions and rollbacks really swap models. Credentials,
roles and CSRF are tested on their own (test_security.py, tests/service/review/test_auth_roles.py).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase
from procstat import load_average, peak_rss_mib, rss_mib
from schemathesis import GenerationMode
from server_helpers import running_server

from models.contract import ModelContract
from models.registry import Registry

ADMIN_TOKEN = "fuzz-admin-token"
MODEL = "fuzzed"


@dataclass
class FuzzReport:
    cases: int = 0
    by_status: Counter = field(default_factory=Counter)
    by_operation: Counter = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    transport_errors: list[str] = field(default_factory=list)
    unsatisfiable: list[str] = field(default_factory=list)


def fuzz(url: str, examples_per_mode: int, seed: int = 0) -> FuzzReport:
    """Every operation of the live schema, `examples_per_mode` positive and as many negative cases each."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    report = FuzzReport()
    session = requests.Session()
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz_operation(operation, mode, url, session, report, examples_per_mode, seed)
            except hypothesis.errors.Unsatisfiable:
                report.unsatisfiable.append(f"{operation.label} ({mode.value})")  # nothing to make invalid
    return report


def fuzz_operation(
    operation: schemathesis.APIOperation,
    mode: GenerationMode,
    url: str,
    session: requests.Session,
    report: FuzzReport,
    examples: int,
    seed: int,
) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if "/admin/model" in operation.path else {}

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.seed(seed)
    def send(case: schemathesis.Case) -> None:
        report.cases += 1
        report.by_operation[operation.label] += 1
        try:
            response = case.call(base_url=url, session=session, headers=headers, timeout=60)
        except requests.RequestException as exc:
            report.transport_errors.append(f"{operation.label}: {type(exc).__name__}: {exc}")
            return
        report.by_status[response.status_code] += 1
        if response.status_code >= 500:
            report.server_errors.append(
                f"{operation.label} -> {response.status_code}: {response.text[:300]}\n"
                f"    reproduce: {case.as_curl_command()}"
            )

    send()


@pytest.fixture()
def fuzz_registry(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> Path:
    registry = Registry(tmp_path / "registry", MODEL)
    for run in range(3):
        registry.register(exported_onnx, model_contract, {"lineage": {"run_id": f"fuzz-{run}"}})
    registry.set_alias("production", 1, reason="fuzz start")
    return tmp_path / "registry"


def run_and_check(
    fuzz_registry: Path,
    tmp_path: Path,
    examples_per_mode: int,
    at_least: int,
    database_url: str | None = None,
) -> None:
    env = {
        "WBC_ADMIN_TOKEN": ADMIN_TOKEN,
        "WBC_DATABASE_URL": database_url or f"sqlite:///{tmp_path}/fuzz.db",
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
        "WBC_MODEL_RETRY_SECONDS": "0",
    }
    with running_server(fuzz_registry, MODEL, env=env) as server:
        start_rss = rss_mib(server.proc.pid)
        started = time.perf_counter()
        report = fuzz(server.url, examples_per_mode)
        seconds = time.perf_counter() - started
        alive = server.proc.poll() is None
        end_rss, peak = rss_mib(server.proc.pid), peak_rss_mib(server.proc.pid)
        log = server.log()
    print(
        f"\nschemathesis: {report.cases} cases over {len(report.by_operation)} operations in {seconds:.0f} s; "
        f"statuses {dict(sorted(report.by_status.items()))}; RSS {start_rss:.0f} -> {end_rss:.0f} MiB "
        f"(peak {peak:.0f}); {load_average()}"
    )
    assert alive, "the server died during fuzzing"
    assert report.server_errors == [], "\n".join(report.server_errors[:20])
    assert report.transport_errors == [], "\n".join(report.transport_errors[:20])
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 : log.index("Traceback") + 3000]
    assert report.cases >= at_least, f"only {report.cases} cases generated"


def test_schemathesis_quick(fuzz_registry: Path, tmp_path: Path) -> None:
    run_and_check(fuzz_registry, tmp_path, examples_per_mode=5, at_least=150)


@pytest.mark.slow
def test_schemathesis_full(fuzz_registry: Path, tmp_path: Path) -> None:
    run_and_check(fuzz_registry, tmp_path, examples_per_mode=75, at_least=2000)


@pytest.mark.slow
def test_schemathesis_on_postgresql(fuzz_registry: Path, tmp_path: Path, pg_url: str) -> None:
    """The same against PostgreSQL, whose types differ from SQLite's (32-bit INTEGER ids, strict text)."""
    run_and_check(fuzz_registry, tmp_path, examples_per_mode=40, at_least=1000, database_url=pg_url)
