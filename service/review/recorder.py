"""The prediction sink (service.sink): every classified cell is stored before the laboratory sees it.

One request is one transaction: its specimen (found by the lab system's accession, or a new unnamed
batch), one `cells` row per image with the image kept in the site's image store, and one
`prediction.served` audit entry per prediction. If anything fails nothing is committed and the route
answers 503, so a result the laboratory has seen was always recorded.

A request that names an already signed-off specimen re-opens it (audited as `specimen.reopened`): the
new cells need review and the specimen a new sign-off.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service import audit
from service.audit import AuditLog
from service.db.models import Cell, Specimen, utcnow
from service.db.session import Database
from service.review.images import ImageStore

MAX_ID_LENGTH = 128


def _identifier(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if len(text) > MAX_ID_LENGTH:
        raise ValueError(f"specimen/slide identifier longer than {MAX_ID_LENGTH} characters")
    return text or None


class PredictionRecorder:
    """`app.state.prediction_sink`: called on a worker thread with one request's classified cells."""

    def __init__(self, db: Database, images: ImageStore, log: AuditLog, site: str):
        self.db, self.images, self.log, self.site = db, images, log, site

    def __call__(self, cells: Sequence[Any]) -> list[int | None]:
        """`cells` are service.sink.ClassifiedCell; returns the new cell ids (None for tensor inputs)."""
        stored = [(c, self.images.put(c.data)) if c.data else (c, None) for c in cells]
        with self.db.transaction() as session:
            specimen = None
            ids: list[int | None] = []
            for cell, image in stored:
                actor = cell.requested_by or "anonymous"
                if image is None:  # a raw tensor (KServe v2): nothing a person could review
                    self.log.append(
                        session,
                        actor=actor,
                        action=audit.PREDICTION_SERVED,
                        subject="tensor",
                        details=self._details(cell, None),
                    )
                    ids.append(None)
                    continue
                if specimen is None:
                    specimen = self._specimen(session, _identifier(cell.specimen), actor)
                relative, digest, media_type = image
                row = Cell(
                    specimen_id=specimen.id,
                    slide=_identifier(cell.slide),
                    site=self.site,
                    filename=(cell.filename or "")[:255],
                    image_path=relative,
                    image_sha256=digest,
                    media_type=media_type,
                    requested_by=actor,
                    model_name=cell.model_name,
                    model_version=cell.model_version,
                    predicted_label=cell.label,
                    confidence=float(cell.confidence),
                    probabilities={k: float(v) for k, v in cell.probabilities.items()},
                    created_at=cell.received_at,
                )
                session.add(row)
                session.flush()
                self.log.append(
                    session,
                    actor=actor,
                    action=audit.PREDICTION_SERVED,
                    subject=f"cell:{row.id}",
                    details=self._details(cell, row),
                )
                ids.append(row.id)
        return ids

    @staticmethod
    def _details(cell: Any, row: Cell | None) -> dict[str, Any]:
        details = {
            "model": cell.model_name,
            "version": cell.model_version,
            "label": cell.label,
            "confidence": round(float(cell.confidence), 6),
            "route": cell.route,
        }
        if row is not None:
            details |= {"specimen_id": row.specimen_id, "image_sha256": row.image_sha256}
        return details

    def _specimen(self, session: Session, accession: str | None, actor: str) -> Specimen:
        if accession is None:  # the lab system named none: this request's cells form one batch
            specimen = Specimen(accession=None, site=self.site)
            session.add(specimen)
            session.flush()
            return specimen
        # Insert-if-absent, so two requests for one new specimen never collide on the unique accession.
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        session.execute(
            insert(Specimen)
            .values(accession=accession, site=self.site, created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["accession"])
        )
        specimen = session.scalars(
            select(Specimen).where(Specimen.accession == accession).with_for_update()
        ).one()
        if specimen.signed_off_at is not None:
            self.log.append(
                session,
                actor=actor,
                action=audit.SPECIMEN_REOPENED,
                subject=f"specimen:{specimen.id}",
                details={
                    "signed_off_at": specimen.signed_off_at.isoformat(),
                    "signed_off_by": specimen.signed_off_by,
                },
            )
            specimen.signed_off_at = specimen.signed_off_by = None
        return specimen
