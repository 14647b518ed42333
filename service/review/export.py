"""`wbc review export --site S`: a site's reviewed cells as a data root, the layout of ../shared/data/wbc.

    <dest>/manifest.csv                   path,site,label,split,group (federation.sites.write_manifest)
    <dest>/sites/<site>/<label>/cell-<id>.<ext>
    <dest>/export.json                    what was exported, when, and the split rule

What is exported: the cells of signed-off specimens of that site, with the reviewer's label (so each
label was confirmed or corrected by a person). Files are copied from the site's image store into
`dest` on the same machine: the images never leave the site. JPEG/PNG/BMP/TIFF are copied as sent;
anything else (DICOM) is written as PNG so the training loader can read it.

Splits: by specimen, never by cell: all cells of one specimen (one patient's smear) land in one split,
so training never sees a cell of a test specimen. The split is a fixed function of (site, specimen id)
(SHA-256 → 70% train, 10% val, 20% test, the shared data's ratios), so re-exporting after more
sign-offs adds new specimens without moving old ones between splits. `group` is `specimen-<id>`, never
the laboratory's accession.

A re-export replaces `dest` as a whole (built beside it, then swapped in); a folder that is not an
earlier export is never replaced.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from federation.sites import Sample, write_manifest
from models.contract import UNIDENTIFIED
from service import audit
from service.audit import AuditLog
from service.db.models import Cell, Specimen
from service.db.session import Database
from service.review.images import TRAINING_TYPES, ImageStore, sniff

MARKER = "export.json"
SPLIT_BOUNDS = (("train", 0.7), ("val", 0.8), ("test", 1.0))  # cumulative: 70 / 10 / 20 %
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ExportError(RuntimeError):
    """The export cannot be written as asked; the message says why."""


def split_for(site: str, group: str) -> str:
    """A fixed split per (site, group): the same specimen is always in the same split."""
    fraction = int(hashlib.sha256(f"{site}\0{group}".encode()).hexdigest()[:12], 16) / 16**12
    return next(name for name, bound in SPLIT_BOUNDS if fraction < bound)


@dataclass
class ExportSummary:
    dest: Path
    site: str
    cells: int = 0
    specimens: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    splits: Counter[str] = field(default_factory=Counter)


def export_site(
    db: Database,
    images: ImageStore,
    log: AuditLog,
    site: str,
    dest: str | Path,
    actor: str,
    max_pixels: int = 25_000_000,
) -> ExportSummary:
    dest = Path(dest).expanduser().resolve()
    if not _SAFE_NAME.fullmatch(site):
        raise ExportError(f"site {site!r} is not a valid site name")
    is_foreign = dest.exists() and not (dest / MARKER).is_file()
    if is_foreign and (not dest.is_dir() or any(dest.iterdir())):
        raise ExportError(f"{dest} exists and is not an earlier export (no {MARKER}); choose another folder")
    with db.transaction() as session:
        rows = session.execute(
            select(Cell.id, Cell.specimen_id, Cell.reviewed_label, Cell.image_path, Cell.media_type)
            .join(Cell.specimen)
            .where(
                Cell.site == site,
                Specimen.signed_off_at.is_not(None),
                Cell.reviewed_label.is_not(None),
                Cell.reviewed_label != UNIDENTIFIED,
            )
            .order_by(Cell.specimen_id, Cell.id)
        ).all()
    if not rows:
        raise ExportError(f"site {site!r} has no reviewed cells in signed-off specimens yet")

    summary = ExportSummary(dest=dest, site=site)
    stage = dest.parent / f".{dest.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        samples = []
        for cell_id, specimen_id, label, image_path, media_type in rows:
            if not _SAFE_NAME.fullmatch(label):
                raise ExportError(f"cell {cell_id}: label {label!r} cannot be a folder name")
            group = f"specimen-{specimen_id}"
            split = split_for(site, group)
            folder = stage / "sites" / site / label
            folder.mkdir(parents=True, exist_ok=True)
            target = _copy_image(images, image_path, media_type, folder / f"cell-{cell_id:07d}", max_pixels)
            samples.append(Sample(target, site, label, split, group))
            summary.labels[label] += 1
            summary.splits[split] += 1
        summary.cells, summary.specimens = len(samples), len({s.group for s in samples})
        write_manifest(stage, samples)
        (stage / MARKER).write_text(
            json.dumps(
                {
                    "site": site,
                    "created": datetime.now(UTC).isoformat(timespec="seconds"),
                    "cells": summary.cells,
                    "specimens": summary.specimens,
                    "labels": dict(summary.labels),
                    "splits": dict(summary.splits),
                    "split_rule": "per specimen: sha256(site, 'specimen-<id>') -> 70% train / 10% val / 20% test",
                    "labels_from": "reviewer (signed-off specimens only)",
                },
                indent=2,
            )
            + "\n"
        )
        _swap_in(stage, dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

    with db.transaction() as session:
        log.append(
            session,
            actor=actor,
            action=audit.SITE_DATA_EXPORTED,
            subject=f"site:{site}",
            details={
                "cells": summary.cells,
                "specimens": summary.specimens,
                "labels": dict(summary.labels),
                "splits": dict(summary.splits),
            },
        )
    return summary


def _copy_image(images: ImageStore, relative: str, media_type: str, stem: Path, max_pixels: int) -> Path:
    source = images.path(relative)
    if not source.is_file():
        raise ExportError(f"{source}: image missing from the image store")
    if media_type in TRAINING_TYPES:
        target = stem.with_suffix(sniff(source.read_bytes()[:132])[0])
        shutil.copyfile(source, target)
        return target
    from service import decoding  # a format the training loader cannot open (DICOM): decode to PNG

    decode = getattr(decoding, "decode_upload", None)
    data = source.read_bytes()
    image = (
        decode(data, max_pixels=max_pixels).image
        if decode
        else decoding.decode_image(data, max_pixels=max_pixels)
    )
    out = io.BytesIO()
    image.convert("RGB").save(out, "PNG")
    target = stem.with_suffix(".png")
    target.write_bytes(out.getvalue())
    return target


def _swap_in(stage: Path, dest: Path) -> None:
    """Replace dest with stage: a reader sees the old export or the new one, never half of one."""
    if not dest.exists():
        stage.rename(dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    dest.rename(old)
    stage.rename(dest)
    shutil.rmtree(old, ignore_errors=True)
