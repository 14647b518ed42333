"""The size opinion (models.size_prior) on real cells: the sites' sums pool exactly, sizes relative to a
site's median separate its lymphocytes from its basophils, and the combination leaves a cell with no
located size, or a weight of 0, to the network."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from federation.sites import DataRoot
from models.cellcrop import locate_cell
from models.contract import SHARED_CLASSES, ModelContract, SizePrior
from models.size_prior import (
    MIN_ANCHOR_CELLS,
    MIN_CELLS,
    SizeStatistics,
    anchor_of,
    anchored_reference,
    apply_size_prior,
    fit_prior,
    relative_log_size,
    site_reference,
)

LYMPHOCYTE, BASOPHIL = SHARED_CLASSES.index("lymphocyte"), SHARED_CLASSES.index("basophil")


def _cells(data_root: DataRoot, site: str, labels: tuple[str, ...], per_class: int):
    """(diameters, class indices) of the first `per_class` train cells of each label at a site."""
    d, y = [], []
    for label in labels:
        samples = data_root.select([site], ["train"], [label])[:per_class]
        assert len(samples) == per_class, f"{site} no longer holds {per_class} {label} train cells"
        for s in samples:
            with Image.open(s.path) as img:
                d.append(locate_cell(img.convert("RGB"))[2])
            y.append(SHARED_CLASSES.index(label))
    return np.asarray(d), np.asarray(y)


@pytest.fixture(scope="module")
def lisc(data_root: DataRoot):
    return _cells(data_root, "tehran-lisc", ("lymphocyte", "basophil", "neutrophil"), 15)


def test_pooled_sums_equal_the_statistics_of_the_pooled_cells(lisc, data_root: DataRoot):
    other = _cells(data_root, "jiangxi-tecom", ("lymphocyte", "neutrophil"), 12)
    a, b = SizeStatistics.of(*lisc, 5), SizeStatistics.of(*other, 5)
    prior = fit_prior([SizeStatistics.from_record(a.to_record()), b], weight=2.0)

    r = np.concatenate([relative_log_size(lisc[0], site_reference(lisc[0])),
                        relative_log_size(other[0], site_reference(other[0]))])
    y = np.concatenate([lisc[1], other[1]])
    assert prior.cells == len(y)
    for c in (LYMPHOCYTE, SHARED_CLASSES.index("neutrophil")):
        assert prior.mean[c] == pytest.approx(r[y == c].mean(), abs=1e-9)
        assert prior.sd[c] == pytest.approx(r[y == c].std(), abs=1e-9)
    # 15 basophils (>= MIN_CELLS) get their own Gaussian; a class no site sent gets the pooled one
    assert prior.mean[BASOPHIL] == pytest.approx(r[y == BASOPHIL].mean(), abs=1e-9)
    eos = SHARED_CLASSES.index("eosinophil")
    assert prior.mean[eos] == pytest.approx(r.mean(), abs=1e-9) and prior.sd[eos] == pytest.approx(r.std(), abs=1e-9)


def test_relative_size_alone_tells_a_sites_lymphocytes_from_its_basophils(lisc):
    d, y = lisc
    prior = fit_prior([SizeStatistics.of(d, y, 5)], weight=2.0)
    uniform = np.full((len(d), 5), 0.2, np.float32)
    p = apply_size_prior(uniform, relative_log_size(d, site_reference(d)), prior)
    both = (y == LYMPHOCYTE) | (y == BASOPHIL)
    called_lymphocyte = p[both, LYMPHOCYTE] > p[both, BASOPHIL]
    assert (called_lymphocyte == (y[both] == LYMPHOCYTE)).mean() >= 0.8
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-5)


def test_no_size_or_no_weight_leaves_the_network_answer(lisc):
    d, y = lisc
    prior = fit_prior([SizeStatistics.of(d, y, 5)], weight=2.0)
    network = np.array([[0.1, 0.2, 0.3, 0.3, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]], np.float32)
    r = np.array([np.nan, np.log(0.75)])
    out = apply_size_prior(network, r, prior)
    np.testing.assert_allclose(out[0], network[0], rtol=1e-6)
    assert out[1, LYMPHOCYTE] > network[1, LYMPHOCYTE]
    np.testing.assert_allclose(apply_size_prior(network, r, prior.model_copy(update={"weight": 0.0})), network, rtol=1e-6)


def test_too_few_cells_of_a_class_fall_back_and_nothing_gives_no_prior():
    d = np.array([100.0] * (MIN_CELLS - 1) + [80.0] * MIN_CELLS)
    y = np.array([BASOPHIL] * (MIN_CELLS - 1) + [LYMPHOCYTE] * MIN_CELLS)
    prior = fit_prior([SizeStatistics.of(d, y, 5)], weight=1.0)
    r = relative_log_size(d, site_reference(d))
    assert prior.mean[BASOPHIL] == pytest.approx(r.mean())
    assert fit_prior([], weight=1.0) is None
    with pytest.raises(ValueError, match="site reference"):
        site_reference([])


def test_contract_carries_a_size_prior_per_class_and_round_trips():
    base = ModelContract(architecture="tf_efficientnet_lite0", class_names=SHARED_CLASSES, input_size=128,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    prior = SizePrior(mean=(0.1, 0.1, -0.2, 0.1, 0.0), sd=(0.1,) * 5, weight=2.0, cells=100)
    contract = base.with_updates(size_prior=prior.model_dump())
    assert ModelContract.from_json(contract.to_json()).size_prior == prior
    with pytest.raises(ValidationError, match="one Gaussian per class"):
        base.with_updates(size_prior=SizePrior(mean=(0.0,) * 4, sd=(0.1,) * 4).model_dump())
    with pytest.raises(ValidationError, match="anchor 'platelet' is not one of the classes"):
        base.with_updates(size_prior=prior.model_copy(update={"anchor": "platelet"}).model_dump())
    with pytest.raises(ValidationError, match="positive sd"):
        SizePrior(mean=(0.0,) * 5, sd=(0.1, 0.1, 0.0, 0.1, 0.1))


def test_a_cell_without_a_located_nucleus_has_no_size_and_is_left_out_of_the_sums(lisc):
    from models.cellcrop import cell_diameter, crop_cell_sized
    from models.contract import CellCrop

    blank = Image.new("RGB", (120, 120), (235, 225, 230))  # an empty field: the locator's fallback frame
    crop, measures = crop_cell_sized(blank, CellCrop())
    assert crop.size[0] > 0 and np.isnan(measures.diameter) and np.isnan(cell_diameter(blank))
    assert np.isnan(measures.granules)

    d, y = lisc
    with_missing = SizeStatistics.of(np.append(d, np.nan), np.append(y, LYMPHOCYTE), 5)
    clean = SizeStatistics.of(d, y, 5)
    np.testing.assert_array_equal(with_missing.count, clean.count)
    np.testing.assert_allclose(with_missing.total, clean.total)


NEUTROPHIL = SHARED_CLASSES.index("neutrophil")


def test_a_training_site_sizes_its_cells_against_its_labelled_neutrophils(lisc):
    d, y = lisc  # 15 lymphocytes, basophils and neutrophils of one site
    assert anchor_of(SHARED_CLASSES) == "neutrophil" and anchor_of(("eosinophil", "lymphocyte")) is None
    stats = SizeStatistics.of(d, y, 5, anchor=NEUTROPHIL)
    r = relative_log_size(d, np.median(d[y == NEUTROPHIL]))
    np.testing.assert_allclose(stats.total, np.bincount(y, r, 5), atol=1e-9)
    np.testing.assert_allclose(stats.squares, np.bincount(y, r * r, 5), atol=1e-9)
    prior = fit_prior([stats], weight=2.0, anchor="neutrophil")
    assert prior.anchor == "neutrophil" and prior.mean[LYMPHOCYTE] < prior.mean[NEUTROPHIL] < prior.mean[BASOPHIL]

    # fewer neutrophils than MIN_ANCHOR_CELLS: the site's median over all its cells, as without an anchor
    keep = (y != NEUTROPHIL) | (np.cumsum(y == NEUTROPHIL) < MIN_ANCHOR_CELLS)
    assert (y[keep] == NEUTROPHIL).sum() == MIN_ANCHOR_CELLS - 1
    np.testing.assert_allclose(SizeStatistics.of(d[keep], y[keep], 5, anchor=NEUTROPHIL).total,
                               SizeStatistics.of(d[keep], y[keep], 5).total, atol=1e-12)


def test_a_deployed_site_finds_its_neutrophils_by_the_networks_answer_and_other_cells_do_not_move_it(lisc):
    d, y = lisc
    right = np.eye(5)[y]  # a network right about every cell
    reference = anchored_reference(d, right, SHARED_CLASSES, "neutrophil")
    assert reference == pytest.approx(np.median(d[y == NEUTROPHIL]))
    # A folder with small non-leukocytes too (platelets, erythroblasts, here called lymphocytes): the
    # all-cells median falls, the anchor stays.
    small = np.full(30, 0.5 * d.min())
    d_all, p_all = np.r_[d, small], np.r_[right, np.eye(5)[[LYMPHOCYTE] * 30]]
    assert anchored_reference(d_all, p_all, SHARED_CLASSES, "neutrophil") == pytest.approx(reference)
    assert site_reference(d_all) < site_reference(d)
    # no anchor, or fewer cells called neutrophils than MIN_ANCHOR_CELLS: the median of all located cells
    assert anchored_reference(d, right, SHARED_CLASSES, None) == site_reference(d)
    none_called = np.eye(5)[[LYMPHOCYTE] * len(d)]
    assert anchored_reference(np.r_[d, np.nan], np.r_[none_called, right[:1]], SHARED_CLASSES, "neutrophil") == site_reference(d)
