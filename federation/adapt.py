"""A site adapts a registered federated version to its own cells (`wbc adapt`).

A new hospital's clinicians confirm cells on the review page anyway (`wbc review export` writes them as a
data root). Fine-tuning the federated model on ~20 confirmed cells per class took Barcelona from 0.674 to
0.913 balanced accuracy on its test cells, where joining FedAvg as a fourth site moved it to 0.699
(docs/results.md, "A new hospital with a few reviewed cells"). The adapted network is the site's own: it
loses 0.05-0.11 at the other hospitals, so it is registered under its own model name (default
`<model>-<site>`), never as the federation's production model, with lineage back to the version it
started from. Nothing leaves the site: this runs where its cells are.

Steps: the parent version's registered weights (`weights.safetensors`, checksum verified) → the same
trained top and augmentation as the federation's run → the site's `train` cells → temperature and
abstain threshold refitted on its `val` cells → registered only if its val balanced accuracy is not
below the parent's there (a worse model is refused unless forced) → ONNX export with the parity check.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from federation.sites import DataError
from federation.site_data import SiteData
from models.calibration import CalibrationSummary, calibrate
from models.evaluate import Metrics, compute_metrics
from models.contract import ModelContract
from models.registry import Registry, RegistryError, VersionInfo

MIN_VAL_CELLS = 10


@dataclass(frozen=True)
class AdaptSettings:
    epochs: int | None = None  # None: the parent's rounds x local epochs (as many passes as a site made)
    lr: float | None = None  # None: the parent run's
    batch_size: int | None = None
    seed: int = 0
    force: bool = False  # register even when the site's val balanced accuracy drops


@dataclass
class AdaptOutcome:
    parent: VersionInfo
    target_model: str
    before: Metrics
    after: Metrics
    train_counts: dict[str, int]
    missing_classes: list[str]
    registered: dict[str, Any] | None = None  # federation.publish.PublishOutcome.as_dict()
    refused: str | None = None
    training: dict[str, Any] = field(default_factory=dict)


def default_target_name(model_name: str, site: str) -> str:
    return f"{model_name}-{site}"


@dataclass(frozen=True)
class Parent:
    """A registered version to adapt: verified, its network loaded, the recipe it was trained with."""

    info: VersionInfo
    contract: ModelContract  # the parent's, without its name and version (the adapted one gets its own)
    model: Any  # torch module, eval mode, the version's weights
    target: str  # the model name the adapted version registers under
    trained: dict[str, Any]  # the recorded training settings
    top: str  # which part was trained: "stage", "head" or "full"
    augment: str


def load_parent(
    registry_root: str | Path, model_name: str, version_ref: str, site: str, target_model: str | None
) -> Parent:
    from safetensors.torch import load_file

    from federation.task import create_model_from_contract

    parent = Registry(registry_root, model_name).resolve(version_ref)
    parent.verify()
    weights = parent.verify_weights()
    contract = parent.contract.with_updates(model_name=None, version=None)
    target = target_model or default_target_name(model_name, site)
    if target == model_name:
        raise RegistryError("an adapted model is a site's own: register it under another model name")
    # The recipe: a federated version's run config, or (adapting an adapted version) its own record.
    run_config = (parent.metadata.get("flower") or {}).get("run_config") or {}
    trained = dict(parent.metadata.get("training") or {})
    top = str(trained.get("train_top") or run_config.get("train-top", "stage"))
    augment = str(trained.get("augment") or run_config.get("augment", "default"))
    model = create_model_from_contract(contract, pretrained=False)
    model.load_state_dict(load_file(str(weights)), strict=True)
    model.eval()
    return Parent(parent, contract, model, target, trained, top, augment)


def adapt_version(
    registry_root: str | Path,
    model_name: str,
    version_ref: str,
    site_data: SiteData,
    *,
    target_model: str | None = None,
    settings: AdaptSettings = AdaptSettings(),
    work_dir: str | Path = "var/adapt",
    progress: Callable[[int, int, float], None] | None = None,
) -> AdaptOutcome:
    from federation.augment import named_augmentation
    from federation.publish import Publisher, find_parity_images
    from federation.task import TrainConfig, predict_logits, train_local

    start = load_parent(registry_root, model_name, version_ref, site_data.site, target_model)
    parent, contract, target, model = start.info, start.contract, start.target, start.model
    trained, top, augment = start.trained, start.top, start.augment

    train, sources = site_data.select("train", contract.class_names)
    val, val_sources = site_data.select("val", contract.class_names)
    if not train:
        raise DataError(f"site {site_data.site}: no train cells of the model's classes in {_roots(site_data)}")
    if len(val) < MIN_VAL_CELLS:
        raise DataError(
            f"site {site_data.site}: {len(val)} val cells; at least {MIN_VAL_CELLS} are needed to check the "
            "adapted model against its parent and to refit its temperature (mark some reviewed cells val)"
        )
    counts = Counter(s.label for s in train)
    missing = [c for c in contract.class_names if counts[c] == 0]

    rounds_x_epochs = int(trained.get("num_server_rounds", 5)) * int(trained.get("local_epochs", 2))
    epochs = settings.epochs or int(trained.get("epochs") or rounds_x_epochs)
    config = TrainConfig(
        epochs=epochs,
        lr=settings.lr or float(trained.get("lr", 3e-3)),
        batch_size=settings.batch_size or int(trained.get("batch_size", 32)),
        seed=settings.seed,
    )

    before = _metrics(predict_logits(model, val, contract), contract, contract.temperature)
    train_local(model, train, contract, config, progress=progress, augment=named_augmentation(augment), top=top)
    model.eval()
    logits, targets = predict_logits(model, val, contract)
    calibration = calibrate(CalibrationSummary.from_logits(logits, targets), contract.num_classes)
    adapted = contract.with_updates(
        temperature=calibration.temperature, abstain_threshold=calibration.abstain_threshold
    )
    after = _metrics((logits, targets), adapted, adapted.temperature)
    training = {"epochs": config.epochs, "lr": config.lr, "batch_size": config.batch_size, "seed": config.seed,
                "train_top": top, "augment": augment}
    outcome = AdaptOutcome(parent, target, before, after, dict(counts), missing, training=training)
    if after.balanced_accuracy < before.balanced_accuracy and not settings.force:
        outcome.refused = (
            f"the adapted model is worse on {site_data.site}'s {len(val)} val cells than v{parent.version} "
            f"({after.balanced_accuracy:.3f} < {before.balanced_accuracy:.3f}); not registered (--force to keep it)"
        )
        return outcome

    metadata = {
        "source": "adapted",
        "adapted_from": {"model_name": parent.model_name, "version": parent.version, "sha256": parent.sha256},
        "site": site_data.site,
        "sites": {site_data.site: {"class_counts": dict(counts), "train_examples": len(train),
                                   "val_examples": len(val), "data_sources": sources,
                                   "val_sources": val_sources}},
        "training": training,
        "calibration": calibration.as_dict(),
        "metrics": {"site_val_before": _summary(before), "site_val_after": _summary(after)},
        "weight_source": parent.metadata.get("weight_source"),
    }
    publisher = Publisher(
        registry_root=registry_root,
        model_name=target,
        contract=contract,
        model=model,
        parity_images=find_parity_images(site_data.base_root, contract),
        work_dir=work_dir,
    )
    outcome.registered = publisher.publish(model.state_dict(), metadata, adapted).as_dict()
    return outcome


def _metrics(pair: tuple[np.ndarray, np.ndarray], contract, temperature: float) -> Metrics:
    from models.calibration import softmax

    logits, targets = pair
    return compute_metrics(contract.class_names, targets, softmax(logits, temperature))


def _summary(m: Metrics) -> dict[str, Any]:
    return {"n": m.n, "balanced_accuracy": m.balanced_accuracy, "macro_f1": m.macro_f1,
            "ece": m.extra.get("ece"), "recall": m.as_dict()["recall"]}


def _roots(site_data: SiteData) -> str:
    return ", ".join(str(r) for r in site_data.roots)
