"""Calibration without pooling images: temperature scaling and the abstain threshold, from site summaries.

Each site evaluates the global model on its own validation cells and sends back a `CalibrationSummary`:
for every temperature on a fixed grid, the summed negative log-likelihood and a confidence histogram
(count, correct, summed confidence per bin). Summaries add up across sites, so the server picks
  - the temperature with the lowest pooled NLL (Guo et al. 2017's temperature scaling, on a grid; the
    run config's temperature-rule may keep it at or above 1, see `calibrate`), and
  - the abstain threshold: the lowest confidence bin edge at which the cells kept are at least
    `target_accuracy` correct, abstaining on at most `max_abstain` of them,
and writes both into the model contract. No logits or images leave a site, only these counts.
NumPy only (the service imports models/ without torch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

# 2^(k/16): 0.25 .. 4.97 in 4.4 % steps (NLL is flat within a step), with 1.0 exactly on the grid.
TEMPERATURE_GRID: tuple[float, ...] = tuple(float(2.0 ** (k / 16)) for k in range(-32, 38))
BINS = 20  # equal-width confidence bins on [0, 1] (ECE uses the same bins)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class CalibrationSummary:
    temperatures: tuple[float, ...]
    n: int
    nll_sum: np.ndarray  # (T,)
    count: np.ndarray  # (T, BINS) cells per confidence bin
    correct: np.ndarray  # (T, BINS) correctly classified cells per bin
    confidence_sum: np.ndarray  # (T, BINS) summed top-class probability per bin

    @classmethod
    def from_logits(
        cls, logits: np.ndarray, targets: Sequence[int], temperatures: Sequence[float] = TEMPERATURE_GRID
    ) -> CalibrationSummary:
        logits = np.asarray(logits, dtype=np.float64)
        y = np.asarray(targets, dtype=np.int64)
        t_count = len(temperatures)
        nll = np.zeros(t_count)
        count = np.zeros((t_count, BINS))
        correct = np.zeros((t_count, BINS))
        conf_sum = np.zeros((t_count, BINS))
        for k, t in enumerate(temperatures):
            if len(y) == 0:
                break
            p = softmax(logits, t)
            nll[k] = -np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0)).sum()
            conf = p.max(axis=1)
            hit = (p.argmax(axis=1) == y).astype(np.float64)
            b = _bin(conf)
            count[k] = np.bincount(b, minlength=BINS)
            correct[k] = np.bincount(b, hit, minlength=BINS)
            conf_sum[k] = np.bincount(b, conf, minlength=BINS)
        return cls(tuple(float(t) for t in temperatures), len(y), nll, count, correct, conf_sum)

    # ---- transport: flat lists of numbers (a Flower MetricRecord holds lists of floats) ---------------
    def to_record(self) -> dict[str, list[float] | int]:
        return {
            "cal-temperatures": list(self.temperatures),
            "cal-n": self.n,
            "cal-nll-sum": self.nll_sum.tolist(),
            "cal-count": self.count.ravel().tolist(),
            "cal-correct": self.correct.ravel().tolist(),
            "cal-confidence-sum": self.confidence_sum.ravel().tolist(),
        }

    @classmethod
    def from_record(cls, record: dict) -> CalibrationSummary:
        temps = tuple(float(t) for t in record["cal-temperatures"])
        shape = (len(temps), BINS)
        return cls(
            temps,
            int(record["cal-n"]),
            np.asarray(record["cal-nll-sum"], dtype=np.float64),
            np.asarray(record["cal-count"], dtype=np.float64).reshape(shape),
            np.asarray(record["cal-correct"], dtype=np.float64).reshape(shape),
            np.asarray(record["cal-confidence-sum"], dtype=np.float64).reshape(shape),
        )

    def __add__(self, other: CalibrationSummary) -> CalibrationSummary:
        if self.temperatures != other.temperatures:
            raise ValueError("calibration summaries over different temperature grids")
        return CalibrationSummary(
            self.temperatures,
            self.n + other.n,
            self.nll_sum + other.nll_sum,
            self.count + other.count,
            self.correct + other.correct,
            self.confidence_sum + other.confidence_sum,
        )

    # ---- what the server reads off -------------------------------------------------------------------
    def index(self, temperature: float) -> int:
        return int(np.argmin(np.abs(np.log(np.asarray(self.temperatures)) - np.log(temperature))))

    def best_temperature(self) -> float:
        if self.n == 0:
            return 1.0
        return self.temperatures[int(np.argmin(self.nll_sum))]

    def nll(self, temperature: float) -> float:
        return float(self.nll_sum[self.index(temperature)] / self.n) if self.n else float("nan")

    def ece(self, temperature: float) -> float:
        k = self.index(temperature)
        if self.n == 0:
            return float("nan")
        return float(np.abs(self.correct[k] - self.confidence_sum[k]).sum() / self.n)

    def abstain_threshold(
        self, temperature: float, target_accuracy: float = 0.95, max_abstain: float = 0.2
    ) -> tuple[float, dict[str, float]]:
        """The lowest bin edge t with accuracy(conf ≥ t) ≥ target, abstaining on ≤ max_abstain of the cells.

        When the target cannot be met within max_abstain, the highest edge that abstains on at most
        max_abstain is used. 0.0 (never abstain) when the model is that accurate without abstaining.
        """
        k = self.index(temperature)
        if self.n == 0:
            return 0.0, {"coverage": float("nan"), "accuracy_kept": float("nan")}
        edges = np.linspace(0.0, 1.0, BINS + 1)[:-1]
        # kept from bin b upwards
        kept = np.cumsum(self.count[k][::-1])[::-1]
        hits = np.cumsum(self.correct[k][::-1])[::-1]
        coverage = kept / self.n
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(kept > 0, hits / kept, 1.0)
        allowed = coverage >= 1.0 - max_abstain - 1e-9
        good = allowed & (accuracy >= target_accuracy)
        b = int(np.flatnonzero(good)[0]) if good.any() else int(np.flatnonzero(allowed)[-1])
        threshold = float(edges[b])
        return threshold, {"coverage": float(coverage[b]), "accuracy_kept": float(accuracy[b])}


def _bin(confidence: np.ndarray) -> np.ndarray:
    return np.clip((confidence * BINS).astype(np.int64), 0, BINS - 1)


def pool(summaries: Iterable[CalibrationSummary]) -> CalibrationSummary:
    items = list(summaries)
    if not items:
        raise ValueError("no calibration summaries to pool")
    total = items[0]
    for s in items[1:]:
        total = total + s
    return total


def expected_calibration_error(probabilities: np.ndarray, targets: Sequence[int]) -> float:
    """ECE on the same equal-width bins the summaries use."""
    p = np.asarray(probabilities, dtype=np.float64)
    y = np.asarray(targets, dtype=np.int64)
    if len(y) == 0:
        return float("nan")
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(np.float64)
    b = _bin(conf)
    return float(np.abs(np.bincount(b, hit, BINS) - np.bincount(b, conf, BINS)).sum() / len(y))


@dataclass(frozen=True)
class Calibration:
    """What goes into the contract, and the evidence for it (what lineage records)."""

    temperature: float
    abstain_threshold: float
    val_temperature: float  # the pooled-validation NLL optimum, before the "only soften" rule
    val_n: int
    val_nll_before: float
    val_nll_after: float
    val_ece_before: float
    val_ece_after: float
    val_coverage: float
    val_accuracy_kept: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def calibrate(
    summary: CalibrationSummary,
    num_classes: int,
    target_accuracy: float = 0.95,
    max_abstain: float = 0.2,
    soften_only: bool = False,
) -> Calibration:
    """The temperature with the lowest pooled validation NLL (`soften_only=True`: never below 1).

    With label smoothing and class weights the models are under-confident on cells like their sites' own
    (fitted T 0.3-0.9), and the fitted T cut ECE in-domain (0.11-0.32 → 0.02-0.04) and on Barcelona; on
    a training site left out of training it raised it (0.084 → 0.240), which `soften_only` avoids.
    docs/results.md, "Calibration". The fitted value is kept in lineage either way (`val_temperature`).
    """
    fitted = summary.best_temperature()
    t = max(1.0, fitted) if soften_only else fitted
    threshold, info = summary.abstain_threshold(t, target_accuracy, max_abstain)
    if threshold and threshold <= 1.0 / num_classes:  # the contract refuses a threshold that never abstains
        threshold = 0.0
    return Calibration(
        temperature=t,
        abstain_threshold=threshold,
        val_temperature=fitted,
        val_n=summary.n,
        val_nll_before=summary.nll(1.0),
        val_nll_after=summary.nll(t),
        val_ece_before=summary.ece(1.0),
        val_ece_after=summary.ece(t),
        val_coverage=info["coverage"],
        val_accuracy_kept=info["accuracy_kept"],
    )


SUMMARY_KEY = "calibration"  # where a round record keeps a site's raw summary (federation.rounds)


def calibrate_sites(
    per_site: dict[str, dict],
    num_classes: int,
    target_accuracy: float = 0.95,
    max_abstain: float = 0.2,
    soften_only: bool = False,
) -> Calibration | None:
    """Pool the sites' summaries (each site's validation record holds its own under SUMMARY_KEY) and fit
    the temperature and abstain threshold; None when no site sent one (an older ClientApp)."""
    summaries = [
        CalibrationSummary.from_record(m[SUMMARY_KEY]) for m in per_site.values() if m.get(SUMMARY_KEY)
    ]
    if not summaries:
        return None
    return calibrate(pool(summaries), num_classes, target_accuracy, max_abstain, soften_only)


def without_summaries(per_site: dict[str, dict]) -> dict[str, dict]:
    """The same site records without the raw summaries (thousands of numbers; lineage keeps the result)."""
    return {site: {k: v for k, v in m.items() if k != SUMMARY_KEY} for site, m in per_site.items()}
