"""Cytoplasm granule density relative to the site's neutrophils: a third opinion beside the network.

What the network and the size opinion left at a new hospital was eosinophils called neutrophils
(Barcelona: 358 of 997). The training sites teach a compact nucleus for eosinophils, which Barcelona's do
not have (docs/results.md, "Nucleus shape"); their granules are the textbook cue, and one measure of them
agrees at every site: the locator's granule density (`models.cellcrop`: the densest 30 % of the
cytoplasm's optical density over the nucleus's, log). Eosinophil > neutrophil AUC within each site:
0.94 / 0.93 / 0.75 at the training sites, 1.00 at Barcelona.

    g = granules - g_site     g_site: the median over the site's neutrophils (`ANCHOR_CLASS`)
    p(class | cell) ∝ p_network(class | cell) · N(r | size) ** w_size · N(g | mean_class, sd_class) ** w

with a Gaussian of their own only for eosinophils and neutrophils (`OPINION_CLASSES`), the all-cells one
for the rest: the measure separates that pair at every site, not the others.

Like size, the raw measure differs between sites (Barcelona's neutrophils sit at -1.18, the training
sites' at -0.60 to -0.84) while its distance from the site's own neutrophils agrees, and only the anchored
form helps by the leave-one-site-out criterion (`benchmarks/granule_prior.py`). A training site sends
per-class count, sum and sum of squares of g (`granule_statistics`); a deployed site measures g_site once
over the cells its network calls neutrophils (`wbc data site-scale`, `WBC_SITE_GRANULE_REFERENCE`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from models.contract import SizePrior
from models.size_prior import MIN_ANCHOR_CELLS, SizeStatistics, fit_prior

# The classes the opinion tells apart: eosinophils above neutrophils at every site. Between the others
# the level moves with the site (jiangxi-tecom's lymphocytes sit at its neutrophils' level, the other
# sites' 0.2-0.35 above them); a Gaussian per class took a held-out jiangxi-tecom's lymphocytes (recall
# 0.84 -> 0.72) and its one basophil elsewhere (federated leave-one-site-out 0.606 -> 0.569; this pair
# alone: 0.619), so the other classes share the all-cells Gaussian (docs/results.md, "Granules").
OPINION_CLASSES = ("eosinophil", "neutrophil")


def site_median(values: Sequence[float] | np.ndarray, picked: np.ndarray | None = None) -> float:
    """The median of the picked cells' measured values; of all measured cells when fewer than
    MIN_ANCHOR_CELLS are picked (or none is asked for)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    if not ok.any():
        raise ValueError("no cell with a measured granule density to take a site reference from")
    if picked is not None and (ok & picked).sum() >= MIN_ANCHOR_CELLS:
        return float(np.median(v[ok & picked]))
    return float(np.median(v[ok]))


def granule_statistics(granules: Sequence[float], targets: Sequence[int], num_classes: int,
                       anchor: int | None = None) -> SizeStatistics | None:
    """One training site's per-class statistics of granule density relative to its labelled `anchor`
    cells (cells without a measure left out); None when no cell was measured."""
    g = np.asarray(granules, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    ok = np.isfinite(g)
    if not ok.any():
        return None
    reference = site_median(g, None if anchor is None else y == anchor)
    return SizeStatistics.of_relative(g[ok] - reference, y[ok], num_classes)


def anchored_granule_reference(granules: Sequence[float] | np.ndarray, probabilities: np.ndarray | None,
                               class_names: Sequence[str], anchor: str | None) -> float:
    """A deployed site's reference without labels: the median over the cells the network (its answer
    before the opinions) calls `anchor`; over all measured cells when there are too few of them."""
    picked = None
    if anchor is not None and probabilities is not None:
        picked = np.asarray(probabilities).argmax(axis=1) == list(class_names).index(anchor)
    return site_median(granules, picked)


def fit_granule_prior(stats: Iterable[SizeStatistics], weight: float, class_names: Sequence[str],
                      anchor: str | None) -> SizePrior | None:
    """The sites' pooled granule statistics as the contract's `granule_prior`: a Gaussian of their own for
    `OPINION_CLASSES`, the all-cells one for every other class; None when no site sent any."""
    own = [k for k, c in enumerate(class_names) if c in OPINION_CLASSES]
    return fit_prior(stats, weight, anchor=anchor, opinion_classes=own)
