"""Nucleus shape per site and class: could it be a third opinion beside the network and the cell's size?

    .venv/bin/python benchmarks/nucleus_shape.py          # ~1 min: every cell of the five shared classes

The size opinion works because a class's size relative to its site's neutrophils is the same at every
site. The locator's nucleus mask (`models.cellcrop`) gives two shape measures that no stain or
magnification should change: fill (nucleus area / the area of the disc with its second moments: 1 for a
round solid nucleus, low for lobes spread over the cell) and solidity (area / convex hull area). This
prints their median per site and class, and how well fill separates the two classes the deployed model
confuses most at Barcelona (eosinophils called neutrophils; lymphocytes called basophils), as the AUC
within each site. A shape opinion is worth building only if a class's shape agrees across sites.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
from PIL import Image
from scipy.spatial import ConvexHull

from federation.sites import DataRoot, resolve_data_root
from models import cellcrop
from models.preprocess import to_rgb

CLASSES = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")
SITES = ("tehran-lisc", "jiangxi-tecom", "bccd", "barcelona-pbc")


def nucleus_mask(path: Path) -> np.ndarray | None:
    """The locator's nucleus mask at its working resolution (what `locate_cell` measures), or None."""
    with Image.open(path) as img:
        rgb = to_rgb(img)
        rgb.load()
    box = cellcrop._content_box(rgb)
    content = rgb.crop(box)
    factor = max(1, int(round(max(content.size) / cellcrop._WORK_SIDE)))
    return cellcrop._nucleus_mask(np.asarray(content.reduce(factor) if factor > 1 else content))


def shape(mask: np.ndarray) -> tuple[float, float]:
    """(fill, solidity) of a nucleus mask."""
    ys, xs = np.nonzero(mask)
    area = float(mask.sum())
    fill = area / (np.pi * (cellcrop._spread(ys, xs) / 2.0) ** 2)
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)]).astype(float)
    return fill, area / ConvexHull(corners).volume


def auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive's value > a negative's), ties half."""
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.parse_args()
    data = DataRoot(resolve_data_root(None))
    values: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for site in SITES:
        for sample in data.select([site], ["train", "val", "test"]):
            if sample.label in CLASSES and (mask := nucleus_mask(sample.path)) is not None:
                values.setdefault((site, sample.label), []).append(shape(mask))
    for k, name in enumerate(("fill", "solidity")):
        print(f"\n| {name}: median (cells) | " + " | ".join(CLASSES) + " |")
        print("|---" * (len(CLASSES) + 1) + "|")
        for site in SITES:
            cells = [np.array([v[k] for v in values.get((site, c), [])]) for c in CLASSES]
            print(f"| {site} | " + " | ".join(f"{np.median(x):.2f} ({len(x)})" if len(x) else "—" for x in cells) + " |")
    print("\n| fill AUC within the site | eosinophil > neutrophil | lymphocyte > basophil | lymphocyte > monocyte |")
    print("|---|---|---|---|")
    for site in SITES:
        fill = {c: np.array([v[0] for v in values.get((site, c), [])]) for c in CLASSES}
        print(f"| {site} | {auc(fill['eosinophil'], fill['neutrophil']):.2f} | "
              f"{auc(fill['lymphocyte'], fill['basophil']):.2f} | {auc(fill['lymphocyte'], fill['monocyte']):.2f} |")


if __name__ == "__main__":
    main()
