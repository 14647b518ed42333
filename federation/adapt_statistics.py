"""A site adapts a registered version to its cells without any label (`wbc adapt --unlabelled`).

A new hospital has cells before it has reviewed any. Its stain and optics shift the activations that the
model's BatchNorm layers normalise; re-estimating their statistics on the site's own cells (AdaBN,
`models.batchnorm`) changes no learned weight and needs no label. Measured with the shipped recipe
(`benchmarks/adabn.py`, 3 seeds, 500 unlabelled Barcelona train cells, scored on Barcelona's test
split): FedAvg 0.674 -> 0.721, centralised 0.697 -> 0.786 (docs/results.md, "A new hospital with no
reviewed cells"). Fine-tuning on reviewed cells (`federation.adapt`) does more once they exist.

Only the layers the federation trained are re-estimated (the recorded `train_top`: for "stage", the last
stage's BatchNorms; the frozen ImageNet trunk keeps its statistics, which measured no better adapted).
Cells come from a site data root (its train cells, labels ignored) or any folder of cell images. When
the data root has labelled val cells, the adapted model is checked against its parent on them and its
temperature refitted; from a bare folder nothing can be checked, and the outcome says so.
Registered like `wbc adapt`'s versions: the site's own model name, lineage to the parent, ONNX + parity.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from federation.adapt import MIN_VAL_CELLS, AdaptOutcome, _metrics, _summary, load_parent
from federation.sites import DataError, Sample

MIN_CELLS = 100  # 100 cells measured as good as 500 (benchmarks/adabn.py); fewer give noisy statistics
BATCH = 64  # BatchNorm averages batches equally: equal batches, the short remainder left out
MAX_CELLS = 2048  # 2,304 Barcelona cells did no better than 448 (docs/results.md); more only costs time


@dataclass
class StatisticsOutcome(AdaptOutcome):
    cells: int = 0  # cells whose statistics were used
    unreadable: list[str] = field(default_factory=list)  # file names (no paths: they may name patients)
    layers: int = 0
    checked: bool = False  # False: no labelled val cells, the adapted model could not be compared


def adapt_statistics(
    registry_root: str | Path,
    model_name: str,
    version_ref: str,
    site: str,
    cells: Sequence[Path],
    *,
    val: Sequence[Sample] = (),
    target_model: str | None = None,
    seed: int = 0,
    force: bool = False,
    parity_root: Path | None = None,  # a data root to draw the ONNX parity cells from; else readable cells
    work_dir: str | Path = "var/adapt",
    progress: Callable[[int, int], None] | None = None,  # (cells read, cells to read), per batch
) -> StatisticsOutcome:
    import torch
    from PIL import UnidentifiedImageError

    from federation.publish import Publisher, find_parity_images
    from federation.task import load_image, predict_logits
    from federation.trunk import split_model
    from models.batchnorm import adapt_batchnorm
    from models.calibration import CalibrationSummary, calibrate
    from models.preprocess import finish, prepare

    start = load_parent(registry_root, model_name, version_ref, site, target_model)
    parent, contract, target, model, top = start.info, start.contract, start.target, start.model, start.top
    if len(cells) < MIN_CELLS:
        raise DataError(f"site {site}: {len(cells)} cell images; at least {MIN_CELLS} are needed to estimate "
                        "the statistics of a new hospital's cells")
    part = split_model(model, top).top  # the layers the federation trained (its forward runs only those)
    checkable = len(val) >= MIN_VAL_CELLS
    before = _metrics(predict_logits(model, val, contract), contract, contract.temperature) if checkable else None

    # Seeded order, so batches mix classes as the site's cells do; each batch goes through the frozen trunk
    # at once (the trained part's input), so memory stays at one batch of images.
    order = list(cells)
    random.Random(seed).shuffle(order)
    trunk = split_model(model, top) if top != "full" else None
    batches, pending, unreadable, readable = [], [], [], []
    for path in order:
        if len(readable) >= MAX_CELLS:
            break
        try:
            pending.append(finish(prepare(load_image(path), contract), contract))
        except (OSError, UnidentifiedImageError, ValueError):
            unreadable.append(Path(path).name)
            continue
        readable.append(Path(path))
        if len(pending) == BATCH:
            x = torch.from_numpy(np.stack(pending))
            batches.append(trunk.trunk_features(x) if trunk is not None else x)
            pending = []
            if progress is not None:
                progress(len(readable), min(len(order), MAX_CELLS))
    if len(readable) < MIN_CELLS:
        raise DataError(f"site {site}: {len(readable)} readable cell images ({len(unreadable)} unreadable); at "
                        f"least {MIN_CELLS} are needed")
    used = len(batches) * BATCH  # the short remainder is left out
    _, layers = adapt_batchnorm(part, batches)
    if layers == 0:
        raise ValueError(f"{contract.architecture}'s trained part ({top!r}) has no BatchNorm statistics to adapt")
    model.eval()

    outcome = StatisticsOutcome(parent, target, before, None, {}, [],  # type: ignore[arg-type]
                                cells=used, unreadable=unreadable, layers=layers,
                                training={**start.trained, "train_top": top, "augment": start.augment,
                                          "statistics_cells": used})
    adapted = contract
    calibration = None
    if checkable:
        logits, targets = predict_logits(model, val, contract)
        calibration = calibrate(CalibrationSummary.from_logits(logits, targets), contract.num_classes)
        adapted = contract.with_updates(temperature=calibration.temperature,
                                        abstain_threshold=calibration.abstain_threshold)
        outcome.after = _metrics((logits, targets), adapted, adapted.temperature)
        outcome.checked = True
        if outcome.after.balanced_accuracy < outcome.before.balanced_accuracy and not force:
            outcome.refused = (
                f"the adapted statistics do worse on {site}'s {len(val)} val cells than v{parent.version} "
                f"({outcome.after.balanced_accuracy:.3f} < {outcome.before.balanced_accuracy:.3f}); not registered "
                "(--force to keep it)")
            return outcome

    metadata: dict[str, Any] = {
        "source": "adapted-statistics",
        "adapted_from": {"model_name": parent.model_name, "version": parent.version, "sha256": parent.sha256},
        "site": site,
        "statistics": {"cells": used, "unreadable": len(unreadable), "layers": outcome.layers, "train_top": top,
                       "checked_on_val": outcome.checked},
        "training": outcome.training,
        "weight_source": parent.metadata.get("weight_source"),
    }
    if calibration is not None:
        metadata["calibration"] = calibration.as_dict()
        metadata["metrics"] = {"site_val_before": _summary(outcome.before), "site_val_after": _summary(outcome.after)}
    parity = find_parity_images(parity_root, contract) if parity_root else readable[:4]
    publisher = Publisher(registry_root=registry_root, model_name=target, contract=contract, model=model,
                          parity_images=parity, work_dir=work_dir)
    outcome.registered = publisher.publish(model.state_dict(), metadata, adapted).as_dict()
    return outcome


def image_files(folder: Path) -> list[Path]:
    """Every image file under `folder`, sorted (a site's export of cell crops, no manifest needed)."""
    from federation.datacheck import IMAGE_SUFFIXES

    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of cell images")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
