"""Full fine-tuning rows: every layer trained on images with fresh augmentation per step (no cache).

Single-site and centralised rows run `federation.task.train_local` on the pooled samples. Federated rows
run the deployment's own ClientApp (`federation.client_app.app`) at every node of a `LocalGrid`: the same
code that runs in a SuperNode, given a data root that holds only its site (`materialize_site`), driven
by Flower's `Strategy.start` with our strategy classes. Prepared cells come from the benchmark's disk
cache (`federation.task.set_prepared_source`), which changes no result, only the time spent locating
cells again in every message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord

from federation import client_app
from federation.benchmark.local_grid import LocalGrid
from federation.benchmark.runs import (
    BenchObserver,
    Recipe,
    RowModel,
    fresh_split,
    validation_evidence,
)
from federation.sites import DataRoot, Sample, materialize_site
from federation.strategies import make_strategy
from federation.task import TrainConfig, predict_logits, train_local
from models.calibration import pool
from models.contract import ModelContract


def train_full_pooled(
    contract: ModelContract,
    train: Sequence[Sample],
    val: Sequence[Sequence[Sample]],
    recipe: Recipe,
    seed: int,
    *,
    pretrained: bool = True,
) -> RowModel:
    t0 = time.time()
    split = fresh_split(contract, "full", seed, pretrained)
    config: TrainConfig = recipe.train_config(recipe.rounds * recipe.local_epochs, seed)
    train_local(split.model, train, contract, config)
    calibration, confusion = validation_evidence(
        (predict_logits(split.model, samples, contract) for samples in val if samples), contract.num_classes
    )
    return RowModel(
        split, time.time() - t0, val_calibration=calibration, contract=contract, val_confusion=confusion
    )


def train_full_federated(
    strategy: str,
    contract: ModelContract,
    data: DataRoot,
    sites: Sequence[str],
    recipe: Recipe,
    seed: int,
    workdir: Path,
    *,
    pretrained: bool = True,
    proximal_mu: float | None = None,
    server_lr: float | None = None,
    train_top: str = "full",
    train_settings: dict[str, str | float] | None = None,
    keep_rounds: bool = False,
) -> RowModel:
    """`train_settings`: more train-config entries for the ClientApp (e.g. "augment", "clean-view-p"), as a
    deployment's run config sends them; `keep_rounds`: the result carries every round's aggregate."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.time()
    split = fresh_split(contract, "full", seed, pretrained)
    state = split.model.state_dict()
    buffers = set(state) - {n for n, _ in split.model.named_parameters()}
    observer = BenchObserver(keep_rounds)
    strat = make_strategy(
        strategy,
        min_nodes=len(sites),
        proximal_mu=recipe.proximal_mu if proximal_mu is None else proximal_mu,
        server_lr=recipe.server_lr if server_lr is None else server_lr,
        client_lr=recipe.lr,
        observer=observer,
        buffer_keys=buffers,
    )
    nodes = {
        2000 + i: {"site": site, "data-root": str(materialize_site(data, site, workdir / site))}
        for i, site in enumerate(sorted(sites))
    }
    grid = LocalGrid({n: client_app.app for n in nodes}, nodes, {})
    contract_json = contract.to_json()
    train_config = ConfigRecord(
        {
            "contract": contract_json,
            "local-epochs": recipe.local_epochs,
            "train-top": train_top,
            "lr": recipe.lr,
            "batch-size": recipe.batch_size,
            "seed": seed,
            **(train_settings or {}),
        }
    )
    evaluate_config = ConfigRecord({"contract": contract_json, "batch-size": 64})
    with grid:
        result = strat.start(
            grid=grid,
            initial_arrays=ArrayRecord(state),
            num_rounds=recipe.rounds,
            timeout=3600,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=observer,
        )
    if observer.failures:
        raise RuntimeError("site failures: " + "; ".join(observer.failures[:3]))
    split.model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in result.arrays.to_torch_state_dict().items()}, strict=True
    )
    calibration = pool(observer.last_calibration.values()) if observer.last_calibration else None
    return RowModel(
        split,
        time.time() - t0,
        observer.curves,
        calibration,
        grid.messages_sent,
        contract,
        observer.pooled_confusion(),
        observer.round_states,
    )
