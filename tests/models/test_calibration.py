"""Temperature scaling and the abstain threshold from pooled site summaries."""

from __future__ import annotations

import numpy as np
import pytest

from models.calibration import (
    TEMPERATURE_GRID,
    CalibrationSummary,
    calibrate,
    calibrate_sites,
    expected_calibration_error,
    pool,
    softmax,
)
from models.contract import SHARED_CLASSES, ModelContract


def _overconfident(n: int, seed: int, scale: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose calibrated temperature is `scale`: labels drawn from softmax(logits / scale)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, 5)) * scale
    p = softmax(logits, scale)
    y = np.array([rng.choice(5, p=row) for row in p])
    return logits, y


def test_grid_holds_one_exactly() -> None:
    assert 1.0 in TEMPERATURE_GRID
    assert min(TEMPERATURE_GRID) == 0.25 and max(TEMPERATURE_GRID) < 5.0


def test_overconfident_logits_get_a_temperature_above_one_and_lower_ece() -> None:
    logits, y = _overconfident(3000, 0, scale=2.5)
    s = CalibrationSummary.from_logits(logits, y)
    t = s.best_temperature()
    assert 2.0 < t < 3.2
    assert s.nll(t) < s.nll(1.0)
    assert s.ece(t) < s.ece(1.0)
    # The histogram ECE equals the direct computation on the same bins.
    assert s.ece(1.0) == pytest.approx(expected_calibration_error(softmax(logits), y), abs=1e-9)


def test_site_summaries_add_up_to_the_pooled_one() -> None:
    logits, y = _overconfident(600, 1)
    parts = [CalibrationSummary.from_logits(logits[i::3], y[i::3]) for i in range(3)]
    whole = CalibrationSummary.from_logits(logits, y)
    pooled = pool(parts)
    assert pooled.n == whole.n
    np.testing.assert_allclose(pooled.nll_sum, whole.nll_sum, rtol=1e-9)
    np.testing.assert_allclose(pooled.count, whole.count)
    assert pooled.best_temperature() == whole.best_temperature()


def test_summary_survives_the_record_round_trip() -> None:
    logits, y = _overconfident(50, 2)
    s = CalibrationSummary.from_logits(logits, y)
    record = s.to_record()
    assert all(isinstance(v, (int, list)) for v in record.values())
    back = CalibrationSummary.from_record(record)
    np.testing.assert_allclose(back.confidence_sum, s.confidence_sum)
    assert back.best_temperature() == s.best_temperature()


def test_abstain_threshold_meets_the_target_within_the_abstention_cap() -> None:
    logits, y = _overconfident(4000, 3, scale=1.0)
    s = CalibrationSummary.from_logits(logits, y)
    cal = calibrate(s, 5, target_accuracy=0.9, max_abstain=0.5)
    assert cal.val_coverage >= 0.5
    if cal.abstain_threshold:
        assert cal.val_accuracy_kept >= 0.9 or cal.val_coverage == pytest.approx(0.5, abs=0.05)
    # Whatever it picked, the contract accepts it.
    ModelContract(
        architecture="x", class_names=SHARED_CLASSES, input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
        temperature=cal.temperature, abstain_threshold=cal.abstain_threshold,
    )  # fmt: skip


def test_a_perfect_model_never_abstains() -> None:
    y = np.arange(200) % 5
    logits = np.eye(5)[y] * 20.0
    cal = calibrate(CalibrationSummary.from_logits(logits, y), 5)
    assert cal.abstain_threshold == 0.0
    assert cal.val_accuracy_kept == 1.0


def test_empty_summary_is_neutral() -> None:
    s = CalibrationSummary.from_logits(np.zeros((0, 5)), np.zeros(0, dtype=int))
    assert s.best_temperature() == 1.0
    assert s.abstain_threshold(1.0)[0] == 0.0


def test_soften_only_rule_never_sharpens() -> None:
    # Under-confident on the sites' own validation (best T about 0.5): the soften-only rule keeps T = 1;
    # the fitted value is kept for lineage.
    logits, y = _overconfident(4000, 5, scale=0.5)
    s = CalibrationSummary.from_logits(logits, y)
    assert s.best_temperature() < 0.7
    cal = calibrate(s, 5, soften_only=True)
    assert cal.temperature == 1.0
    assert cal.val_temperature == s.best_temperature()
    # Over-confident: softened as fitted.
    logits, y = _overconfident(4000, 5, scale=2.0)
    s = CalibrationSummary.from_logits(logits, y)
    cal = calibrate(s, 5, soften_only=True)
    assert cal.temperature == cal.val_temperature == s.best_temperature() > 1.5


def test_fitted_rule_keeps_a_sharpening_temperature() -> None:
    logits, y = _overconfident(4000, 5, scale=0.5)
    s = CalibrationSummary.from_logits(logits, y)
    cal = calibrate_sites({"a": {"calibration": s.to_record()}}, 5, soften_only=False)
    assert cal is not None and cal.temperature == s.best_temperature() < 0.7
