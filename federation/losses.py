"""Per-site loss weighting, NumPy and torch only (also imported by the GPU fine-tuning benchmark, which
runs where the service's dependencies are not installed)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def class_weights(
    targets: Sequence[int], num_classes: int, cap: float = 3.0, counts: Sequence[float] | None = None
) -> torch.Tensor:
    """Inverse-frequency class weights, capped at `cap` and normalised to a per-sample mean of 1.

    Uncapped, one basophil among 210 cells (jiangxi-tecom) weighs ~40x a neutrophil: the loss is then
    dominated by memorising that one cell (losses of 6-10 were seen). Classes absent locally get 0.
    `counts`: the class counts to weigh by instead of these targets' (the federation's pooled counts: every
    site then weighs its cells as the pooled, centralised loss would).
    """
    if counts is None:
        counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes)
    counts = np.asarray(counts, dtype=np.float64)
    if counts.shape != (num_classes,):
        raise ValueError(f"class counts for {counts.size} classes, the model has {num_classes}")
    present = counts > 0
    if not present.any():
        return torch.zeros(num_classes, dtype=torch.float32)
    raw = np.where(present, counts.sum() / (present.sum() * np.maximum(counts, 1)), 0.0)
    capped = np.minimum(raw, cap)
    capped *= counts.sum() / float((capped * counts).sum())  # mean weight per sample = 1
    return torch.tensor(capped, dtype=torch.float32)


def logit_adjustment(targets: Sequence[int], num_classes: int, tau: float) -> torch.Tensor:
    """tau·log(local class prior); absent classes get the prior of 1e-6 of a cell (effectively masked)."""
    counts = np.bincount(np.asarray(targets, dtype=np.int64), minlength=num_classes).astype(np.float64)
    prior = (counts + 1e-6) / max(counts.sum(), 1.0)
    return torch.tensor(tau * np.log(prior), dtype=torch.float32)
