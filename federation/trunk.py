"""A zoo model split into a frozen trunk and a trainable top that share the model's own parameters.

    split = split_model(model, "stage")
    feats = split.trunk_features(images)     # frozen: computed once per view and cached
    logits = split.top(feats)                # trained; its parameters ARE model's parameters

Training the top therefore trains the full model: after a run, `model` (trunk untouched, top trained) is
exported and served like any other. Which part is the top:
  "head"   the classifier only (a linear probe on pooled features)
  "stage"  the last block group + the classifier: EfficientNet-Lite's last MBConv stage, conv_head and
           its BatchNorm; a ViT's last transformer block and final norm; a ResNet's layer4
  "two-stages"  the last two block groups + the classifier (EfficientNet-Lite's last two MBConv stages, a
           ViT's last two blocks, a ResNet's layer3 + layer4): between "stage" and "full", and still cacheable
  "full"   nothing is frozen (no cache possible; the benchmark's full fine-tuning rows)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

TOPS = ("head", "stage", "two-stages", "full")
Top = Literal["head", "stage", "two-stages", "full"]
# How many of the last block groups each top trains (the rest of the trunk is frozen and cached).
TRAINED_GROUPS = {"head": 0, "stage": 1, "two-stages": 2}


class _EfficientNetTop(nn.Module):
    def __init__(self, model: nn.Module, top: str):
        super().__init__()
        self.model = model
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.top != "head":
            for block in m.blocks[-TRAINED_GROUPS[self.top]:]:
                x = block(x)
            x = m.forward_head(m.bn2(m.conv_head(x)), pre_logits=True)
        return m.classifier(x)


class _VitTop(nn.Module):
    def __init__(self, model: nn.Module, top: str):
        super().__init__()
        self.model = model
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.top != "head":
            for block in m.blocks[-TRAINED_GROUPS[self.top]:]:
                x = block(x)
            x = m.forward_head(m.norm(x), pre_logits=True)
        return m.head(x)


class _ResNetTop(nn.Module):
    def __init__(self, model: nn.Module, top: str):
        super().__init__()
        self.model = model
        self.top = top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.top == "two-stages":
            x = m.layer3(x)
        if self.top != "head":
            x = m.forward_head(m.layer4(x), pre_logits=True)
        return m.fc(x)


def _family(model: nn.Module) -> str:
    if hasattr(model, "conv_head") and hasattr(model, "blocks"):
        return "efficientnet"
    if hasattr(model, "patch_embed") and hasattr(model, "blocks"):
        return "vit"
    if hasattr(model, "layer4") and hasattr(model, "fc"):
        return "resnet"
    raise ValueError(f"no trunk/top split known for {type(model).__name__}")


@dataclass
class Split:
    model: nn.Module
    top_name: str
    top: nn.Module

    @property
    def family(self) -> str:
        return _family(self.model)

    def top_state_keys(self) -> list[str]:
        """State-dict keys of the full model that belong to the top (what sites train and exchange)."""
        if self.top_name == "full":
            return list(self.model.state_dict())
        family, groups = self.family, TRAINED_GROUPS[self.top_name]
        trained: tuple[str, ...] = ()
        if family in ("efficientnet", "vit") and groups:
            n = len(self.model.blocks)
            trained = tuple(f"blocks.{i}." for i in range(n - groups, n))
        if family == "resnet":
            trained = ("layer3.", "layer4.")[2 - groups:] if groups else ()
        prefixes = trained + {
            ("efficientnet", False): ("classifier.",),
            ("efficientnet", True): ("conv_head.", "bn2.", "classifier."),
            ("vit", False): ("head.", "fc_norm."),
            ("vit", True): ("norm.", "fc_norm.", "head."),
            ("resnet", False): ("fc.",),
            ("resnet", True): ("fc.",),
        }[(family, groups > 0)]
        return [k for k in self.model.state_dict() if k.startswith(prefixes)]

    def freeze_trunk(self) -> None:
        keys = set(self.top_state_keys())
        for name, p in self.model.named_parameters():
            p.requires_grad_(name in keys)

    def trainable_parameters(self) -> list[nn.Parameter]:
        keys = set(self.top_state_keys())
        return [p for n, p in self.model.named_parameters() if n in keys]

    def top_state(self) -> dict[str, torch.Tensor]:
        state = self.model.state_dict()
        return {k: state[k] for k in self.top_state_keys()}

    def load_top_state(self, state: dict[str, torch.Tensor]) -> None:
        expected = set(self.top_state_keys())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"top state mismatch: missing {missing[:3]}, unexpected {extra[:3]}")
        self.model.load_state_dict(state, strict=False)

    @torch.no_grad()
    def trunk_features(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen trunk's output for a batch of preprocessed images (eval mode)."""
        if self.top_name == "full":
            raise ValueError("a 'full' split has no frozen trunk")
        m = self.model
        was_training = m.training
        m.eval()
        try:
            family = self.family
            if family == "efficientnet":
                if self.top_name == "head":
                    return m.forward_head(m.forward_features(x), pre_logits=True)
                x = m.bn1(m.conv_stem(x))
                for block in m.blocks[: -TRAINED_GROUPS[self.top_name]]:
                    x = block(x)
                return x
            if family == "vit":
                if self.top_name == "head":
                    return m.forward_head(m.forward_features(x), pre_logits=True)
                x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
                for block in m.blocks[: -TRAINED_GROUPS[self.top_name]]:
                    x = block(x)
                return x
            if self.top_name == "head":
                return m.forward_head(m.forward_features(x), pre_logits=True)
            x = m.layer2(m.layer1(m.maxpool(m.act1(m.bn1(m.conv1(x))))))
            return x if self.top_name == "two-stages" else m.layer3(x)
        finally:
            m.train(was_training)


def split_model(model: nn.Module, top: str) -> Split:
    if top not in TOPS:
        raise ValueError(f"unknown top {top!r}; choose one of {TOPS}")
    if top == "full":  # any module: nothing is frozen
        return Split(model, top, model)
    family = _family(model)
    wrapper = {"efficientnet": _EfficientNetTop, "vit": _VitTop, "resnet": _ResNetTop}[family](model, top)
    return Split(model, top, wrapper)
