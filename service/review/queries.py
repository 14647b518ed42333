"""What the worklist shows: cells filtered by specimen, predicted class, "unidentified", low confidence
and review status; one summary line per specimen; a cell as the page and the JSON API present it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session, joinedload

from models.contract import UNIDENTIFIED
from service.db.models import Cell, Specimen
from service.review.workflow import review_labels

Status = Literal["all", "unreviewed", "reviewed"]


@dataclass(frozen=True)
class WorklistFilter:
    specimen: int | None = None
    predicted: str | None = None
    unidentified: bool = False
    low_confidence: bool = False
    status: Status = "all"
    include_signed: bool = False  # cells of signed-off specimens too

    def query_args(self) -> dict[str, Any]:
        """The filter as URL query parameters (defaults left out)."""
        args = {
            "specimen": self.specimen,
            "predicted": self.predicted,
            "unidentified": self.unidentified or None,
            "low_confidence": self.low_confidence or None,
            "status": None if self.status == "all" else self.status,
            "include_signed": self.include_signed or None,
        }
        return {k: v for k, v in args.items() if v not in (None, "")}


def worklist(
    session: Session, f: WorklistFilter, low_threshold: float, limit: int = 120, offset: int = 0
) -> tuple[list[Cell], int]:
    """(cells of this page, total matching), oldest specimen first, cells in arrival order."""
    query = select(Cell).join(Cell.specimen)
    if f.specimen is not None:
        query = query.where(Cell.specimen_id == f.specimen)
    if not f.include_signed and f.specimen is None:
        query = query.where(Specimen.signed_off_at.is_(None))
    if f.predicted:
        query = query.where(Cell.predicted_label == f.predicted)
    if f.unidentified:
        query = query.where(Cell.predicted_label == UNIDENTIFIED)
    if f.low_confidence:
        query = query.where(Cell.confidence < low_threshold)
    if f.status == "unreviewed":
        query = query.where(Cell.reviewed_label.is_(None))
    elif f.status == "reviewed":
        query = query.where(Cell.reviewed_label.is_not(None))
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    cells = session.scalars(
        query.options(joinedload(Cell.specimen))
        .order_by(Cell.specimen_id, Cell.id)
        .limit(limit)
        .offset(offset)
    ).all()
    return list(cells), total


@dataclass(frozen=True)
class SpecimenSummary:
    id: int
    name: str
    cells: int
    unreviewed: int
    unidentified: int
    corrected: int
    signed_off_by: str | None
    signed_off_at: str | None

    @property
    def can_sign_off(self) -> bool:
        return self.cells > 0 and not self.unreviewed and not self.unidentified and self.signed_off_at is None


def specimen_summaries(
    session: Session, include_signed: bool = False, specimen_id: int | None = None
) -> list[SpecimenSummary]:
    unreviewed = func.sum(case((Cell.reviewed_label.is_(None), 1), else_=0))
    unidentified = func.sum(
        case(
            (
                (Cell.reviewed_label == UNIDENTIFIED)
                | (Cell.reviewed_label.is_(None) & (Cell.predicted_label == UNIDENTIFIED)),
                1,
            ),
            else_=0,
        )
    )
    corrected = func.sum(
        case((Cell.reviewed_label.is_not(None) & (Cell.reviewed_label != Cell.predicted_label), 1), else_=0)
    )
    query = (
        select(Specimen, func.count(Cell.id), unreviewed, unidentified, corrected)
        .outerjoin(Cell, Cell.specimen_id == Specimen.id)
        .group_by(Specimen.id)
        .order_by(Specimen.id)
    )
    if specimen_id is not None:
        query = query.where(Specimen.id == specimen_id)
    elif not include_signed:
        query = query.where(Specimen.signed_off_at.is_(None))
    return [
        SpecimenSummary(
            s.id,
            s.display_name,
            n or 0,
            int(u or 0),
            int(x or 0),
            int(c or 0),
            s.signed_off_by,
            s.signed_off_at.isoformat(timespec="seconds") if s.signed_off_at else None,
        )
        for s, n, u, x, c in session.execute(query)
    ]


def predicted_labels(session: Session) -> list[str]:
    return list(session.scalars(select(Cell.predicted_label).distinct().order_by(Cell.predicted_label)))


def cell_view(
    cell: Cell, low_threshold: float, extra_labels: tuple[str, ...] = (), top: int = 3
) -> dict[str, Any]:
    """A cell as the worklist shows it (also the JSON API's cell)."""
    ranked = sorted(cell.probabilities.items(), key=lambda item: item[1], reverse=True)
    status = (
        "unreviewed"
        if cell.reviewed_label is None
        else ("confirmed" if cell.reviewed_label == cell.predicted_label else "corrected")
    )
    return {
        "id": cell.id,
        "specimen_id": cell.specimen_id,
        "specimen": cell.specimen.display_name,
        "signed_off": cell.specimen.signed_off_at is not None,
        "slide": cell.slide,
        "predicted_label": cell.predicted_label,
        "confidence": cell.confidence,
        "low_confidence": cell.confidence < low_threshold,
        "label": cell.label,
        "status": status,
        "reviewed_by": cell.reviewed_by,
        "reviewed_at": cell.reviewed_at.isoformat(timespec="seconds") if cell.reviewed_at else None,
        "model": f"{cell.model_name} v{cell.model_version}",
        "top": [{"label": label, "probability": p} for label, p in ranked[:top]],
        "labels": review_labels(cell, extra_labels),
        "image_url": f"/review/cells/{cell.id}/image",
    }
