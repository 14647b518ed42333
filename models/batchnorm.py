"""Re-estimate a network's BatchNorm statistics on one hospital's unlabelled cells (AdaBN).

A hospital's stain, camera and optics move the activations' mean and variance in every layer; BatchNorm
normalises with the statistics it saw in training, so at a new site it normalises with the wrong ones.
Recomputing them from the site's own cells needs no labels and changes no learned weight (Li et al.,
"Revisiting Batch Normalization for Practical Domain Adaptation", 2016):

    adapt_batchnorm(model, batches)   # batches: preprocessed network inputs of the site's cells

Only BatchNorm layers run in training mode here (dropout and everything else stay in eval mode); the
statistics are the plain average of every batch's statistics (momentum None), not a moving average
dominated by the last batches; give batches of equal size (a short last one weighs as much as the rest).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def adapt_batchnorm(module: nn.Module, batches: Iterable[torch.Tensor]) -> tuple[int, int]:
    """Replace the running mean and variance of every BatchNorm in `module` that `batches` reach.

    A layer the forward pass never reaches (a wrapper's module tree can hold layers its forward skips,
    such as a frozen trunk in front of cached features) keeps its statistics. Returns (inputs seen,
    layers re-estimated). Raises ValueError when the module has no BatchNorm layer (a ViT: nothing to
    adapt) or when no input arrived (the statistics are then left as they were)."""
    layers = batchnorm_layers(module)
    if not layers:
        raise ValueError(f"{type(module).__name__} has no BatchNorm layer to adapt")
    was_training = module.training
    momenta = [bn.momentum for bn in layers]
    saved = [(bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()) for bn in layers]
    module.eval()
    for bn in layers:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over every batch, whatever their number
        bn.train()
    seen = 0
    try:
        for x in batches:
            if len(x) < 2:
                continue  # a batch of one has no variance; BatchNorm refuses it in training mode
            module(x)
            seen += len(x)
    finally:
        reached = 0
        for bn, momentum, (mean, var, count) in zip(layers, momenta, saved):
            bn.momentum = momentum
            if seen and int(bn.num_batches_tracked) > 0:
                reached += 1
            else:  # not reached, or nothing seen: the trained statistics go back, never reset ones
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(count)
        module.train(was_training)
    if seen == 0:
        raise ValueError("no cells (batches of at least 2) to estimate BatchNorm statistics from")
    return seen, reached
