"""`wbc review export`: signed-off cells only, reviewer labels, whole specimens per split, stable splits,
the shared data's layout, and never over a folder that is not an earlier export."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from review_helpers import SITE, classified
from sqlalchemy import select

from federation.sites import DataRoot
from service.audit import AuditLog
from service.db.models import Cell
from service.db.session import Database
from service.review import workflow
from service.review.export import ExportError, export_site, split_for
from service.review.images import ImageStore
from service.review.recorder import PredictionRecorder


def record_and_sign(
    db: Database, log: AuditLog, recorder: PredictionRecorder, cells: list, specimen: str, sign: bool = True
) -> list[int]:
    ids = recorder([classified(name, data, "neutrophil", specimen) for name, data, _ in cells])
    with db.transaction() as session:
        for cell_id, (_, _, expert) in zip(ids, cells):
            workflow.review_cell(session, log, cell_id, expert, "dr-rivera")
        if sign:
            workflow.sign_off(session, log, session.get(Cell, ids[0]).specimen_id, "dr-rivera")
    return ids


def test_export_layout_labels_and_splits(pg_db, audit_log, barcelona_cells, tmp_path: Path) -> None:
    images = ImageStore(tmp_path / "cells")
    recorder = PredictionRecorder(pg_db, images, audit_log, SITE)
    for i in range(8):  # eight specimens of 1-2 cells
        cells = [barcelona_cells[(i + k) % len(barcelona_cells)] for k in range(1 + i % 2)]
        record_and_sign(pg_db, audit_log, recorder, cells, f"S-{i}")
    unsigned = record_and_sign(pg_db, audit_log, recorder, barcelona_cells[:1], "S-open", sign=False)

    out = tmp_path / "export"
    summary = export_site(pg_db, images, audit_log, SITE, out, "cli:test")
    root = DataRoot(out)
    assert summary.cells == len(root.samples) == sum(1 + i % 2 for i in range(8))
    assert summary.specimens == 8
    splits_of_group = defaultdict(set)
    for sample in root.samples:
        assert sample.path.parent == out / "sites" / SITE / sample.label
        assert sample.split == split_for(SITE, sample.group)
        splits_of_group[sample.group].add(sample.split)
    assert all(len(s) == 1 for s in splits_of_group.values())  # a specimen never spans two splits
    exported_ids = {int(s.path.stem.split("-")[1]) for s in root.samples}
    assert not exported_ids & set(unsigned)
    with pg_db.transaction() as session:
        labels = dict(session.execute(select(Cell.id, Cell.reviewed_label)).all())
    assert all(labels[int(s.path.stem.split("-")[1])] == s.label for s in root.samples)

    # Re-export after more sign-offs: old specimens keep their split, the folder is replaced whole.
    before = {s.group: s.split for s in root.samples}
    record_and_sign(pg_db, audit_log, recorder, barcelona_cells[2:4], "S-late")
    export_site(pg_db, images, audit_log, SITE, out, "cli:test")
    after = {s.group: s.split for s in DataRoot(out).samples}
    assert {g: after[g] for g in before} == before and len(after) == len(before) + 1
    assert not list(tmp_path.glob(".export.*"))  # no staging or old folders left behind


def test_split_rule_is_roughly_70_10_20() -> None:
    counts = defaultdict(int)
    for i in range(3000):
        counts[split_for(SITE, f"specimen-{i}")] += 1
    assert counts["train"] / 3000 == pytest.approx(0.7, abs=0.03)
    assert counts["val"] / 3000 == pytest.approx(0.1, abs=0.02)
    assert counts["test"] / 3000 == pytest.approx(0.2, abs=0.03)


def test_export_refuses_foreign_folder_and_empty_site(
    pg_db, audit_log, barcelona_cells, tmp_path: Path
) -> None:
    images = ImageStore(tmp_path / "cells")
    with pytest.raises(ExportError, match="no reviewed cells"):
        export_site(pg_db, images, audit_log, SITE, tmp_path / "out", "cli:test")
    recorder = PredictionRecorder(pg_db, images, audit_log, SITE)
    record_and_sign(pg_db, audit_log, recorder, barcelona_cells[:1], "S-1")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not an earlier export"):
        export_site(pg_db, images, audit_log, SITE, foreign, "cli:test")
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ExportError, match="no reviewed cells"):
        export_site(pg_db, images, audit_log, "tehran-lisc", tmp_path / "out", "cli:test")
