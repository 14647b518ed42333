"""Load on loopback: concurrent clients sending real Barcelona JPEGs to a real server process for a fixed
time, with the production alias promoted and rolled back (two zero-downtime swaps) while it runs.

Asserted: every request answered 200 (no error, no 503), both versions answered, every answered
prediction recorded in the service's database (ids answered == rows stored), resident memory flat from
10% of the run to its end. Reported: throughput and p50/p95/p99 latency. The default run is short
(16 clients, 8 s); `-m slow` runs the issue's 64 clients for 60 s.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from loadgen import run_load
from procstat import load_average
from server_helpers import running_server
from sqlalchemy import func, select

from models.contract import ModelContract
from models.registry import Registry
from service.db.models import Cell
from service.db.session import Database

ADMIN_TOKEN = "load-admin-token"
MODEL = "loaded"


@pytest.fixture()
def two_versions(tmp_path: Path, exported_onnx: Path, model_contract: ModelContract) -> Path:
    registry = Registry(tmp_path / "registry", MODEL)
    for run in range(2):
        registry.register(exported_onnx, model_contract, {"lineage": {"run_id": f"load-{run}"}})
    registry.set_alias("production", 1, reason="load start")
    return tmp_path / "registry"


def load_with_swaps(
    registry: Path,
    tmp_path: Path,
    images: list[tuple[str, bytes]],
    clients: int,
    seconds: float,
    rss_growth_mib: float,
) -> None:
    database_url = f"sqlite:///{tmp_path}/load.db"
    env = {
        "WBC_ADMIN_TOKEN": ADMIN_TOKEN,
        "WBC_DATABASE_URL": database_url,
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
    }
    swaps: list[int] = []

    def move(path: str, version: int):
        def action() -> None:
            r = httpx.post(
                f"{server.url}/v1/admin/model/{path}",
                json={"version": version, "reason": "load test"},
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                timeout=120,
            )
            assert r.status_code == 200, r.text
            swaps.append(r.json()["serving"]["version"])

        return action

    with running_server(registry, MODEL, env=env) as server:
        for name, data in images[:4]:  # warm the model, decoders and database
            assert (
                httpx.post(
                    f"{server.url}/v1/classify", files=[("files", (name, data))], timeout=60
                ).status_code
                == 200
            )
        report = run_load(
            server.url,
            images,
            clients,
            seconds,
            server.proc.pid,
            events=[(seconds / 3, move("promote", 2)), (2 * seconds / 3, move("rollback", 1))],
        )
        metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
        log = server.log()
    db = Database(database_url)
    with db.transaction() as session:
        stored = session.scalar(select(func.count()).select_from(Cell))
        stored_ids = set(session.scalars(select(Cell.id)))
    db.dispose()

    print(
        f"\nload: {report.summary()}; versions answered {dict(report.versions)}; swaps {swaps}; "
        f"{stored} cells stored; {load_average()}"
    )
    assert report.failures == [], report.failures[:10]
    assert swaps == [2, 1] and set(report.versions) == {1, 2}
    assert 'wbc_model_swaps_total{result="swapped",trigger="admin"} 2.0' in metrics
    # Every answered prediction was recorded (the warm-up's 4 as well), and nothing else was.
    assert set(report.ids) <= stored_ids and stored == report.ok + 4
    growth = report.rss_at(1.0) - report.rss_at(0.1)
    assert growth < rss_growth_mib, f"RSS grew {growth:.0f} MiB during the run"
    assert "Traceback" not in log


def test_load_short_with_swaps(
    two_versions: Path, tmp_path: Path, barcelona_jpegs: list[tuple[str, bytes]]
) -> None:
    load_with_swaps(two_versions, tmp_path, barcelona_jpegs, clients=16, seconds=8, rss_growth_mib=60)


@pytest.mark.slow
def test_load_64_clients_60_seconds_with_swaps(
    two_versions: Path, tmp_path: Path, barcelona_jpegs: list[tuple[str, bytes]]
) -> None:
    load_with_swaps(two_versions, tmp_path, barcelona_jpegs, clients=64, seconds=60, rss_growth_mib=40)
