"""The issue's 'done when', over the HTTP API on PostgreSQL: a lab system classifies a Barcelona specimen,
a reviewer corrects two cells and confirms the rest, signs off; the cells are exported as site data;
`wbc audit verify` passes, and fails once an audit row is edited."""

from __future__ import annotations

from pathlib import Path

from review_helpers import SITE, Service, files
from sqlalchemy import select, text
from typer.testing import CliRunner

from cli.main import app as cli
from federation.sites import DataRoot
from models.contract import UNIDENTIFIED
from service.db.models import AuditEntry, Cell, Review


def test_classify_review_sign_off_export_audit(
    service: Service, barcelona_cells: list, tmp_path: Path
) -> None:
    lab = service.add_token("lis-barcelona")
    service.add_user("dr-rivera", "reviewer")

    # 1. The laboratory system classifies one specimen's cells.
    response = service.client.post(
        "/v1/classify",
        files=files(barcelona_cells),
        headers=lab,
        data={"specimen": "BCN-2026-0042", "slide": "S1"},
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    ids = [r["id"] for r in results]
    assert all(isinstance(i, int) for i in ids)

    with service.db.transaction() as session:
        stored = session.scalars(select(Cell).order_by(Cell.id)).all()
        assert [c.id for c in stored] == ids
        assert {c.requested_by for c in stored} == {"token:lis-barcelona"}
        assert {c.specimen.accession for c in stored} == {"BCN-2026-0042"}
        assert [c.predicted_label for c in stored] == [r["label"] for r in results]
        assert all(service.settings.image_store.joinpath(c.image_path).is_file() for c in stored)
        specimen_id = stored[0].specimen_id

    # 2. The reviewer signs in and filters the worklist.
    csrf = service.login("dr-rivera")
    headers = {"X-CSRF-Token": csrf}
    listed = service.client.get("/v1/review/cells", params={"specimen": specimen_id}).json()
    assert listed["total"] == len(barcelona_cells)
    unidentified = service.client.get("/v1/review/cells", params={"unidentified": True}).json()
    assert {c["id"] for c in unidentified["cells"]} == {
        r["id"] for r in results if r["label"] == UNIDENTIFIED
    }
    low = service.client.get("/v1/review/cells", params={"low_confidence": True}).json()
    assert all(c["confidence"] < service.settings.low_confidence for c in low["cells"])
    first_class = next(r["label"] for r in results)
    by_class = service.client.get("/v1/review/cells", params={"predicted": first_class}).json()
    assert by_class["total"] == sum(r["label"] == first_class for r in results)

    # Not yet: every cell is unreviewed.
    blocked = service.client.post(f"/v1/review/specimens/{specimen_id}/sign-off", headers=headers)
    assert blocked.status_code == 409 and "not reviewed" in blocked.json()["detail"]

    # 3. Correct two cells to their expert label's neighbour, give the rest the expert label.
    classes = listed["cells"][0]["labels"]
    corrections = {}
    for cell, (_, _, expert) in zip(listed["cells"], barcelona_cells):
        if len(corrections) < 2:
            label = next(c for c in classes if c != cell["label"])
            corrections[cell["id"]] = (cell["label"], label)
        elif cell["label"] == UNIDENTIFIED:
            label = expert
        else:
            label = cell["label"]  # confirm
        answer = service.client.post(f"/v1/review/cells/{cell['id']}", json={"label": label}, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["label"] == label and answer.json()["reviewed_by"] == "dr-rivera"

    with service.db.transaction() as session:
        for cell_id, (old, new) in corrections.items():
            review = session.scalars(select(Review).where(Review.cell_id == cell_id)).one()
            assert (review.reviewer, review.old_label, review.new_label) == ("dr-rivera", old, new)
            assert review.at is not None

    # 4. Sign off; afterwards the cells cannot change.
    signed = service.client.post(f"/v1/review/specimens/{specimen_id}/sign-off", headers=headers)
    assert signed.status_code == 200, signed.text
    assert signed.json()["signed_off_by"] == "dr-rivera" and signed.json()["corrected"] >= 2
    late = service.client.post(f"/v1/review/cells/{ids[0]}", json={"label": classes[0]}, headers=headers)
    assert late.status_code == 409

    # 5. Export as site data, in the layout of ../shared/data/wbc.
    env = {
        "WBC_DATABASE_URL": service.settings.database_url.get_secret_value(),
        "WBC_AUDIT_KEY": "test-audit-key",
        "WBC_IMAGE_STORE": str(service.settings.image_store),
    }
    out = tmp_path / "site-data"
    runner = CliRunner()
    exported = runner.invoke(cli, ["review", "export", "--site", SITE, "--out", str(out)], env=env)
    assert exported.exit_code == 0, exported.output
    root = DataRoot(out)
    assert len(root.samples) == len(barcelona_cells)
    assert {s.site for s in root.samples} == {SITE}
    assert len({s.split for s in root.samples}) == 1  # one specimen → one split
    assert {s.group for s in root.samples} == {f"specimen-{specimen_id}"}
    with service.db.transaction() as session:
        final = {c.id: c.reviewed_label for c in session.scalars(select(Cell))}
    for sample in root.samples:
        cell_id = int(sample.path.stem.split("-")[1])
        assert sample.label == final[cell_id]
        assert sample.path.is_file() and sample.path.is_relative_to(out)
    assert "BCN-2026-0042" not in (out / "manifest.csv").read_text()

    # 6. The audit chain holds every step, verifies, and breaks when a row is edited.
    with service.db.transaction() as session:
        actions = [e.action for e in session.scalars(select(AuditEntry).order_by(AuditEntry.seq))]
    assert actions.count("prediction.served") == len(barcelona_cells)
    assert actions.count("cell.reviewed") == len(barcelona_cells)
    assert actions.count("specimen.signed_off") == 1 and actions[-1] == "site_data.exported"
    verified = runner.invoke(cli, ["audit", "verify"], env=env)
    assert verified.exit_code == 0, verified.output
    assert "intact" in verified.output

    with service.db.engine.begin() as connection:  # what someone with database rights could do
        connection.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        connection.execute(
            text(
                "UPDATE audit_log SET details = replace(details, :old, :new) "
                "WHERE action = 'cell.reviewed' AND seq = (SELECT min(seq) FROM audit_log "
                "WHERE action = 'cell.reviewed')"
            ),
            {"old": '"new":"', "new": '"new":"x'},
        )
    broken = runner.invoke(cli, ["audit", "verify"], env=env)
    assert broken.exit_code == 1
    assert "do not match its hash" in broken.output
