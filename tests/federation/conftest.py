"""Tiny real data roots for federation tests: a few images per class per site, linked from the shared data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from federation.sites import DataRoot, Sample, write_manifest


def make_tiny_root(
    source: DataRoot,
    dest: Path,
    sites: Sequence[str],
    classes: Sequence[str],
    *,
    train_per_class: int,
    val_per_class: int,
) -> Path:
    """A data root at `dest` with `train_per_class` + `val_per_class` real images per class and site.

    Files are symlinked one by one (the originals stay in the shared folder) and listed in a new manifest
    whose `val` rows come from the source's val split (train from train), so nothing leaks between them.
    """
    picked: list[Sample] = []
    for site in sites:
        for label in classes:
            for split, count in (("train", train_per_class), ("val", val_per_class)):
                chosen = source.select([site], [split], [label])[:count]
                if len(chosen) < count:
                    raise ValueError(f"{site}/{label}/{split}: only {len(chosen)} images, {count} wanted")
                for s in chosen:
                    link = dest / "sites" / site / label / s.path.name
                    link.parent.mkdir(parents=True, exist_ok=True)
                    if not link.exists():
                        link.symlink_to(s.path)
                    picked.append(Sample(link, site, label, split, s.group))
    write_manifest(dest, picked)
    return dest


@pytest.fixture(scope="session")
def tiny_root_factory():
    """`make_tiny_root` as a fixture, so test modules need no import path tricks."""
    return make_tiny_root
