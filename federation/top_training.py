"""Training and scoring the trainable top of a split model on cached trunk outputs.

A frozen trunk's outputs for a finite pool of views of each cell (the clean one + K augmented ones) are
computed once (`federation.features.trunk_features`; at a real site through `federation.site_cache`);
the top (last stage + classifier) then trains on them with the same loop as a full model
(`federation.task.fit`), one view drawn per cell and epoch. The benchmark's sites and a deployed
SuperNode with a site cache both train this way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from federation.task import TrainConfig, fit, seed_everything
from federation.trunk import Split


def view_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> tuple[int, callable]:  # type: ignore[valid-type]
    """Each epoch visits every image once, with one of its views drawn at random (online augmentation
    from a finite pool of K augmented views plus the clean one)."""
    n, views = x.shape[0], x.shape[1]
    steps = max(1, n // batch_size) if n > batch_size else 1

    def batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(n)
        which = rng.integers(0, views, size=n)
        for s in range(steps):
            idx = order[s * batch_size : (s + 1) * batch_size] if n > batch_size else order
            feats = torch.from_numpy(np.asarray(x[idx, which[idx]], dtype=np.float32))
            yield feats, torch.from_numpy(y[idx].astype(np.int64))

    return steps, batches


def train_top(
    split: Split,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    config: TrainConfig,
    *,
    global_params: list[torch.Tensor] | None = None,
    gradient_correction: list[torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    seed_everything(config.seed)
    steps, batches = view_batches(x, y, config.batch_size, config.seed)
    params = split.trainable_parameters()
    if config.frozen_classifier:
        fixed = {id(p) for p in split.model.get_classifier().parameters()}
        params = [p for p in params if id(p) not in fixed]
    return fit(
        split.top,
        params,
        batches,
        steps,
        y.tolist(),
        num_classes,
        config,
        global_params=global_params,
        gradient_correction=gradient_correction,
        progress=progress,
    )


@torch.no_grad()
def top_logits(split: Split, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    split.top.eval()
    out = [
        split.top(torch.from_numpy(np.asarray(x[i : i + batch_size], dtype=np.float32))).numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
