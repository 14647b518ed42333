"""The granule opinion (models.granule_prior) on real cells: the locator's granule density puts a site's
eosinophils above its neutrophils at a training site and at Barcelona alike, a site's statistics are
relative to its labelled neutrophils, a deployed site's reference is the median over the cells its network
calls neutrophils, and a cell without a measure is left out."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from federation.sites import DataRoot
from models.cellcrop import cell_measures
from models.contract import SHARED_CLASSES
from models.granule_prior import anchored_granule_reference, fit_granule_prior, granule_statistics, site_median
from models.size_prior import MIN_ANCHOR_CELLS, apply_size_prior, fit_prior

EOSINOPHIL, NEUTROPHIL = SHARED_CLASSES.index("eosinophil"), SHARED_CLASSES.index("neutrophil")


def _granules(data_root: DataRoot, site: str, label: str, n: int) -> np.ndarray:
    samples = data_root.select([site], ["train"], [label])[:n]
    assert len(samples) == n, f"{site} no longer holds {n} {label} train cells"
    values = []
    for s in samples:
        with Image.open(s.path) as img:
            values.append(cell_measures(img.convert("RGB")).granules)
    return np.asarray(values)


@pytest.mark.parametrize("site", ["tehran-lisc", "barcelona-pbc"])
def test_eosinophil_granules_are_denser_than_neutrophils_at_each_site(data_root: DataRoot, site: str) -> None:
    eos, neut = _granules(data_root, site, "eosinophil", 12), _granules(data_root, site, "neutrophil", 12)
    assert np.isfinite(eos).sum() >= 10 and np.isfinite(neut).sum() >= 10
    eos, neut = eos[np.isfinite(eos)], neut[np.isfinite(neut)]
    auc = float((eos[:, None] > neut[None, :]).mean())
    assert auc > 0.8, f"{site}: eosinophil > neutrophil granule density AUC {auc:.2f}"


def test_a_site_measures_its_granules_against_its_labelled_neutrophils() -> None:
    rng = np.random.default_rng(0)
    neut = rng.normal(-1.2, 0.1, 12)
    eos = rng.normal(-0.5, 0.1, 8)
    g = np.concatenate([neut, eos, [np.nan]])  # the last cell: too little cytoplasm to measure
    y = np.array([NEUTROPHIL] * 12 + [EOSINOPHIL] * 8 + [EOSINOPHIL])
    stats = granule_statistics(g, y, 5, anchor=NEUTROPHIL)
    assert stats.count[EOSINOPHIL] == 8 and stats.count[NEUTROPHIL] == 12
    np.testing.assert_allclose(stats.total[EOSINOPHIL], (eos - np.median(neut)).sum())
    np.testing.assert_allclose(stats.total[NEUTROPHIL], (neut - np.median(neut)).sum())
    # Too few labelled neutrophils: the median over all its measured cells.
    few = granule_statistics(g[-10:], y[-10:], 5, anchor=NEUTROPHIL)
    np.testing.assert_allclose(few.total[EOSINOPHIL], (eos - np.median(g[-10:-1])).sum())
    assert granule_statistics([np.nan, np.nan], [0, 1], 5) is None
    # Round-trips through the record a site sends, under its own keys beside the size sums.
    record = stats.to_record("granule")
    assert set(record) == {"granule-count", "granule-sum", "granule-sumsq"}
    assert np.array_equal(type(stats).from_record(record, "granule").total, stats.total)


def test_a_deployed_site_anchors_on_the_cells_its_network_calls_neutrophils() -> None:
    g = np.array([-1.0] * MIN_ANCHOR_CELLS + [0.0, 0.5, np.nan])
    p = np.zeros((len(g), 5))
    p[:MIN_ANCHOR_CELLS, NEUTROPHIL] = 1.0
    p[MIN_ANCHOR_CELLS:, EOSINOPHIL] = 1.0
    assert anchored_granule_reference(g, p, SHARED_CLASSES, "neutrophil") == -1.0
    assert anchored_granule_reference(g, p, SHARED_CLASSES, None) == site_median(g) == -1.0
    p[:2] = np.roll(p[:2], 1, axis=1)  # two fewer called neutrophils than the anchor needs: all cells
    assert anchored_granule_reference(g, p, SHARED_CLASSES, "neutrophil") == float(np.nanmedian(g))
    with pytest.raises(ValueError, match="no cell with a measured granule density"):
        site_median([np.nan])


def test_the_opinion_moves_a_dense_cell_away_from_neutrophil() -> None:
    rng = np.random.default_rng(1)
    g = np.concatenate([rng.normal(0.0, 0.15, 40), rng.normal(0.35, 0.2, 40)])
    y = np.array([NEUTROPHIL] * 40 + [EOSINOPHIL] * 40)
    prior = fit_prior([granule_statistics(g, y, 5, anchor=NEUTROPHIL)], weight=0.5, anchor="neutrophil")
    p = np.full((2, 5), 0.05)
    p[:, NEUTROPHIL], p[:, EOSINOPHIL] = 0.5, 0.3
    out = apply_size_prior(p, np.array([0.7, np.nan]), prior)  # a dense cell; an unmeasured one
    assert out[0, EOSINOPHIL] > out[0, NEUTROPHIL] and abs(out[0].sum() - 1.0) < 1e-5
    np.testing.assert_allclose(out[1], p[1], rtol=1e-6)  # no measure: the network's answer


def test_only_eosinophils_and_neutrophils_get_a_granule_gaussian_of_their_own() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(5), 30)
    g = rng.normal(0.0, 0.1, len(y)) + 0.3 * (y != NEUTROPHIL)  # every other class 0.3 denser
    stats = granule_statistics(g, y, 5, anchor=NEUTROPHIL)
    prior = fit_granule_prior([stats], 0.5, SHARED_CLASSES, "neutrophil")
    every = fit_prior([stats], 0.5)
    for k in (EOSINOPHIL, NEUTROPHIL):
        assert prior.mean[k] == every.mean[k] and prior.sd[k] == every.sd[k]
    relative = g - np.median(g[y == NEUTROPHIL])
    others = [k for k in range(5) if k not in (EOSINOPHIL, NEUTROPHIL)]
    for k in others:  # the all-cells Gaussian: no opinion between basophils, lymphocytes and monocytes
        assert prior.mean[k] == pytest.approx(relative.mean()) and prior.sd[k] == pytest.approx(relative.std())
    assert len({prior.mean[k] for k in others}) == 1 and prior.weight == 0.5 and prior.anchor == "neutrophil"
