"""A cell's size relative to its site's cells: a second, federated opinion beside the network.

The contract frames every cell at a multiple of its own diameter, so the network never sees size. Yet
size is the one cue that travels between hospitals: measured with the locator, a site's lymphocytes are
0.74-0.84 and its basophils 1.09-1.35 of the site's median cell at every site with both (raw pixel sizes
differ 2.5x between sites: magnification), and Barcelona's lymphocytes, which the network calls basophils
by their texture, are the small cells there too (docs/results.md, "Relative cell size").

    relative size r = log(d / d_site)     d: the locator's diameter; d_site: the site's median cell
    p(class | cell) ∝ p_network(class | cell) · N(r | mean_class, sd_class) ** weight

d_site is one number per site, from its own cells without labels. During federated training each site
sends per-class count, sum and sum of squares of r over its training cells (no cell, no size of any one
cell); the server pools them into `SizePrior` (exactly the statistics of the pooled cells). The service
needs its own site's d_site (`WBC_SITE_CELL_DIAMETER`, `wbc site-scale`); without it no size opinion is
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


def site_reference(diameters: Iterable[float]) -> float:
    """The site's median located diameter (pixels): what sizes are relative to."""
    d = np.asarray([v for v in diameters if np.isfinite(v) and v > 0], dtype=np.float64)
    if d.size == 0:
        raise ValueError("no located cell diameter to take a site reference from")
    return float(np.median(d))


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
    def of(cls, diameters: Sequence[float], targets: Sequence[int], num_classes: int) -> SizeStatistics:
        """From one site's training cells: sizes relative to the same cells' median (cells whose nucleus
        was not found, NaN, left out)."""
        d = np.asarray(diameters, dtype=np.float64)
        found = np.isfinite(d) & (d > 0)
        r = relative_log_size(d[found], site_reference(d[found]))
        y = np.asarray(targets, dtype=np.int64)[found]
        return cls(
            np.bincount(y, minlength=num_classes).astype(np.float64),
            np.bincount(y, weights=r, minlength=num_classes),
            np.bincount(y, weights=r * r, minlength=num_classes),
        )

    def to_record(self) -> dict[str, list[float]]:
        return {"size-count": self.count.tolist(), "size-sum": self.total.tolist(), "size-sumsq": self.squares.tolist()}

    @classmethod
    def from_record(cls, record: dict) -> SizeStatistics | None:
        if "size-count" not in record:
            return None
        return cls(*(np.asarray(record[k], dtype=np.float64) for k in ("size-count", "size-sum", "size-sumsq")))

    def __add__(self, other: SizeStatistics) -> SizeStatistics:
        return SizeStatistics(self.count + other.count, self.total + other.total, self.squares + other.squares)


def fit_prior(stats: Iterable[SizeStatistics], weight: float) -> SizePrior | None:
    """Pool the sites' statistics into per-class Gaussians; None when no site sent any."""
    pooled = None
    for s in stats:
        pooled = s if pooled is None else pooled + s
    if pooled is None or pooled.count.sum() < 2:
        return None
    n_all = pooled.count.sum()
    mean_all = pooled.total.sum() / n_all
    sd_all = max(float(np.sqrt(max(pooled.squares.sum() / n_all - mean_all**2, 0.0))), MIN_SD)
    means, sds = [], []
    for n, t, q in zip(pooled.count, pooled.total, pooled.squares):
        if n >= MIN_CELLS:
            m = t / n
            means.append(float(m))
            sds.append(max(float(np.sqrt(max(q / n - m * m, 0.0))), MIN_SD))
        else:
            means.append(float(mean_all))
            sds.append(sd_all)
    return SizePrior(mean=tuple(means), sd=tuple(sds), weight=weight, cells=int(n_all))


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
