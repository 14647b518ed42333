"""BatchNorm statistics re-estimated on a site's cells (models.batchnorm, AdaBN)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.batchnorm import adapt_batchnorm, batchnorm_layers


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()


def test_statistics_become_those_of_the_site_cells() -> None:
    net = _net()
    shifted = torch.randn(200, 3) * torch.tensor([2.0, 0.5, 1.0]) + torch.tensor([5.0, -3.0, 0.0])
    seen, layers = adapt_batchnorm(net, torch.split(shifted, 32))
    assert (seen, layers) == (200, 2)
    first = net[0]
    # the plain average over batches (momentum None), not a moving average dominated by the last one
    batch_means = torch.stack([b.mean(0) for b in torch.split(shifted, 32)])
    assert torch.allclose(first.running_mean, batch_means.mean(0), atol=1e-5)
    assert torch.allclose(first.running_mean, torch.tensor([5.0, -3.0, 0.0]), atol=0.35)
    assert first.momentum == 0.1, "the layer's own momentum is restored for later training"
    assert not net.training, "the module is returned in the mode it came in (eval)"
    # the normalised input of the first layer is now centred and scaled on the site's cells
    normalised = (shifted - first.running_mean) / (first.running_var + first.eps).sqrt()
    assert normalised.mean(0).abs().max() < 0.05 and (normalised.std(0) - 1).abs().max() < 0.1


def test_only_batchnorm_runs_in_training_mode() -> None:
    net = _net()
    modes = []
    net[2].register_forward_hook(lambda m, i, o: modes.append(m.training))
    adapt_batchnorm(net, [torch.randn(8, 3)])
    assert modes == [False], "dropout must not drop units while statistics are gathered"


def test_refuses_without_batchnorm_or_cells_and_keeps_trained_statistics() -> None:
    with pytest.raises(ValueError, match="no BatchNorm"):
        adapt_batchnorm(nn.Linear(3, 2), [torch.randn(4, 3)])
    net = _net()
    adapt_batchnorm(net, [torch.randn(64, 3) + 7.0])
    before = [bn.running_mean.clone() for bn in batchnorm_layers(net)]
    with pytest.raises(ValueError, match="no cells"):
        adapt_batchnorm(net, [torch.randn(1, 3)])  # one cell: no variance to estimate
    after = [bn.running_mean for bn in batchnorm_layers(net)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_layers_the_forward_pass_never_reaches_keep_their_statistics() -> None:
    class Head(nn.Module):  # holds the whole network, runs only its last part (like a trunk/top split)
        def __init__(self, net: nn.Sequential):
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net[4](self.net[3](x))

    net = _net()
    net[0].running_mean.fill_(2.0)
    net[0].running_var.fill_(3.0)
    seen, layers = adapt_batchnorm(Head(net), [torch.randn(32, 4) + 5.0])
    assert (seen, layers) == (32, 1)
    assert torch.equal(net[0].running_mean, torch.full((3,), 2.0)), "an unreached layer must not be reset"
    assert torch.equal(net[0].running_var, torch.full((3,), 3.0))
    assert net[3].running_mean.mean() > 4.0
