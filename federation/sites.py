"""Site data: one folder per hospital, labelled crops listed in a `manifest.csv` with splits.

A data root holds `manifest.csv` (columns `path,site,label,split,group`, paths relative to the root)
and the image files, by convention under `sites/<site>/<label>/`. The shared public root and a
SuperNode's own single-site root have the same layout, so one loader serves both.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("path", "site", "label", "split", "group")
SPLITS = ("train", "val", "test")

# Protocol 1 of the benchmark: three training hospitals and one external hospital.
DEFAULT_TRAINING_SITES = ("tehran-lisc", "jiangxi-tecom", "bccd")
EXTERNAL_SITE = "barcelona-pbc"
# The shared folder sits beside the project checkout.
_SHARED_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wbc"


class DataError(ValueError):
    """A data root that cannot be used as given; the message says what and where."""


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    site: str
    label: str
    split: str
    group: str


def default_data_root() -> Path | None:
    """`WBC_DATA_ROOT` if set, else `../shared/data/wbc` beside the checkout when it exists."""
    env = os.environ.get("WBC_DATA_ROOT")
    if env:
        return Path(env).expanduser().resolve()
    return _SHARED_ROOT if (_SHARED_ROOT / MANIFEST).is_file() else None


def resolve_data_root(given: str | Path | None) -> Path:
    root = Path(given).expanduser().resolve() if given else default_data_root()
    if root is None:
        raise DataError(
            "no data root: pass --data-root DIR or set WBC_DATA_ROOT (see README, 'Site data')"
        )
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root}: no {MANIFEST} (a data root holds manifest.csv and sites/<site>/...)")
    return root


class DataRoot:
    """A parsed manifest; every sample's path is checked to stay inside the root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.samples = tuple(self._read_manifest())

    def _read_manifest(self) -> Iterator[Sample]:
        manifest = self.root / MANIFEST
        if not manifest.is_file():
            raise DataError(f"{self.root}: no {MANIFEST}")
        with manifest.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in MANIFEST_COLUMNS[:4] if c not in (reader.fieldnames or ())]
            if missing:
                raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}")
            for line_no, row in enumerate(reader, start=2):
                rel = (row["path"] or "").strip()
                if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise DataError(f"{manifest}:{line_no}: path must be relative inside the root: {rel!r}")
                split = (row["split"] or "").strip()
                if split not in SPLITS:
                    raise DataError(f"{manifest}:{line_no}: split {split!r} is not one of {SPLITS}")
                site, label = (row["site"] or "").strip(), (row["label"] or "").strip()
                if not site or not label:
                    raise DataError(f"{manifest}:{line_no}: empty site or label")
                yield Sample(self.root / rel, site, label, split, (row.get("group") or "").strip())

    @property
    def sites(self) -> tuple[str, ...]:
        return tuple(sorted({s.site for s in self.samples}))

    def select(
        self,
        sites: Iterable[str] | None = None,
        splits: Iterable[str] | None = None,
        classes: Iterable[str] | None = None,
    ) -> list[Sample]:
        """Samples of the given sites/splits/classes (None = all), in manifest order."""
        site_set = set(sites) if sites is not None else None
        split_set = set(splits) if splits is not None else None
        class_set = set(classes) if classes is not None else None
        if site_set is not None and (unknown := site_set - set(self.sites)):
            raise DataError(f"{self.root}: no site(s) {sorted(unknown)}; present: {list(self.sites)}")
        return [
            s
            for s in self.samples
            if (site_set is None or s.site in site_set)
            and (split_set is None or s.split in split_set)
            and (class_set is None or s.label in class_set)
        ]

    def counts(self, site: str, split: str | None = None) -> Counter[str]:
        return Counter(s.label for s in self.select([site], [split] if split else None))


def write_manifest(root: Path, samples: Iterable[Sample]) -> Path:
    """Write `root/manifest.csv` for samples whose files lie under root (atomic replace)."""
    root = root.resolve()
    tmp = root / (MANIFEST + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(MANIFEST_COLUMNS)
        for s in samples:
            # abspath, not resolve: class folders may be symlinks that point outside the root.
            rel = Path(os.path.abspath(s.path)).relative_to(root).as_posix()
            writer.writerow([rel, s.site, s.label, s.split, s.group])
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, root / MANIFEST)
    return root / MANIFEST


def materialize_site(source: DataRoot, site: str, dest: Path) -> Path:
    """Make a data root at `dest` that holds only `site`: symlinked class folders and its own manifest.

    A SuperNode is given this folder, so it can read nothing of the other hospitals.
    """
    samples = source.select([site])
    if not samples:
        raise DataError(f"{source.root}: site {site!r} has no samples")
    dest = dest.resolve()
    site_dir = dest / "sites" / site
    site_dir.mkdir(parents=True, exist_ok=True)
    linked: list[Sample] = []
    for label in sorted({s.label for s in samples}):
        src_dirs = {s.path.parent for s in samples if s.label == label}
        if len(src_dirs) != 1:
            raise DataError(f"{site}/{label}: files spread over several folders: {sorted(src_dirs)}")
        link = site_dir / label
        target = src_dirs.pop()
        if link.is_symlink() or link.exists():
            if link.resolve() != target.resolve():
                raise DataError(f"{link} already exists and points elsewhere")
        else:
            link.symlink_to(target, target_is_directory=True)
    for s in samples:
        linked.append(Sample(site_dir / s.label / s.path.name, s.site, s.label, s.split, s.group))
    write_manifest(dest, linked)
    return dest
