"""Constants and a small handle on a running test service, shared by the review-loop tests."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi.testclient import TestClient

from service import accounts
from service.audit import AuditLog
from service.config import Settings
from service.db.session import Database

REVIEW_MODEL = "wbc-review-test"
SITE = "barcelona-pbc"
AUDIT_KEY = "test-audit-key"
PASSWORD = "correct horse battery"


def files(cells: list[tuple[str, bytes, str]]) -> list[tuple[str, tuple[str, bytes, str]]]:
    """(name, bytes, label) cells → the multipart `files` field of /v1/classify."""
    return [("files", (name, data, "image/jpeg")) for name, data, _ in cells]


@dataclass
class Service:
    client: TestClient
    settings: Settings
    db: Database
    log: AuditLog

    def add_user(self, name: str, role: str) -> tuple[str, str]:
        with self.db.transaction() as session:
            accounts.create_user(session, self.log, name, PASSWORD, role, actor="test")
        return name, PASSWORD

    def add_token(self, name: str = "lis-barcelona") -> dict[str, str]:
        with self.db.transaction() as session:
            _, token = accounts.create_token(session, self.log, name, actor="test")
        return {"Authorization": f"Bearer {token}"}

    def login(self, name: str, password: str = PASSWORD) -> str:
        """Sign the test client in; returns the session's CSRF token (read from the worklist page)."""
        response = self.client.post(
            "/review/login", data={"username": name, "password": password}, follow_redirects=False
        )
        assert response.status_code == 303, response.text
        page = self.client.get("/review")
        marker = 'name="csrf-token" content="'
        start = page.text.index(marker) + len(marker)
        return page.text[start : page.text.index('"', start)]


def classified(
    name: str,
    data: bytes,
    label: str,
    specimen: str | None = None,
    confidence: float = 0.9,
    classes: tuple[str, ...] = ("eosinophil", "lymphocyte", "neutrophil"),
):
    """A service.sink.ClassifiedCell as /v1/classify hands it to the sink, with a chosen answer."""
    from service.sink import ClassifiedCell

    top = label if label in classes else classes[0]
    rest = (1.0 - confidence) / (len(classes) - 1)
    probabilities = {c: (confidence if c == top else rest) for c in classes}
    return ClassifiedCell(
        filename=name,
        data=data,
        format="JPEG",
        sop_instance_uid=None,
        label=label,
        confidence=confidence,
        probabilities=probabilities,
        model_name="wbc-test",
        model_version=1,
        model_precision="fp32",
        requested_by="token:lis",
        route="/v1/classify",
        specimen=specimen,
    )
