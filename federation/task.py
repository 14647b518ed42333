"""Task code shared by the ClientApp, the ServerApp, the benchmark and `wbc evaluate`.

Everything here is built from the model contract: the transforms come from it, the class order comes
from it, and the trained model is exported with it. No image ever leaves the process that reads it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from federation.augment import AugmentConfig, CellAugment
from federation.losses import class_weights, logit_adjustment
from federation.sites import Sample
from federation.style import OwnAmplitudes
from models.calibration import CalibrationSummary
from models.cellcrop import CellMeasures
from models.contract import SHARED_CLASSES, CellCrop, ModelContract
from models.evaluate import Metrics, compute_metrics
from models.granule_prior import granule_statistics
from models.preprocess import finish, prepare_sized, softmax
from models.size_prior import SizeStatistics, anchor_of
from models.zoo import create_model, pretrained_cfg

DEFAULT_ARCHITECTURE = "tf_efficientnet_lite0"
DEFAULT_INPUT_SIZE = 128


def build_contract(
    architecture: str = DEFAULT_ARCHITECTURE,
    input_size: int = DEFAULT_INPUT_SIZE,
    *,
    class_names: Sequence[str] = SHARED_CLASSES,
    cell_crop: CellCrop | None = CellCrop(),
    color: str = "rgb",
    color_norm: str = "white-balance",
    detail: int | None = None,
    test_views: str = "none",
) -> ModelContract:
    cfg = pretrained_cfg(architecture)
    return ModelContract(
        architecture=architecture,
        class_names=tuple(class_names),
        input_size=input_size,
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        cell_crop=cell_crop,
        color=color,
        color_norm=color_norm,
        detail=detail,
        test_views=test_views,
    )


def create_model_from_contract(contract: ModelContract, *, pretrained: bool = True) -> nn.Module:
    """The contract's backbone with a new classifier; a pretrained one gets a zero-initialised classifier.

    timm initialises EfficientNet's classifier uniformly in ±1/sqrt(classes) (±0.45 for five): over
    1280 pretrained features that gives random initial logits of several units, which the first local
    epochs spend undoing (and sites undo differently). Zero weights start every class equal; the
    gradient still reaches the weights at once.
    """
    model = create_model(
        contract.architecture, contract.num_classes, pretrained=pretrained, img_size=contract.input_size
    )
    if pretrained:
        head = model.get_classifier()
        if isinstance(head, nn.Linear):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
    return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---- data -----------------------------------------------------------------------------------------
def load_image(path) -> Image.Image:
    with Image.open(path) as img:
        img.load()
        return img


def train_augmentation(input_size: int, config: AugmentConfig | None = None) -> CellAugment:
    """Invariances a classifier needs at a new site: framing, stain, camera, optics (`federation.augment`).

    Applied between `prepare` (cell located and centred) and `finish` (contract colour + resize), so
    the service never sees any of it. Draws come from Python's `random` (seeded by `seed_everything`).
    """
    return CellAugment(input_size, config)


# Where CellDataset gets prepared cells from, when set: the benchmark points it at its on-disk cache, so
# the many models it trains in one process reuse each cell's `prepare` (15-25 ms). A deployment never sets
# it (its ClientApp is a fresh process per message).
PreparedSource = Callable[[Sample, ModelContract], Image.Image]
_prepared_source: PreparedSource | None = None


def set_prepared_source(source: PreparedSource | None) -> None:
    global _prepared_source
    _prepared_source = source


class CellDataset(Dataset):
    """Samples → (CHW float tensor, class index). Prepared (cell-cropped) images are cached in memory."""

    def __init__(
        self,
        samples: Sequence[Sample],
        contract: ModelContract,
        *,
        augment: Callable[[Image.Image], Image.Image] | None = None,
    ):
        index = {name: i for i, name in enumerate(contract.class_names)}
        unknown = sorted({s.label for s in samples} - set(index))
        if unknown:
            raise ValueError(f"labels {unknown} are not in the contract's classes {contract.class_names}")
        self.samples = list(samples)
        self.targets = [index[s.label] for s in self.samples]
        self.contract = contract
        self.augment = augment
        self._prepared: dict[int, Image.Image] = {}
        # The locator's measures, kept as cells are prepared (the opinions' statistics, free here).
        self.measures: dict[int, CellMeasures] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def prepared(self, i: int) -> Image.Image:
        if i not in self._prepared:
            if _prepared_source is not None:
                self._prepared[i] = _prepared_source(self.samples[i], self.contract)
            else:
                self._prepared[i], self.measures[i] = prepare_sized(load_image(self.samples[i].path), self.contract)
        return self._prepared[i]

    def opinion_statistics(self) -> tuple[SizeStatistics | None, SizeStatistics | None]:
        """Per-class statistics of every cell's relative size (models.size_prior) and granule density
        (models.granule_prior), once each was prepared here with a cell crop; None otherwise (a
        benchmark's cached source, no crop)."""
        if _prepared_source is not None or self.contract.cell_crop is None:
            return None, None
        for i in range(len(self)):  # cells a dropped last batch never showed (a few, prepared once here)
            if i not in self.measures:
                self.prepared(i)
        measures = [self.measures[i] for i in range(len(self))]
        return (size_statistics_of([m.diameter for m in measures], self.targets, self.contract),
                granule_statistics_of([m.granules for m in measures], self.targets, self.contract))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.prepared(i)
        if self.augment is not None:
            image = self.augment(image)
        return torch.from_numpy(finish(image, self.contract)), self.targets[i]


def size_statistics_of(
    diameters: Sequence[float], targets: Sequence[int], contract: ModelContract
) -> SizeStatistics | None:
    """Per-class relative-size statistics of located cell diameters (NaN: no nucleus found), or None
    when no cell was located (no cell crop, or no nucleus in any cell: nothing to say about sizes)."""
    if contract.cell_crop is None or not np.isfinite(diameters).any():
        return None
    anchor = anchor_of(contract.class_names)
    return SizeStatistics.of(list(diameters), list(targets), contract.num_classes,
                             None if anchor is None else contract.class_names.index(anchor))


def granule_statistics_of(
    granules: Sequence[float], targets: Sequence[int], contract: ModelContract
) -> SizeStatistics | None:
    """Per-class statistics of granule density relative to the site's labelled neutrophils
    (models.granule_prior), or None when no cell was measured."""
    if contract.cell_crop is None:
        return None
    anchor = anchor_of(contract.class_names)
    return granule_statistics(list(granules), list(targets), contract.num_classes,
                              None if anchor is None else contract.class_names.index(anchor))


# ---- training -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    class_balanced: bool = True
    class_weight_cap: float = 3.0
    # Logit adjustment (Menon et al. 2021) with the local label prior: the loss sees logits + tau·log(prior),
    # so the network learns what does not depend on how common a class is at this site; a class absent
    # here gets log(prior) ≈ -14, so its gradient is near zero (AdamW's scaling still moves it a little,
    # less than plain cross-entropy does). 0 = off.
    logit_adjustment: float = 0.0
    # BatchNorm layers of the trained part keep their pretrained statistics (affine still trained). With
    # it off, each site's running mean/var follow its own cells and FedAvg averages them: the averaged
    # statistics fit no site (the FedBN observation, Li et al. 2021).
    frozen_bn_stats: bool = False
    # Weight averaging (SWA, Izmailov et al. 2018; SWAD, Cha et al. 2021 for domain generalisation): the
    # trained parameters end as the mean of their iterates over the last `average_tail` of the steps, a
    # flatter point that transfers better to unseen domains. BatchNorm statistics stay the last step's.
    # 0 = off (the last iterate).
    average_tail: float = 0.0
    # The federation's class counts (pooled over the sites): class weights from them instead of from this
    # site's cells, so that the sites' losses add up to the pooled, centralised one. None = this site's.
    class_counts: tuple[float, ...] | None = None
    # The classifier stays at its (seeded, shared) initialisation and only the layers below it train
    # (FedBABU, Oh et al. 2022): with label skew each site's classifier is what drifts toward its own
    # classes; fixed, every site pulls its cells toward the same class directions. False = trained. The
    # start must not be degenerate (this model's new head starts at zero: every class alike), so the
    # benchmark sets a simplex ETF first (`benchmarks/client_drift.py`); not in the shipped recipe.
    frozen_classifier: bool = False
    proximal_mu: float = 0.0
    seed: int = 0


Batches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]  # epoch → (inputs, targets)


def fit(
    forward: nn.Module,
    params: Sequence[nn.Parameter],
    batches: Batches,
    steps_per_epoch: int,
    targets: Sequence[int],
    num_classes: int,
    config: TrainConfig,
    *,
    global_params: Sequence[torch.Tensor] | None = None,
    gradient_correction: Sequence[torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, float]:
    """The one optimisation loop (sites, centralised and single-site baselines, benchmark tops).

    AdamW with a cosine schedule over all local steps, label smoothing, capped class weights, and the
    FedProx term (mu/2)·‖w − w_global‖² over `params` when proximal_mu > 0.
    """
    weights = (class_weights(targets, num_classes, config.class_weight_cap, config.class_counts)
               if config.class_balanced else None)
    adjust = logit_adjustment(targets, num_classes, config.logit_adjustment) if config.logit_adjustment else None
    params = list(params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total_steps = max(1, config.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    anchors = (
        [g.detach().clone() for g in global_params] if config.proximal_mu > 0 and global_params else None
    )

    forward.train()
    if config.frozen_bn_stats:
        for module in forward.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
    average_from = total_steps - round(config.average_tail * total_steps) if config.average_tail > 0 else None
    averaged = [torch.zeros_like(p, requires_grad=False) for p in params] if average_from is not None else []
    averaged_n = 0
    seen, loss_sum, correct, step = 0, 0.0, 0, 0
    for epoch in range(config.epochs):
        for inputs, labels in batches(epoch):
            logits = forward(inputs)
            trained = logits + adjust if adjust is not None else logits
            loss = F.cross_entropy(trained, labels, weight=weights, label_smoothing=config.label_smoothing)
            if anchors is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
                loss = loss + 0.5 * config.proximal_mu * prox
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if gradient_correction is not None:  # SCAFFOLD's control variates: global minus this site's
                for p, c in zip(params, gradient_correction):
                    if p.grad is not None:
                        p.grad += c
            optimizer.step()
            scheduler.step()
            step += 1
            if average_from is not None and step > average_from:
                averaged_n += 1
                with torch.no_grad():
                    for a, p in zip(averaged, params):
                        a += (p.detach() - a) / averaged_n
            batch = labels.numel()
            seen += batch
            loss_sum += float(loss.detach()) * batch
            correct += int((logits.detach().argmax(1) == labels).sum())
            if progress is not None:
                progress(step, total_steps, float(loss.detach()))
    if averaged_n:
        with torch.no_grad():
            for a, p in zip(averaged, params):
                p.copy_(a)
    return {
        "train_loss": loss_sum / max(seen, 1),
        "train_accuracy": correct / max(seen, 1),
        "num_examples": len(targets),
        "steps": step,
    }


def train_local(
    model: nn.Module,
    samples: Sequence[Sample],
    contract: ModelContract,
    config: TrainConfig,
    *,
    global_params: Sequence[torch.Tensor] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    augment: AugmentConfig | None = None,
    top: str = "full",
) -> dict[str, Any]:
    """Train in place on local images (fresh augmentation per step). The result's "size" and "granules":
    the cells' relative-size and granule-density statistics (models.size_prior.SizeStatistics) or None.

    `top` (`federation.trunk`): "full" trains every layer; "stage" / "head" train only the last block
    group / the classifier, the rest frozen in eval mode (pretrained BatchNorm statistics kept), about
    3x cheaper per image on a CPU. `global_params` (FedProx) are the trainable parameters' global values.
    """
    from federation.trunk import split_model

    seed_everything(config.seed)
    cell_augment = train_augmentation(contract.input_size, augment)
    dataset = CellDataset(samples, contract, augment=cell_augment)
    if cell_augment.config.style_p:  # amplitude mixed among this site's own cells: nothing leaves the site
        cell_augment.styles = OwnAmplitudes(dataset.prepared, len(dataset), contract.input_size)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) > config.batch_size,
        generator=torch.Generator().manual_seed(config.seed),
    )
    split = split_model(model, top)
    if top == "full":
        forward: nn.Module = model
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        split.freeze_trunk()
        forward = _TrunkThenTop(split)
        params = split.trainable_parameters()
        if global_params is not None:  # the model was just loaded with the global weights
            global_params = [p.detach().clone() for p in params]
    result: dict[str, Any] = fit(
        forward,
        params,
        lambda _epoch: loader,
        len(loader),
        dataset.targets,
        contract.num_classes,
        config,
        global_params=global_params,
        progress=progress,
    )
    result["size"], result["granules"] = dataset.opinion_statistics()
    return result


class _TrunkThenTop(nn.Module):
    """Frozen trunk (no_grad, eval mode) then the trainable top: the same function as the model."""

    def __init__(self, split):
        super().__init__()
        self.split = split
        self.top = split.top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.top(self.split.trunk_features(x))


# ---- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def predict_logits(
    model: nn.Module, samples: Sequence[Sample], contract: ModelContract, *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Logits (N, C) and true class indices (N,) with the contract's deterministic preprocessing, of the
    network the contract describes (averaged over its test views when it names some: models.test_views)."""
    from models.test_views import with_test_views

    dataset = CellDataset(samples, contract)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    model = with_test_views(model, contract)
    model.eval()
    logits, targets = [], []
    for images, labels in loader:
        logits.append(model(images).float().numpy())
        targets.append(labels.numpy())
    if not logits:
        return np.zeros((0, contract.num_classes), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(logits), np.concatenate(targets)


def evaluate_samples(
    model: nn.Module, samples: Sequence[Sample], contract: ModelContract, *, batch_size: int = 64
) -> Metrics:
    logits, targets = predict_logits(model, samples, contract, batch_size=batch_size)
    return compute_metrics(contract.class_names, targets, softmax(logits, contract.temperature))


def evaluation_record(logits: np.ndarray, targets: np.ndarray, contract: ModelContract) -> dict[str, object]:
    """A site's validation reply as plain numbers: metrics at the contract's temperature, the confusion
    matrix (the server pools those) and the calibration summary (the server fits temperature and abstain
    threshold from those). Nothing identifies a cell."""
    metrics = compute_metrics(contract.class_names, targets, softmax(logits, contract.temperature))
    return {
        "num-examples": metrics.n,
        "loss": _finite(metrics.extra.get("nll")),
        "ece": _finite(metrics.extra.get("ece")),
        "balanced-accuracy": _finite(metrics.balanced_accuracy),
        "accuracy": _finite(metrics.accuracy),
        "macro-f1": _finite(metrics.macro_f1),
        "recall": [float(r) for r in metrics.recall],  # NaN for classes absent from this site's val split
        "confusion": [int(v) for v in metrics.confusion.reshape(-1)],
        **CalibrationSummary.from_logits(logits, targets).to_record(),
    }


def _finite(value: float | None) -> float:
    return float(value) if value is not None and math.isfinite(value) else float("nan")


# ---- parameters as plain arrays (what travels between server and sites) ---------------------------
def state_arrays(model: nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


def load_state_arrays(model: nn.Module, arrays: Iterable[np.ndarray]) -> None:
    keys = list(model.state_dict().keys())
    arrays = list(arrays)
    if len(keys) != len(arrays):
        raise ValueError(f"expected {len(keys)} tensors, got {len(arrays)}")
    model.load_state_dict({k: torch.from_numpy(np.asarray(a)) for k, a in zip(keys, arrays)}, strict=True)
