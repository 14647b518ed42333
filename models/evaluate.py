"""Classification metrics in NumPy: balanced accuracy, per-class recall, macro-F1, confusion, calibration.

Balanced accuracy is the mean per-class recall over the classes present in the evaluated set (the
benchmark protocol's definition), so a site without basophils is not punished for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: int) -> np.ndarray:
    """Rows: true class, columns: predicted class."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


@dataclass(frozen=True)
class Metrics:
    class_names: tuple[str, ...]
    confusion: np.ndarray  # (C, C) counts
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def present(self) -> np.ndarray:
        return self.support > 0

    @property
    def recall(self) -> np.ndarray:
        """Per-class recall; NaN for classes absent from the evaluated set."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.present, np.diag(self.confusion) / self.support, np.nan)

    @property
    def precision(self) -> np.ndarray:
        predicted = self.confusion.sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(predicted > 0, np.diag(self.confusion) / predicted, 0.0)

    @property
    def balanced_accuracy(self) -> float:
        present = self.recall[self.present]
        return float(present.mean()) if present.size else float("nan")

    @property
    def accuracy(self) -> float:
        return float(np.trace(self.confusion) / self.n) if self.n else float("nan")

    @property
    def macro_f1(self) -> float:
        """Macro-F1 over the classes present in the evaluated set."""
        recall, precision = np.nan_to_num(self.recall), self.precision
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(recall + precision > 0, 2 * recall * precision / (recall + precision), 0.0)
        present = f1[self.present]
        return float(present.mean()) if present.size else float("nan")

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "balanced_accuracy": self.balanced_accuracy,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "recall": {c: (None if np.isnan(r) else float(r)) for c, r in zip(self.class_names, self.recall)},
            "support": {c: int(s) for c, s in zip(self.class_names, self.support)},
            "confusion": self.confusion.tolist(),
            **self.extra,
        }

    @classmethod
    def from_confusion(cls, class_names: Sequence[str], confusion: Any, **extra: float) -> Metrics:
        return cls(tuple(class_names), np.asarray(confusion, dtype=np.int64), dict(extra))

    def __add__(self, other: Metrics) -> Metrics:
        """Pool two evaluations (e.g. sites) by summing their confusion matrices."""
        if self.class_names != other.class_names:
            raise ValueError("cannot pool metrics over different class lists")
        return Metrics(self.class_names, self.confusion + other.confusion)


def compute_metrics(
    class_names: Sequence[str], y_true: Sequence[int], probabilities: np.ndarray
) -> Metrics:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, len(class_names))
    return Metrics(
        tuple(class_names),
        cm,
        {
            "ece": expected_calibration_error(y_true, probabilities),
            "nll": negative_log_likelihood(y_true, probabilities),
        },
    )


def negative_log_likelihood(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    if len(y_true) == 0:
        return float("nan")
    p = np.clip(probabilities[np.arange(len(y_true)), y_true], 1e-12, 1.0)
    return float(-np.log(p).mean())


def expected_calibration_error(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    if len(y_true) == 0:
        return float("nan")
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - confidence[mask].mean())
    return float(ece)
