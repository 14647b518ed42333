"""Reviewer decisions: confirm or reclassify a cell, sign off a specimen. Each is audited.

A decision is a `reviews` row (who, when, old label, new label; equal labels = confirmed) plus the
cell's current `reviewed_label`. A specimen can be signed off only when every cell has been reviewed
and none is left "unidentified"; once signed off, its cells can no longer be changed. Rows are locked
(specimen first, then cell) so a sign-off and a late review of the same specimen cannot interleave.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from models.contract import UNIDENTIFIED
from service import audit
from service.audit import AuditLog
from service.db.models import Cell, Review, Specimen, utcnow


class ReviewError(Exception):
    """A decision that cannot be taken; `status` is the HTTP status that says why (404, 409, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def review_labels(cell: Cell, extra: tuple[str, ...] = ()) -> list[str]:
    """The labels a reviewer may give this cell: the model's classes in output order, then `extra`."""
    labels = list(cell.probabilities)
    return labels + [label for label in extra if label not in labels and label != UNIDENTIFIED]


def _locked_specimen(session: Session, specimen_id: int) -> Specimen:
    specimen = session.get(Specimen, specimen_id, with_for_update=True)
    if specimen is None:
        raise ReviewError(404, f"no specimen {specimen_id}")
    return specimen


def review_cell(
    session: Session,
    log: AuditLog,
    cell_id: int,
    label: str,
    reviewer: str,
    extra_labels: tuple[str, ...] = (),
) -> Cell:
    """Confirm (`label` = the cell's current label) or reclassify one cell."""
    found = session.get(Cell, cell_id)
    if found is None:
        raise ReviewError(404, f"no cell {cell_id}")
    specimen = _locked_specimen(session, found.specimen_id)
    cell = session.get(Cell, cell_id, with_for_update=True, populate_existing=True)
    if specimen.signed_off_at is not None:
        raise ReviewError(409, f"{specimen.display_name} is signed off; its cells can no longer change")
    allowed = review_labels(cell, extra_labels)
    if label not in allowed:
        raise ReviewError(422, f"label {label!r} is not one of {allowed}")
    old = cell.label
    now = utcnow()
    cell.reviewed_label, cell.reviewed_by, cell.reviewed_at = label, reviewer, now
    session.add(Review(cell_id=cell.id, reviewer=reviewer, at=now, old_label=old, new_label=label))
    log.append(
        session,
        actor=reviewer,
        action=audit.CELL_REVIEWED,
        subject=f"cell:{cell.id}",
        details={"old": old, "new": label, "predicted": cell.predicted_label, "specimen_id": specimen.id},
    )
    return cell


@dataclass(frozen=True)
class Blocking:
    unreviewed: int
    unidentified: int

    def __bool__(self) -> bool:
        return bool(self.unreviewed or self.unidentified)

    def describe(self) -> str:
        parts = []
        if self.unreviewed:
            parts.append(f"{self.unreviewed} cell{'s' * (self.unreviewed != 1)} not reviewed")
        if self.unidentified:
            parts.append(f"{self.unidentified} unidentified")
        return " and ".join(parts)


def blocking(session: Session, specimen_id: int) -> Blocking:
    """What stands between a specimen and its sign-off."""
    unreviewed = session.scalar(
        select(func.count())
        .select_from(Cell)
        .where(Cell.specimen_id == specimen_id, Cell.reviewed_label.is_(None))
    )
    unidentified = session.scalar(
        select(func.count())
        .select_from(Cell)
        .where(
            Cell.specimen_id == specimen_id,
            or_(
                Cell.reviewed_label == UNIDENTIFIED,
                Cell.reviewed_label.is_(None) & (Cell.predicted_label == UNIDENTIFIED),
            ),
        )
    )
    return Blocking(unreviewed or 0, unidentified or 0)


def sign_off(session: Session, log: AuditLog, specimen_id: int, reviewer: str) -> Specimen:
    specimen = _locked_specimen(session, specimen_id)
    if specimen.signed_off_at is not None:
        raise ReviewError(409, f"{specimen.display_name} was already signed off by {specimen.signed_off_by}")
    count = session.scalar(select(func.count()).select_from(Cell).where(Cell.specimen_id == specimen_id))
    if not count:
        raise ReviewError(409, f"{specimen.display_name} has no cells")
    if block := blocking(session, specimen_id):
        raise ReviewError(409, f"{specimen.display_name} cannot be signed off: {block.describe()}")
    specimen.signed_off_at, specimen.signed_off_by = utcnow(), reviewer
    corrected = session.scalar(
        select(func.count())
        .select_from(Cell)
        .where(Cell.specimen_id == specimen_id, Cell.reviewed_label != Cell.predicted_label)
    )
    log.append(
        session,
        actor=reviewer,
        action=audit.SPECIMEN_SIGNED_OFF,
        subject=f"specimen:{specimen.id}",
        details={"cells": count, "corrected": corrected or 0},
    )
    return specimen
