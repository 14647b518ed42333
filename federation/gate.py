"""Round acceptance: may the global model of this round become the next registry version?

A round is accepted when
  1. enough sites evaluated it (at least `min_sites` val reports; a site that failed to report is not
     silently left out of the decision),
  2. no class present in the pooled validation set has zero recall (a model that never finds one cell
     type must not reach a clinician, however good its average), and
  3. its pooled validation balanced accuracy is not worse than the last accepted round's by more than
     `tolerance` (the first candidate compares to nothing).
Pure: numbers in, a decision with its reason out; the ServerApp records one for every round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateDecision:
    accepted: bool
    reason: str
    balanced_accuracy: float | None
    reference_balanced_accuracy: float | None  # the last accepted round's, None before the first
    reference_round: int | None
    tolerance: float
    zero_recall_classes: tuple[str, ...] = ()
    missing_sites: tuple[str, ...] = ()
    checks: dict[str, bool] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["zero_recall_classes"] = list(self.zero_recall_classes)
        out["missing_sites"] = list(self.missing_sites)
        return out


def decide(
    *,
    balanced_accuracy: float | None,
    recall: Mapping[str, float | None],
    tolerance: float,
    reference_balanced_accuracy: float | None = None,
    reference_round: int | None = None,
    evaluated_sites: Sequence[str] = (),
    expected_sites: Sequence[str] = (),
    min_sites: int = 1,
) -> GateDecision:
    """Decide one round. `recall` maps class → pooled recall, None for classes absent from the val data."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"gate tolerance must be a finite number >= 0, got {tolerance}")
    evaluated = sorted(set(evaluated_sites))
    missing = tuple(sorted(set(expected_sites) - set(evaluated)))
    zero = tuple(c for c, r in recall.items() if r is not None and r <= 0.0)
    ba = balanced_accuracy if balanced_accuracy is not None and math.isfinite(balanced_accuracy) else None

    checks = {
        "enough_sites": len(evaluated) >= min_sites,
        "has_metrics": ba is not None,
        "no_zero_recall": not zero,
        "not_worse": ba is not None
        and (reference_balanced_accuracy is None or ba >= reference_balanced_accuracy - tolerance),
    }
    common = {
        "balanced_accuracy": ba,
        "reference_balanced_accuracy": reference_balanced_accuracy,
        "reference_round": reference_round,
        "tolerance": tolerance,
        "zero_recall_classes": zero,
        "missing_sites": missing,
        "checks": checks,
    }

    if not checks["enough_sites"]:
        who = f" (missing: {', '.join(missing)})" if missing else ""
        return GateDecision(
            False, f"only {len(evaluated)} site(s) reported validation, {min_sites} required{who}", **common
        )
    if not checks["has_metrics"]:
        return GateDecision(False, "no pooled validation metrics (no validation samples reported)", **common)
    if not checks["no_zero_recall"]:
        return GateDecision(False, f"zero recall for {', '.join(zero)} on pooled validation", **common)
    if not checks["not_worse"]:
        assert reference_balanced_accuracy is not None
        return GateDecision(
            False,
            f"pooled val balanced accuracy {ba:.4f} is worse than round {reference_round}'s "
            f"{reference_balanced_accuracy:.4f} by more than {tolerance:g}",
            **common,
        )
    if reference_balanced_accuracy is None:
        reason = f"first accepted candidate: pooled val balanced accuracy {ba:.4f}, every class recalled"
    else:
        reason = (
            f"pooled val balanced accuracy {ba:.4f} vs round {reference_round}'s "
            f"{reference_balanced_accuracy:.4f} (tolerance {tolerance:g}), every class recalled"
        )
    if missing:
        reason += f"; not evaluated at {', '.join(missing)}"
    return GateDecision(True, reason, **common)
