"""Promotion and rollback (issue 4's /v1/admin/model routes) with admin accounts, and in the audit chain."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from review_helpers import PASSWORD, REVIEW_MODEL
from sqlalchemy import select

from models.registry import Registry
from service import accounts
from service.db.models import AuditEntry
from service.main import create_app


def test_promote_and_rollback_are_audited(
    make_settings, pg_url, exported_onnx, model_contract, tmp_path
) -> None:
    registry = tmp_path / "registry"
    contract = model_contract.model_copy(update={"temperature": 0.01, "abstain_threshold": 0.5})
    for run in ("a", "b"):
        Registry(registry, REVIEW_MODEL).register(exported_onnx, contract, {"lineage": {"run_id": run}})
    app = create_app(make_settings(pg_url, registry=registry, version="production"))
    with TestClient(app) as client:
        with app.state.db.transaction() as session:
            accounts.create_user(session, app.state.audit, "boss", PASSWORD, "admin", actor="test")
            accounts.create_user(session, app.state.audit, "rev", PASSWORD, "reviewer", actor="test")
        admin = ("boss", PASSWORD)
        assert client.post("/v1/admin/model/promote", json={"version": 2}).status_code == 401
        assert (
            client.post("/v1/admin/model/promote", json={"version": 2}, auth=("rev", PASSWORD)).status_code
            == 403
        )
        assert client.post("/v1/admin/model/promote", json={"version": 1}, auth=admin).status_code == 200
        assert (
            client.post(
                "/v1/admin/model/promote", json={"version": 2, "reason": "better"}, auth=admin
            ).status_code
            == 200
        )
        assert client.post("/v1/admin/model/rollback", json={}, auth=admin).status_code == 200
        assert client.post("/v1/admin/model/promote", json={"version": 9}, auth=admin).status_code == 404
        with app.state.db.transaction() as session:
            entries = session.scalars(
                select(AuditEntry).where(AuditEntry.action.like("model.%")).order_by(AuditEntry.seq)
            ).all()
            assert app.state.audit.verify(session).ok
    assert [(e.action, e.actor, json.loads(e.details)["version"]) for e in entries] == [
        ("model.promoted", "boss", 1),
        ("model.promoted", "boss", 2),
        ("model.rolled_back", "boss", 1),
    ]
    assert json.loads(entries[1].details)["reason"] == "better"
