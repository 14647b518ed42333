from __future__ import annotations

import pytest

from federation.gate import decide

RECALLED = {"basophil": 0.5, "eosinophil": 0.8, "lymphocyte": 0.9, "monocyte": 0.4, "neutrophil": 0.95}
SITES = {"evaluated_sites": ["a", "b", "c"], "expected_sites": ["a", "b", "c"], "min_sites": 3}


def test_first_round_compares_to_nothing() -> None:
    d = decide(balanced_accuracy=0.31, recall=RECALLED, tolerance=0.02, **SITES)
    assert d.accepted
    assert d.reference_balanced_accuracy is None
    assert "first accepted" in d.reason


def test_within_tolerance_is_accepted_and_beyond_is_rejected() -> None:
    common = dict(
        recall=RECALLED, tolerance=0.02, reference_balanced_accuracy=0.70, reference_round=2, **SITES
    )
    assert decide(balanced_accuracy=0.685, **common).accepted
    assert decide(balanced_accuracy=0.68, **common).accepted  # exactly at the tolerance
    worse = decide(balanced_accuracy=0.6799, **common)
    assert not worse.accepted
    assert "worse than round 2's 0.7000" in worse.reason
    assert worse.checks["not_worse"] is False


def test_zero_recall_rejects_even_the_first_round_and_absent_classes_do_not_count() -> None:
    recall = {**RECALLED, "basophil": None, "monocyte": 0.0}
    d = decide(balanced_accuracy=0.9, recall=recall, tolerance=1.0, **SITES)
    assert not d.accepted
    assert d.zero_recall_classes == ("monocyte",)
    assert "zero recall for monocyte" in d.reason
    # basophil absent from the pooled val data (None) is not "zero recall"
    assert decide(
        balanced_accuracy=0.9, recall={**RECALLED, "basophil": None}, tolerance=0.0, **SITES
    ).accepted


def test_too_few_reporting_sites_rejects_and_names_the_missing() -> None:
    d = decide(
        balanced_accuracy=0.9,
        recall=RECALLED,
        tolerance=0.02,
        evaluated_sites=["bccd", "tehran-lisc"],
        expected_sites=["bccd", "jiangxi-tecom", "tehran-lisc"],
        min_sites=3,
    )
    assert not d.accepted
    assert d.missing_sites == ("jiangxi-tecom",)
    assert "missing: jiangxi-tecom" in d.reason


def test_missing_site_above_the_minimum_is_accepted_but_recorded() -> None:
    d = decide(
        balanced_accuracy=0.9,
        recall=RECALLED,
        tolerance=0.02,
        evaluated_sites=["bccd", "tehran-lisc"],
        expected_sites=["bccd", "jiangxi-tecom", "tehran-lisc"],
        min_sites=2,
    )
    assert d.accepted and d.missing_sites == ("jiangxi-tecom",)
    assert "not evaluated at jiangxi-tecom" in d.reason


def test_no_metrics_is_rejected() -> None:
    for ba in (None, float("nan")):
        d = decide(balanced_accuracy=ba, recall={}, tolerance=0.02, **SITES)
        assert not d.accepted and d.balanced_accuracy is None


def test_decision_serialises_to_plain_json_types() -> None:
    d = decide(balanced_accuracy=0.5, recall=RECALLED, tolerance=0.02, **SITES).as_dict()
    assert (
        d["accepted"] is True and isinstance(d["zero_recall_classes"], list) and isinstance(d["checks"], dict)
    )


def test_bad_tolerance_is_refused() -> None:
    with pytest.raises(ValueError, match="tolerance"):
        decide(balanced_accuracy=0.5, recall=RECALLED, tolerance=-0.1, **SITES)
