"""`wbc data check DIR`: is this folder a usable data root? Layout, manifest, and every image decoded."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image

from federation.sites import MANIFEST, SPLITS, DataError, DataRoot

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class CheckReport:
    root: Path
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    counts: dict[str, dict[str, Counter]] = field(default_factory=dict)  # site -> split -> label counts

    @property
    def ok(self) -> bool:
        return not self.errors


def _decode_problem(path: Path) -> str | None:
    try:
        with Image.open(path) as img:
            img.load()
            if img.width < 8 or img.height < 8:
                return f"too small ({img.width}×{img.height})"
    except FileNotFoundError:
        return "missing"
    except Exception as exc:  # any decoder failure is a finding, not a crash
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None


def check_data_root(root: Path, progress: Callable[[int, int], None] | None = None) -> CheckReport:
    report = CheckReport(Path(root).resolve())
    try:
        data = DataRoot(report.root)
    except DataError as exc:
        report.errors.append(str(exc))
        return report
    if not data.samples:
        report.errors.append(f"{MANIFEST} lists no images")
        return report

    seen: set[Path] = set()
    groups: dict[tuple[str, str], set[str]] = defaultdict(set)
    for i, sample in enumerate(data.samples):
        rel = sample.path.relative_to(data.root)
        if sample.path in seen:
            report.errors.append(f"{rel}: listed twice")
        seen.add(sample.path)
        problem = _decode_problem(sample.path)
        if problem:
            report.errors.append(f"{rel}: {problem}")
        if sample.path.parent.name != sample.label:
            report.warnings.append(f"{rel}: in folder {sample.path.parent.name!r} but labelled {sample.label!r}")
        if sample.group:
            groups[(sample.site, sample.group)].add(sample.split)
        report.counts.setdefault(sample.site, {s: Counter() for s in SPLITS})[sample.split][sample.label] += 1
        if progress:
            progress(i + 1, len(data.samples))

    for (site, group), splits in sorted(groups.items()):
        if len(splits) > 1:
            report.errors.append(f"{site}: group {group!r} spans splits {sorted(splits)} (the same cell leaks)")

    sites_dir = data.root / "sites"
    if sites_dir.is_dir():
        listed = {p.resolve() for p in seen}
        unlisted = [
            p for p in sites_dir.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p.resolve() not in listed
        ]
        if unlisted:
            report.warnings.append(
                f"{len(unlisted)} image file(s) under sites/ are not in {MANIFEST}, e.g. "
                f"{unlisted[0].relative_to(data.root)}"
            )
    else:
        report.warnings.append("no sites/ folder (paths in the manifest point elsewhere inside the root)")

    for site, splits in report.counts.items():
        for label in sorted(set().union(*splits.values())):
            if splits["train"][label] and not (splits["val"][label] or splits["test"][label]):
                report.warnings.append(f"{site}/{label}: only in train (no val/test examples to measure it)")
    return report
