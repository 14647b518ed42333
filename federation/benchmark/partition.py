"""Seeded label-skewed partitions of one site's data into simulated sites (the in-domain protocol)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from federation.sites import Sample


def dirichlet_partition(
    samples: Sequence[Sample], n_sites: int, alpha: float, seed: int, min_per_site: int = 10
) -> list[list[int]]:
    """Indices of `samples` for each of `n_sites`: for every class, site shares ~ Dirichlet(alpha).

    The classic non-IID split (Hsu et al. 2019). Redrawn (with the next sub-seed) until every site holds at
    least `min_per_site` samples, so no simulated hospital is empty; the draw is reproducible from `seed`.
    Samples of one `group` stay together (their first member's site), so shifted views of one cell never
    sit at two sites.
    """
    if n_sites < 1 or alpha <= 0:
        raise ValueError("need n_sites >= 1 and alpha > 0")
    labels = sorted({s.label for s in samples})
    for attempt in range(100):
        rng = np.random.default_rng([seed, attempt])
        site_of_group: dict[str, int] = {}
        parts: list[list[int]] = [[] for _ in range(n_sites)]
        for label in labels:
            idx = [i for i, s in enumerate(samples) if s.label == label]
            idx = list(rng.permutation(idx))
            shares = rng.dirichlet([alpha] * n_sites)
            cuts = (np.cumsum(shares) * len(idx)).round().astype(int)[:-1]
            for site, chunk in enumerate(np.split(np.asarray(idx, dtype=np.int64), cuts)):
                for i in chunk.tolist():
                    group = samples[i].group
                    target = site_of_group.setdefault(group, site) if group else site
                    parts[target].append(i)
        if min(len(p) for p in parts) >= min_per_site:
            return [sorted(p) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) draw gave every one of {n_sites} sites {min_per_site} samples")


def describe(samples: Sequence[Sample], parts: Sequence[Sequence[int]]) -> list[dict[str, int]]:
    """Class counts per simulated site (what the results write down)."""
    return [dict(sorted(Counter(samples[i].label for i in part).items())) for part in parts]
