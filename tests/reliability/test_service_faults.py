"""Faults: the service restarted under load, the database connection lost and back, a writer killed while
exporting and registering a model. (The federation's faults, a SuperNode killed mid-round and the
SuperLink restarted, are tests/federation/test_faults.py; a registration killed at random moments is
tests/models/test_registry.py::test_kill_during_registration_leaves_only_whole_versions.)
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Self

import httpx
import pytest
from procstat import load_average
from server_helpers import free_port
from serverproc import ROOT, ServiceProcess
from sqlalchemy import make_url, select, text

from models.contract import ModelContract
from models.registry import Registry
from service import accounts
from service.audit import AuditLog
from service.db.models import Cell
from service.db.session import Database

MODEL = "restarted"


# ---- service restarted under load ----------------------------------------------------------------------
class GatedClients:
    """Clients that behave like a load balancer in front of the service: a request is only sent after
    /v2/health/ready answered 200, and never while the deployment drains the pod (k8s removes a
    terminating pod from its endpoints, then the preStop sleep lets requests already routed finish)."""

    def __init__(self, url: str, images: list[tuple[str, bytes]], clients: int):
        self.url, self.images, self.clients = url, images, clients
        self.stop = threading.Event()
        self.draining = threading.Event()
        self.lock = threading.Lock()
        self.answers: list[tuple[float, int]] = []  # (time, status) of classify requests sent
        self.failures: list[str] = []
        self.not_ready: Counter = Counter()  # why a client held back: 503 | refused
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, number: int) -> None:
        # A fresh connection per request: what a balancer does when it routes to a new backend.
        with httpx.Client(
            base_url=self.url, timeout=60, limits=httpx.Limits(max_keepalive_connections=0)
        ) as http:
            while not self.stop.is_set():
                if self.draining.is_set():
                    time.sleep(0.02)
                    continue
                try:
                    ready = http.get("/v2/health/ready", timeout=5).status_code
                except httpx.TransportError:
                    ready = "refused"
                if ready != 200:
                    with self.lock:
                        self.not_ready[ready] += 1
                    time.sleep(0.05)
                    continue
                name, data = self.images[(number + len(self.answers)) % len(self.images)]
                try:
                    r = http.post("/v1/classify", files=[("files", (name, data))])
                except httpx.ConnectError:
                    continue  # refused: nothing was sent, nothing lost
                except httpx.HTTPError as exc:
                    with self.lock:
                        self.failures.append(f"client {number}: {type(exc).__name__}: {exc}")
                    continue
                with self.lock:
                    self.answers.append((time.monotonic(), r.status_code))
                    if r.status_code != 200:
                        self.failures.append(f"client {number}: HTTP {r.status_code}: {r.text[:200]}")

    def __enter__(self) -> Self:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def ok_between(self, start: float, end: float) -> int:
        return sum(1 for at, status in self.answers if start <= at < end and status == 200)


def test_restarted_service_gets_traffic_only_once_its_model_is_loaded(
    tmp_path: Path,
    exported_onnx: Path,
    model_contract: ModelContract,
    barcelona_jpegs: list[tuple[str, bytes]],
) -> None:
    """8 readiness-gated clients; the service is drained (preStop) and stopped (SIGTERM), then started
    again while its model is missing (the registry volume not mounted yet, say): it listens but answers
    ready 503 (and classify 503 to whoever ignores readiness) until the model is back, then serves.
    Not one request the clients sent failed, and none reached the new process before it was ready."""
    registry = tmp_path / "registry"
    Registry(registry, MODEL).register(exported_onnx, model_contract, {"lineage": {"run_id": "restart"}})
    env = {
        "WBC_REGISTRY": str(registry),
        "WBC_MODEL_NAME": MODEL,
        "WBC_INTRA_OP_THREADS": "1",
        "WBC_MODEL_RETRY_SECONDS": "0.5",
        "WBC_DATABASE_URL": f"sqlite:///{tmp_path}/restart.db",
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
    }
    service = ServiceProcess(free_port(), env, tmp_path / "server.log")
    service.start()
    unready_answers: list[tuple[int, int]] = []
    with GatedClients(service.url, barcelona_jpegs, clients=8) as clients:
        time.sleep(3)
        first_stop = time.monotonic()
        clients.draining.set()  # endpoint removed; the preStop sleep lets routed requests finish
        time.sleep(1)
        service.stop(signal.SIGTERM)  # uvicorn re-raises the signal after a graceful shutdown
        assert "Application shutdown complete" in service.log()
        model_dir = registry / MODEL
        model_dir.rename(registry / f"{MODEL}.unmounted")
        clients.draining.clear()
        service.start()
        restarted = time.monotonic()
        # What a client that ignores readiness gets meanwhile: 503 with the reason, never a 5xx of another kind.
        for _ in range(3):
            ready = httpx.get(f"{service.url}/v2/health/ready", timeout=10)
            classify = httpx.post(
                f"{service.url}/v1/classify", files=[("files", barcelona_jpegs[0])], timeout=30
            )
            unready_answers.append((ready.status_code, classify.status_code))
            time.sleep(0.5)
        (registry / f"{MODEL}.unmounted").rename(model_dir)
        back = time.monotonic()
        deadline = back + 30
        while clients.ok_between(back, time.monotonic()) < 20:
            assert time.monotonic() < deadline, (
                f"no traffic after the model came back: {clients.failures[:5]}"
            )
            time.sleep(0.2)
        ended = time.monotonic()
    service.stop()
    log = service.log()
    before, after = clients.ok_between(0, first_stop), clients.ok_between(back, ended)
    during = clients.ok_between(restarted, back)
    print(
        f"\nrestart: {before} answered before the stop, {during} while the model was missing, {after} after it "
        f"came back; clients held back {dict(clients.not_ready)} times; failures {len(clients.failures)}; "
        f"{load_average()}"
    )
    assert clients.failures == [], clients.failures[:10]
    assert before > 0 and after >= 20 and during == 0
    assert unready_answers == [(503, 503)] * 3
    assert clients.not_ready[503] > 0  # the gate really held traffic back
    assert "Traceback" not in log


# ---- database connection lost and back (PostgreSQL) -----------------------------------------------------------
def test_database_lost_and_back_fails_cleanly_and_loses_no_prediction(
    pg_url: str, pg_admin, make_settings, barcelona_jpegs: list[tuple[str, bytes]], tmp_path: Path
) -> None:
    """A real server on its own PostgreSQL database, with authentication (every request reads the token
    from the database) and 4 clients. Its backend connections are terminated again and again
    (pg_terminate_backend), and once the database refuses connections for 3 s. Every answer is 200 or
    a 503 that says why; afterwards requests succeed again; every prediction answered 200 is stored;
    the audit chain verifies."""
    database = make_url(pg_url).database
    db = Database(pg_url)
    db.upgrade()
    audit = AuditLog("reliability-audit-key")
    with db.transaction() as session:
        _, token = accounts.create_token(session, audit, "lis-reliability", actor="test")
    env = {
        "WBC_DATABASE_URL": pg_url,
        "WBC_AUTH_REQUIRED": "true",
        "WBC_AUDIT_KEY": "reliability-audit-key",
        "WBC_IMAGE_STORE": str(tmp_path / "cells"),
        "WBC_SITE": "barcelona-pbc",
    }
    settings = make_settings(pg_url)
    env |= {
        "WBC_REGISTRY": str(settings.registry),
        "WBC_MODEL_NAME": settings.model_name,
        "WBC_INTRA_OP_THREADS": "1",
    }
    service = ServiceProcess(free_port(), env, tmp_path / "server.log")
    service.start()
    headers = {"Authorization": f"Bearer {token}"}
    stop = threading.Event()
    lock = threading.Lock()
    statuses: Counter = Counter()
    answered_ids: list[int] = []
    bad: list[str] = []
    timeline: list[tuple[float, int]] = []

    def client(number: int) -> None:
        with httpx.Client(base_url=service.url, timeout=60, headers=headers) as http:
            i = number
            while not stop.is_set():
                name, data = barcelona_jpegs[i % len(barcelona_jpegs)]
                i += 4
                try:
                    r = http.post("/v1/classify", files=[("files", (name, data))])
                except httpx.HTTPError as exc:
                    with lock:
                        bad.append(f"{type(exc).__name__}: {exc}")
                    continue
                with lock:
                    statuses[r.status_code] += 1
                    timeline.append((time.monotonic(), r.status_code))
                    if r.status_code == 200:
                        answered_ids.append(r.json()["results"][0]["id"])
                    elif r.status_code != 503 or not r.json().get("detail"):
                        bad.append(f"HTTP {r.status_code}: {r.text[:300]}")

    def terminate_backends() -> int:
        with pg_admin.connect() as connection:
            return connection.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).scalar_one()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    terminated = 0
    try:
        time.sleep(2)
        for _ in range(4):  # connections cut under the running service
            terminated += terminate_backends()
            time.sleep(0.7)
        with pg_admin.connect() as connection:  # the database gone for 3 s
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        terminated += terminate_backends()
        outage_start = time.monotonic()
        time.sleep(3)
        with pg_admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        outage_end = time.monotonic()
        time.sleep(3.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=60)
        with pg_admin.connect() as connection:
            connection.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
    service.stop()
    log = service.log()

    with db.transaction() as session:
        stored_ids = set(session.scalars(select(Cell.id)))
        report = audit.verify(session)
    db.dispose()
    during = Counter(s for at, s in timeline if outage_start + 0.5 <= at < outage_end)
    recovered = [s for at, s in timeline if at >= outage_end + 2]
    ghosts = len(stored_ids) - len(set(answered_ids))
    print(
        f"\ndatabase lost: {terminated} backends terminated; statuses {dict(statuses)}; during the 3 s outage "
        f"{dict(during)}; after it {Counter(recovered)}; {len(answered_ids)} answered 200, {len(stored_ids)} stored "
        f"({ghosts} stored but answered 503: committed as the connection died); {load_average()}"
    )
    assert bad == [], bad[:10]
    assert set(answered_ids) <= stored_ids, "a prediction answered 200 is missing from the database"
    assert len(answered_ids) == len(set(answered_ids))
    assert during and set(during) == {503}, during  # the outage is answered 503, not 500
    assert recovered and set(recovered) == {200}, Counter(recovered)
    assert report.ok, report.problems
    assert "Traceback" not in log, log[log.index("Traceback") - 500 : log.index("Traceback") + 3000]


# ---- kill -9 while exporting and registering ------------------------------------------------------------------
@pytest.mark.slow
def test_kill_during_export_and_registration_leaves_only_whole_versions(
    tmp_path: Path, model_contract: ModelContract, jpeg_bytes: bytes
) -> None:
    """A writer that exports the network to ONNX and registers it, in a loop, is SIGKILLed at several
    moments (inside torch's export, inside the registry's copy + fsync + rename). The registry lists only
    whole versions (every sha256 verifies, numbers contiguous), and a service started on it serves the
    newest. Extends tests/models/test_registry.py's kill test (registration only) with the export."""
    root = tmp_path / "registry"
    script = textwrap.dedent(f"""
        import torch, timm
        from pathlib import Path
        from models.contract import ModelContract
        from models.export import export_onnx
        from models.registry import Registry
        torch.set_num_threads(1)
        contract = ModelContract.model_validate_json({model_contract.model_dump_json()!r})
        net = timm.create_model(contract.architecture, pretrained=False, num_classes=contract.num_classes)
        registry = Registry({str(root)!r}, {MODEL!r})
        work = Path({str(tmp_path)!r}) / "export"
        work.mkdir(exist_ok=True)
        print("ready", flush=True)
        while True:
            onnx = export_onnx(net, contract, work / "model.onnx")
            registry.register(onnx, contract, {{"lineage": {{"run_id": "killed"}}, "padding": "x" * 100000}})
            print("registered", flush=True)
        """)

    def writer() -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=ROOT, text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc

    # First run: time one export + registration cycle, then kill in the middle of the next one.
    proc = writer()
    began = time.monotonic()
    assert proc.stdout.readline().strip() == "registered"
    cycle = time.monotonic() - began
    kills = []
    for fraction in (0.5, 0.3, 0.8, 1.4, 1.9):
        if kills:
            proc = writer()
        time.sleep(fraction * cycle)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(round(fraction * cycle, 2))
    registry = Registry(root, MODEL)
    versions = registry.versions()
    assert versions, "the writer never registered a version before it was killed"
    for info in versions:
        info.verify()  # sha256 of model.onnx as recorded
    assert [v.version for v in versions] == list(range(1, len(versions) + 1))
    leftovers = registry.clean_staging()  # staging folders of registrations cut short

    from fastapi.testclient import TestClient

    from service.config import Settings
    from service.main import create_app

    settings = Settings(
        registry=root,
        model_name=MODEL,
        intra_op_threads=1,
        database_url=f"sqlite:///{tmp_path}/wbc.db",
        image_store=tmp_path / "cells",
    )
    with TestClient(create_app(settings)) as client:
        ready = client.get("/v2/health/ready")
        classified = client.post("/v1/classify", files=[("files", ("cell.jpg", jpeg_bytes))])
    print(
        f"\none export + registration cycle {cycle:.1f} s; killed at {kills} s into a cycle: "
        f"{len(versions)} whole versions, {leftovers} unfinished staging folders removed; {load_average()}"
    )
    assert ready.status_code == 200 and ready.json()["version"] == versions[-1].version
    assert classified.status_code == 200
