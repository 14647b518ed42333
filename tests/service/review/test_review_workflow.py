"""Recording, reviewing and signing off on PostgreSQL, with chosen predictions on real Barcelona images
(the recorder is the real sink /v1/classify calls; only the model's answer is picked by the test)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from review_helpers import SITE, Service, classified
from sqlalchemy import select

from models.contract import UNIDENTIFIED
from service.audit import AuditLog
from service.db.models import AuditEntry, Cell, Specimen
from service.db.session import Database
from service.review import workflow
from service.review.images import ImageStore
from service.review.recorder import PredictionRecorder
from service.review.workflow import ReviewError


@pytest.fixture()
def recorder(pg_db: Database, audit_log: AuditLog, tmp_path: Path) -> PredictionRecorder:
    return PredictionRecorder(pg_db, ImageStore(tmp_path / "cells"), audit_log, SITE)


def review(db: Database, log: AuditLog, cell_id: int, label: str, extra: tuple[str, ...] = ()) -> Cell:
    with db.transaction() as session:
        return workflow.review_cell(session, log, cell_id, label, "dr-rivera", extra)


def sign_off(db: Database, log: AuditLog, specimen_id: int) -> Specimen:
    with db.transaction() as session:
        return workflow.sign_off(session, log, specimen_id, "dr-rivera")


def test_unidentified_blocks_sign_off_until_classified(recorder, pg_db, audit_log, barcelona_cells) -> None:
    (n1, d1, _), (n2, d2, _) = barcelona_cells[:2]
    ids = recorder([classified(n1, d1, "neutrophil", "S-1"), classified(n2, d2, UNIDENTIFIED, "S-1", 0.4)])
    with pg_db.transaction() as session:
        specimen_id = session.get(Cell, ids[0]).specimen_id
    review(pg_db, audit_log, ids[0], "neutrophil")
    with pytest.raises(ReviewError, match="1 cell not reviewed and 1 unidentified") as blocked:
        sign_off(pg_db, audit_log, specimen_id)
    assert blocked.value.status == 409
    with pytest.raises(
        ReviewError, match="is not one of"
    ) as refused:  # a person gives a class, not "unidentified"
        review(pg_db, audit_log, ids[1], UNIDENTIFIED)
    assert refused.value.status == 422
    review(pg_db, audit_log, ids[1], "eosinophil")
    assert sign_off(pg_db, audit_log, specimen_id).signed_off_by == "dr-rivera"
    with pytest.raises(ReviewError, match="already signed off"):
        sign_off(pg_db, audit_log, specimen_id)
    with pytest.raises(ReviewError, match="signed off") as late:
        review(pg_db, audit_log, ids[0], "lymphocyte")
    assert late.value.status == 409


def test_extra_labels_and_review_history(recorder, pg_db, audit_log, barcelona_cells) -> None:
    name, data, _ = barcelona_cells[0]
    (cell_id,) = recorder([classified(name, data, "lymphocyte", "S-2")])
    with pytest.raises(ReviewError):
        review(pg_db, audit_log, cell_id, "erythroblast")
    review(pg_db, audit_log, cell_id, "erythroblast", extra=("erythroblast", "ig"))
    review(pg_db, audit_log, cell_id, "lymphocyte", extra=("erythroblast", "ig"))
    with pg_db.transaction() as session:
        cell = session.get(Cell, cell_id)
        assert [(r.old_label, r.new_label) for r in cell.reviews] == [
            ("lymphocyte", "erythroblast"),
            ("erythroblast", "lymphocyte"),
        ]
        assert cell.reviewed_label == "lymphocyte"
    with pytest.raises(ReviewError) as missing:
        review(pg_db, audit_log, 10_000, "lymphocyte")
    assert missing.value.status == 404


def test_specimens_batches_and_reopening(recorder, pg_db, audit_log, barcelona_cells) -> None:
    (n1, d1, _), (n2, d2, _), (n3, d3, _) = barcelona_cells[:3]
    a = recorder([classified(n1, d1, "neutrophil")])  # no specimen named: a batch of its own
    b = recorder([classified(n2, d2, "neutrophil")])
    with pg_db.transaction() as session:
        batches = {session.get(Cell, a[0]).specimen_id, session.get(Cell, b[0]).specimen_id}
    assert len(batches) == 2

    (first,) = recorder([classified(n1, d1, "neutrophil", "S-3")])
    review(pg_db, audit_log, first, "neutrophil")
    with pg_db.transaction() as session:
        specimen_id = session.get(Cell, first).specimen_id
    sign_off(pg_db, audit_log, specimen_id)
    recorder([classified(n3, d3, "lymphocyte", "S-3")])  # a late cell re-opens the specimen
    with pg_db.transaction() as session:
        specimen = session.get(Specimen, specimen_id)
        assert specimen.signed_off_at is None and len(specimen.cells) == 2
        actions = session.scalars(select(AuditEntry.action).order_by(AuditEntry.seq)).all()
    assert actions[-2:] == ["specimen.reopened", "prediction.served"]


def test_same_new_specimen_from_parallel_requests(recorder, pg_db, barcelona_cells) -> None:
    errors = []

    def send(i: int) -> None:
        name, data, _ = barcelona_cells[i]
        try:
            recorder([classified(name, data, "neutrophil", "S-PARALLEL")])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with pg_db.transaction() as session:
        specimens = session.scalars(select(Specimen).where(Specimen.accession == "S-PARALLEL")).all()
        assert len(specimens) == 1 and len(specimens[0].cells) == 4


def test_worklist_page_and_images(service: Service, barcelona_cells) -> None:
    lab = service.add_token()
    service.add_user("rev", "reviewer")
    from review_helpers import files
    from upload_helpers import reencode

    name, data, _ = barcelona_cells[0]
    tiff = reencode(data, "TIFF")
    body = service.client.post(
        "/v1/classify",
        files=files([(name, data, ""), ("cell.tif", tiff, "")]),
        headers=lab,
        data={"specimen": "BCN-77"},
    ).json()
    jpeg_id, tiff_id = (r["id"] for r in body["results"])
    service.login("rev")
    page = service.client.get("/review")
    assert page.status_code == 200
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["cache-control"] == "no-store"
    assert page.text.count('data-testid="cell"') == 2 and "BCN-77" in page.text
    as_sent = service.client.get(f"/review/cells/{jpeg_id}/image")
    assert as_sent.headers["content-type"] == "image/jpeg" and as_sent.content == data
    converted = service.client.get(f"/review/cells/{tiff_id}/image")
    assert converted.headers["content-type"] == "image/png" and converted.content.startswith(b"\x89PNG")
    assert service.client.get("/review?specimen=abc").status_code == 422
