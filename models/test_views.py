"""Test-time views: a cell's prediction averaged over fixed re-framings of its network input.

A white cell has no up, down, left or right on a slide, and the cell locator's framing is uncertain by a
few percent of scale and position; a model that answers the mean probability over rotated, mirrored and
re-framed views of the cell is steadier on hospitals it never saw (docs/results.md, "Test-time
augmentation"). Every view is fixed (a cell's answer is reproducible) and made of tensor operations on
the square network input, so the average lives inside the exported ONNX graph:

    net = with_test_views(model, contract)   # AveragedViews when contract.test_views != "none"
    net(x)  ->  log(mean_v softmax(model(view_v(x))))

The output is a log-probability, which is a valid logit vector (softmax(log p) = p), so the contract's
temperature, the service, the registry and Triton treat it like any other classifier's logits.
Training side only (torch): the contract names the view set; the service never needs this module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from models.contract import ModelContract


class View(NamedTuple):
    """Mirror left-right, then `turns` quarter turns, then re-frame: `zoom` > 1 magnifies (a centred
    window 1/zoom of the side, moved by `shift` × the spare margin), < 1 shrinks (reflected border)."""

    turns: int = 0
    mirror: bool = False
    zoom: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)  # (down, right) in [-1, 1]


# The locator's framing uncertainty, either way: a cell 15 % larger or smaller than the contract frames it.
ZOOM = 1.15

# name -> its views; view 0 is always the input itself.
VIEW_SETS: dict[str, tuple[View, ...]] = {
    "none": (View(),),
    "flips": (View(), View(0, True), View(2, True), View(2, False)),  # identity, mirror, upside-down, half turn
    "dihedral": tuple(View(k, m) for m in (False, True) for k in range(4)),  # all 8 symmetries of the square
    # 4 quarter turns at 3 scales (12 passes): the set the leave-one-site-out criterion chose (results.md)
    "turns-zooms": tuple(View(k, False, z) for z in (1.0, ZOOM, 1 / ZOOM) for k in range(4)),
}


def apply_view(x: torch.Tensor, view: View) -> torch.Tensor:
    """One view of a batch [N, C, S, S]."""
    if view.mirror:
        x = torch.flip(x, dims=(3,))
    if view.turns % 4:
        x = torch.rot90(x, view.turns, dims=(2, 3))
    if view.zoom == 1.0:
        return x
    side = x.shape[-1]
    if view.zoom > 1.0:
        spare = round(side * (1 - 1 / view.zoom) / 2)  # a whole margin each side: the window stays centred
        window = side - 2 * spare
        top = round(spare + view.shift[0] * spare)
        left = round(spare + view.shift[1] * spare)
        x = x[..., top : top + window, left : left + window]
    else:
        border = round(side * (1 / view.zoom - 1) / 2)
        x = F.pad(x, (border, border, border, border), mode="reflect")
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)


class AveragedViews(nn.Module):
    """`model` run on every view of the batch in one pass; answers the log of the mean softmax."""

    def __init__(self, model: nn.Module, views: str):
        super().__init__()
        if views not in VIEW_SETS:
            raise ValueError(f"test views {views!r} is not one of {', '.join(VIEW_SETS)}")
        self.model = model
        self.views = VIEW_SETS[views]
        self.pretrained_cfg = getattr(model, "pretrained_cfg", {})  # export checks the architecture
        self.train(model.training)  # a new Module is in training mode: callers restore *this* mode later

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        stacked = torch.cat([apply_view(x, v) for v in self.views], dim=0)
        probs = torch.softmax(self.model(stacked).float(), dim=-1)
        mean = probs.reshape(len(self.views), n, -1).mean(dim=0)
        return torch.log(mean.clamp_min(1e-12))


def with_test_views(model: nn.Module, contract: ModelContract) -> nn.Module:
    """The network the contract describes: `model` itself, or `model` averaged over its test views."""
    if contract.test_views == "none" or isinstance(model, AveragedViews):
        return model
    return AveragedViews(model, contract.test_views)
