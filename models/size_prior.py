"""A cell's size relative to its site's cells: a second, federated opinion beside the network.

The contract frames every cell at a multiple of its own diameter, so the network never sees size. Yet
size is the one cue that travels between hospitals: measured with the locator, a site's lymphocytes are
0.74-0.84 and its basophils 1.09-1.35 of the site's median cell at every site with both (raw pixel sizes
differ 2.5x between sites: magnification), and Barcelona's lymphocytes, which the network calls basophils
by their texture, are the small cells there too (docs/results.md, "Relative cell size").

    relative size r = log(d / d_site)     d: the locator's diameter; d_site: the site's anchor cell
    p(class | cell) ∝ p_network(class | cell) · N(r | mean_class, sd_class) ** weight

d_site is one number per site: the median of its neutrophils (`ANCHOR_CLASS`), the white cell every
peripheral smear has most of. A training site takes its labelled ones; a deployed site, which has no
labels, the cells the network (without size) calls neutrophils, over all its images
(`anchored_reference`). A site's median over all its cells, the first reference, moves with what else
the site images: at Barcelona platelets and erythroblasts pull it down and the five-class score fell
0.766 → 0.728; the anchor also held best when the leave-one-site-out sites' class mix was skewed
(`benchmarks/site_reference.py`, docs/results.md). During federated training each site sends per-class
count, sum and sum of squares of r over its training cells (no cell, no size of any one cell); the
server pools them into `SizePrior` (exactly the statistics of the pooled cells). The service needs its
own site's d_site (`WBC_SITE_CELL_DIAMETER`, `wbc data site-scale`); without it no size opinion is
applied and the answer is the network's alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from models.contract import SizePrior

# A class with fewer cells than this across the sites gets the all-cells Gaussian (an uninformative
# opinion about it rather than a guess from three cells).
MIN_CELLS = 10
MIN_SD = 0.05
# Sizes are relative to the site's median cell of this class where it has enough of them (below that, to
# its median over all cells: a small site's few neutrophils are a noisier reference than all its cells).
ANCHOR_CLASS = "neutrophil"
MIN_ANCHOR_CELLS = 10


def anchor_of(class_names: Sequence[str]) -> str | None:
    """The anchor class of a model with these classes (None: it has no neutrophil; all-cells median)."""
    return ANCHOR_CLASS if ANCHOR_CLASS in class_names else None


def site_reference(diameters: Iterable[float]) -> float:
    """The site's median located diameter (pixels): what sizes are relative to."""
    d = np.asarray([v for v in diameters if np.isfinite(v) and v > 0], dtype=np.float64)
    if d.size == 0:
        raise ValueError("no located cell diameter to take a site reference from")
    return float(np.median(d))


def anchored_reference(diameters: Sequence[float] | np.ndarray, probabilities: np.ndarray | None,
                       class_names: Sequence[str], anchor: str | None) -> float:
    """A deployed site's reference without labels: the median cell that the network (its answer before
    the size opinion) calls `anchor`; the median of all cells when there is no anchor or too few of them."""
    d = np.asarray(diameters, dtype=np.float64)
    if anchor is not None and probabilities is not None and len(d):
        picked = (np.asarray(probabilities).argmax(axis=1) == list(class_names).index(anchor)) & np.isfinite(d)
        if picked.sum() >= MIN_ANCHOR_CELLS:
            return site_reference(d[picked])
    return site_reference(d)


def relative_log_size(diameters: Sequence[float] | np.ndarray, reference: float) -> np.ndarray:
    if reference <= 0:
        raise ValueError(f"site cell diameter must be positive, got {reference}")
    return np.log(np.asarray(diameters, dtype=np.float64) / reference)


@dataclass(frozen=True)
class SizeStatistics:
    """Per-class count, sum and sum of squares of relative log size: what one site sends."""

    count: np.ndarray
    total: np.ndarray
    squares: np.ndarray

    @classmethod
    def of(cls, diameters: Sequence[float], targets: Sequence[int], num_classes: int,
           anchor: int | None = None) -> SizeStatistics:
        """From one site's training cells: sizes relative to the median of its labelled `anchor`-class
        cells (all its cells' median when there is no anchor or fewer than MIN_ANCHOR_CELLS of them);
        cells whose nucleus was not found (NaN) are left out."""
        d = np.asarray(diameters, dtype=np.float64)
        found = np.isfinite(d) & (d > 0)
        y = np.asarray(targets, dtype=np.int64)[found]
        d = d[found]
        anchors = d[y == anchor] if anchor is not None else d[:0]
        r = relative_log_size(d, site_reference(anchors if len(anchors) >= MIN_ANCHOR_CELLS else d))
        return cls.of_relative(r, y, num_classes)

    @classmethod
    def of_relative(cls, values: np.ndarray, targets: np.ndarray, num_classes: int) -> SizeStatistics:
        """Per-class count, sum and sum of squares of values already relative to the site's reference."""
        y = np.asarray(targets, dtype=np.int64)
        return cls(
            np.bincount(y, minlength=num_classes).astype(np.float64),
            np.bincount(y, weights=values, minlength=num_classes),
            np.bincount(y, weights=np.asarray(values) ** 2, minlength=num_classes),
        )

    def to_record(self, measure: str = "size") -> dict[str, list[float]]:
        return {f"{measure}-count": self.count.tolist(), f"{measure}-sum": self.total.tolist(),
                f"{measure}-sumsq": self.squares.tolist()}

    @classmethod
    def from_record(cls, record: dict, measure: str = "size") -> SizeStatistics | None:
        if f"{measure}-count" not in record:
            return None
        return cls(*(np.asarray(record[f"{measure}-{k}"], dtype=np.float64) for k in ("count", "sum", "sumsq")))

    def __add__(self, other: SizeStatistics) -> SizeStatistics:
        return SizeStatistics(self.count + other.count, self.total + other.total, self.squares + other.squares)


def fit_prior(stats: Iterable[SizeStatistics], weight: float, anchor: str | None = None,
              opinion_classes: Sequence[int] | None = None) -> SizePrior | None:
    """Pool the sites' statistics into per-class Gaussians; None when no site sent any. `anchor`: the
    class the sites sized against (`anchor_of`), recorded so that deployed sites measure the same way.
    `opinion_classes`: only these classes get their own Gaussian, every other one the all-cells Gaussian
    (no opinion between them)."""
    pooled = None
    for s in stats:
        pooled = s if pooled is None else pooled + s
    if pooled is None or pooled.count.sum() < 2:
        return None
    n_all = pooled.count.sum()
    mean_all = pooled.total.sum() / n_all
    sd_all = max(float(np.sqrt(max(pooled.squares.sum() / n_all - mean_all**2, 0.0))), MIN_SD)
    means, sds = [], []
    for k, (n, t, q) in enumerate(zip(pooled.count, pooled.total, pooled.squares)):
        if n >= MIN_CELLS and (opinion_classes is None or k in opinion_classes):
            m = t / n
            means.append(float(m))
            sds.append(max(float(np.sqrt(max(q / n - m * m, 0.0))), MIN_SD))
        else:
            means.append(float(mean_all))
            sds.append(sd_all)
    return SizePrior(mean=tuple(means), sd=tuple(sds), weight=weight, cells=int(n_all), anchor=anchor)


def log_likelihood(r: np.ndarray, prior: SizePrior) -> np.ndarray:
    """(N,) relative log sizes → (N, C) Gaussian log-likelihoods (constants dropped)."""
    mean, sd = np.asarray(prior.mean), np.asarray(prior.sd)
    return -0.5 * ((np.asarray(r, dtype=np.float64)[:, None] - mean) / sd) ** 2 - np.log(sd)


def apply_size_prior(probabilities: np.ndarray, r: np.ndarray, prior: SizePrior) -> np.ndarray:
    """The network's probabilities (N, C) combined with the size opinion, renormalised (float32).

    Rows with a non-finite r (no cell located) keep the network's answer."""
    p = np.asarray(probabilities, dtype=np.float64)
    ll = log_likelihood(np.nan_to_num(r, nan=0.0, posinf=0.0, neginf=0.0), prior)
    z = np.log(np.clip(p, 1e-12, None)) + prior.weight * ll
    z -= z.max(axis=1, keepdims=True)
    out = np.exp(z)
    out /= out.sum(axis=1, keepdims=True)
    keep = ~np.isfinite(np.asarray(r, dtype=np.float64))
    out[keep] = p[keep]
    return out.astype(np.float32)
