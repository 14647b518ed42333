"""Review-loop fixtures: a fresh PostgreSQL database per test, the service with auth on, real Barcelona cells.

PostgreSQL: WBC_TEST_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test, trust auth) is
the maintenance connection; each test gets its own `wbc_test_<pid>_<random>` database, dropped after,
so parallel runs never share state. Without a server these tests are skipped (saying so), unless
WBC_REQUIRE_POSTGRES=1, when they fail: CI sets it after starting the cluster.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from review_helpers import AUDIT_KEY, REVIEW_MODEL, SITE, Service
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from federation.sites import DataRoot
from models.contract import ModelContract
from models.registry import Registry
from service.audit import AuditLog
from service.config import Settings
from service.db.session import Database
from service.main import create_app

PG_ADMIN_URL = os.environ.get("WBC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_START = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    engine = create_engine(
        make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg"),
        isolation_level="AUTOCOMMIT",
        poolclass=NullPool,
    )
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        message = f"needs PostgreSQL at {PG_ADMIN_URL} (start it: {PG_START}): {str(exc).splitlines()[0]}"
        if os.environ.get("WBC_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)
    yield engine
    engine.dispose()


@pytest.fixture()
def pg_url(pg_admin: Engine) -> Iterator[str]:
    name = f"wbc_test_{os.getpid()}_{secrets.token_hex(4)}"
    with pg_admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(drivername="postgresql+psycopg", database=name).render_as_string(False)
    with pg_admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture()
def pg_db(pg_url: str) -> Iterator[Database]:
    db = Database(pg_url)
    db.upgrade()
    yield db
    db.dispose()


@pytest.fixture()
def audit_log() -> AuditLog:
    return AuditLog(AUDIT_KEY)


@pytest.fixture(scope="session")
def review_registry(
    tmp_path_factory: pytest.TempPathFactory, exported_onnx: Path, model_contract: ModelContract
) -> Path:
    """The service tests' network with a sharp temperature and an abstain threshold, so some real cells
    come back as a class and some as "unidentified"."""
    root = tmp_path_factory.mktemp("review-registry")
    contract = model_contract.model_copy(update={"temperature": 0.01, "abstain_threshold": 0.5})
    Registry(root, REVIEW_MODEL).register(exported_onnx, contract, {"lineage": {"run_id": "review-tests"}})
    return root


@pytest.fixture()
def make_settings(review_registry: Path, tmp_path: Path) -> Callable[..., Settings]:
    def make(database_url: str, **overrides: object) -> Settings:
        values = {
            "registry": review_registry,
            "model_name": REVIEW_MODEL,
            "intra_op_threads": 1,
            "device": "cpu",
            "database_url": database_url,
            "image_store": tmp_path / "cells",
            "site": SITE,
            "auth_required": True,
            "audit_key": AUDIT_KEY,
            "max_queue_delay_ms": 0.0,
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture()
def service(make_settings: Callable[..., Settings], pg_url: str) -> Iterator[Service]:
    settings = make_settings(pg_url)
    app = create_app(settings)
    with TestClient(app) as client:
        yield Service(client, settings, app.state.db, app.state.audit)


@pytest.fixture(scope="session")
def barcelona_cells(data_root: DataRoot) -> list[tuple[str, bytes, str]]:
    """Six real Barcelona crops (name, bytes, expert label), two of each of three classes."""
    picks = []
    for label in ("neutrophil", "lymphocyte", "eosinophil"):
        for sample in data_root.select([SITE], ["test"], [label])[:2]:
            picks.append((sample.path.name, sample.path.read_bytes(), label))
    return picks
