"""The classifier recalibration from per-class feature statistics (federation/recalibration.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from federation.recalibration import ClassStatistics, pooled_gaussians, retrain_classifier, sample_virtual


def _clouds(rng: np.random.Generator, counts: list[int], centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.concatenate([centres[c] + rng.normal(size=(k, centres.shape[1])) for c, k in enumerate(counts)])
    y = np.concatenate([np.full(k, c) for c, k in enumerate(counts)])
    return x, y


def test_pooling_the_sites_statistics_equals_pooling_their_rows() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=3, size=(3, 5))
    (xa, ya), (xb, yb) = _clouds(rng, [40, 5, 0], centres), _clouds(rng, [3, 30, 25], centres + 1.0)
    gauss = pooled_gaussians([ClassStatistics.of(xa, ya, 3), ClassStatistics.of(xb, yb, 3)])
    x, y = np.concatenate([xa, xb]), np.concatenate([ya, yb])
    for c in range(3):
        mu, cov, n = gauss[c]
        assert n == (y == c).sum()
        np.testing.assert_allclose(mu, x[y == c].mean(0), atol=1e-10)
        np.testing.assert_allclose(cov, np.cov(x[y == c], rowvar=False), atol=1e-10)


def test_a_class_with_too_few_rows_is_not_sent() -> None:
    rng = np.random.default_rng(1)
    x, y = _clouds(rng, [10, 2], rng.normal(size=(2, 4)))
    stats = ClassStatistics.of(x, y, 3, min_count=5)
    assert stats.count.tolist() == [10, 0, 0]
    assert not stats.mean[1].any() and not stats.scatter[1].any()  # nothing of the two cells leaves
    assert list(pooled_gaussians([stats])) == [0]
    with pytest.raises(ValueError, match="do not pair up"):
        ClassStatistics.of(x, y[:-1], 3)


def test_virtual_cells_follow_the_pooled_gaussians_and_the_seed() -> None:
    rng = np.random.default_rng(2)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T + np.eye(4)
    gauss = {0: (np.arange(4.0), cov, 100.0), 2: (-np.ones(4), np.eye(4), 10.0)}
    x, y = sample_virtual(gauss, {0: 20000, 2: 5}, seed=3)
    assert x.dtype == np.float32 and np.bincount(y).tolist() == [20000, 0, 5]
    np.testing.assert_allclose(x[y == 0].mean(0), np.arange(4.0), atol=0.1)
    np.testing.assert_allclose(np.cov(x[y == 0], rowvar=False), cov, atol=0.15 * np.abs(cov).max())
    again, _ = sample_virtual(gauss, {0: 20000, 2: 5}, seed=3)
    assert np.array_equal(x, again)


def test_retraining_on_virtual_cells_undoes_a_site_skewed_classifier() -> None:
    """Two sites, each with mostly one class: a head fitted to one site's mix calls most cells class 0;
    retrained on virtual cells from both sites' statistics it separates all three classes."""
    rng = np.random.default_rng(4)
    centres = rng.normal(scale=2.5, size=(3, 8))
    sites = [_clouds(rng, [300, 10, 0], centres), _clouds(rng, [0, 20, 200], centres)]
    test_x, test_y = _clouds(rng, [100, 100, 100], centres)

    torch.manual_seed(0)
    head = nn.Linear(8, 3)
    with torch.no_grad():  # skewed toward class 0, as after training at the first site
        head.bias.copy_(torch.tensor([6.0, 0.0, -6.0]))

    def balanced_accuracy() -> float:
        with torch.no_grad():
            pred = head(torch.as_tensor(test_x, dtype=torch.float32)).argmax(1).numpy()
        return float(np.mean([(pred[test_y == c] == c).mean() for c in range(3)]))

    before = balanced_accuracy()
    gauss = pooled_gaussians([ClassStatistics.of(x, y, 3) for x, y in sites])
    vx, vy = sample_virtual(gauss, {c: 1000 for c in gauss}, seed=0)
    retrain_classifier(head, vx, vy, steps=400, lr=0.05, seed=0)
    after = balanced_accuracy()
    assert before < 0.75 and after > 0.95, (before, after)
    assert not head.training
