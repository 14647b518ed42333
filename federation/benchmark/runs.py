"""One row of a benchmark table: a model trained single-site, centralised, or federated with a strategy.

Every row trains the same top of the same model with the same loop (`federation.task.fit`) and recipe;
they differ only in where the data is:
  - single-site / centralised: `train_top` on one site's / the pooled cached views, for as many epochs
    as a federated site makes in total (rounds x local epochs), so no row gets more passes over its data;
  - federated: Flower's `Strategy.start` with our strategy classes (`federation.strategies.make_strategy`,
    the deployment's aggregation code) over a `LocalGrid` whose nodes are `federation.benchmark.handlers`
    ClientApps, one per site, each holding only its own arrays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from federation.benchmark import handlers
from federation.benchmark.handlers import SiteFeatures, site_split
from federation.top_training import top_logits, train_top
from federation.benchmark.local_grid import LocalGrid
from federation.strategies import SiteReply, make_strategy
from federation.task import TrainConfig, create_model_from_contract, seed_everything
from federation.trunk import Split, split_model
from models.calibration import CalibrationSummary, pool
from models.contract import ModelContract
from models.evaluate import confusion_matrix


@dataclass(frozen=True)
class Recipe:
    """Training settings shared by every row (the deployment's run-config names in comments)."""

    rounds: int = 5  # num-server-rounds
    local_epochs: int = 2  # local-epochs
    lr: float = 3e-3  # lr
    batch_size: int = 32  # batch-size
    proximal_mu: float = 0.01  # proximal-mu (FedProx)
    server_lr: float = 0.01  # server-lr (FedOpt: FedAdam)
    label_smoothing: float = 0.1
    weight_decay: float = 1e-4
    class_balanced: bool = True
    class_weight_cap: float = 3.0
    logit_adjustment: float = 0.0
    frozen_bn_stats: bool = False
    average_tail: float = 0.0
    pooled_class_weights: bool = False  # federated rows: every site weighs classes by the pooled counts
    frozen_classifier: bool = False

    def train_config(self, epochs: int, seed: int, proximal_mu: float = 0.0) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            class_balanced=self.class_balanced,
            class_weight_cap=self.class_weight_cap,
            logit_adjustment=self.logit_adjustment,
            frozen_bn_stats=self.frozen_bn_stats,
            average_tail=self.average_tail,
            frozen_classifier=self.frozen_classifier,
            proximal_mu=proximal_mu,
            seed=seed,
        )

    def message_config(self) -> dict[str, float | int | bool]:
        """The loss settings the benchmark's site handlers read from the train config (the deployment's
        ClientApp uses TrainConfig's defaults, which are these defaults)."""
        return {
            "label-smoothing": self.label_smoothing,
            "weight-decay": self.weight_decay,
            "class-balanced": self.class_balanced,
            "class-weight-cap": self.class_weight_cap,
            "logit-adjustment": self.logit_adjustment,
            "frozen-bn-stats": self.frozen_bn_stats,
            "average-tail": self.average_tail,
            "frozen-classifier": self.frozen_classifier,
        }


@dataclass
class RowModel:
    """A trained model (its top state over the pretrained trunk) and how it was trained."""

    split: Split
    seconds: float
    curves: dict[str, list[float]] = field(default_factory=dict)  # site → val balanced accuracy per round
    val_calibration: CalibrationSummary | None = None  # pooled over the training sites' val splits
    messages: int = 0

    contract: ModelContract | None = None  # needed by full rows, whose inputs are images
    val_confusion: np.ndarray | None = None  # pooled over the training sites' val splits (model selection)
    round_states: list[dict[str, np.ndarray]] = field(default_factory=list)  # train_federated(keep_rounds=True)

    @property
    def val_balanced_accuracy(self) -> float | None:
        if self.val_confusion is None:
            return None
        support = self.val_confusion.sum(axis=1)
        present = support > 0
        return float((np.diag(self.val_confusion)[present] / support[present]).mean()) if present.any() else None

    def logits(self, inputs) -> np.ndarray:
        if self.split.top_name == "full":
            from federation.task import predict_logits

            assert self.contract is not None
            return predict_logits(self.split.model, list(inputs), self.contract, batch_size=64)[0]
        return top_logits(self.split, inputs)


def fresh_split(contract: ModelContract, top: str, seed: int, pretrained: bool = True) -> Split:
    """The (pretrained) model with a seeded new head, split; the same start for every row of a seed."""
    seed_everything(seed)
    split = split_model(create_model_from_contract(contract, pretrained=pretrained), top)
    split.freeze_trunk()
    return split


def train_pooled(
    contract: ModelContract,
    top: str,
    x: np.ndarray,
    y: np.ndarray,
    val: list[tuple[np.ndarray, np.ndarray]],
    recipe: Recipe,
    seed: int,
) -> RowModel:
    """Centralised (pooled sites) or single-site training: rounds x local_epochs epochs in one go."""
    t0 = time.time()
    split = fresh_split(contract, top, seed)
    train_top(
        split, x, y, contract.num_classes, recipe.train_config(recipe.rounds * recipe.local_epochs, seed)
    )
    calibration, confusion = validation_evidence(
        ((top_logits(split, vx), vy) for vx, vy in val if len(vy)), contract.num_classes
    )
    return RowModel(split, time.time() - t0, val_calibration=calibration, val_confusion=confusion)


def validation_evidence(
    pairs: Iterable[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> tuple[CalibrationSummary | None, np.ndarray | None]:
    """(logits, labels) of each training site's val split → pooled calibration summary and confusion."""
    summaries, confusion = [], None
    for logits, y in pairs:
        summaries.append(CalibrationSummary.from_logits(logits, y))
        cm = confusion_matrix(y, logits.argmax(1), num_classes)
        confusion = cm if confusion is None else confusion + cm
    return (pool(summaries) if summaries else None), confusion


class BenchObserver:
    """The strategies' observer (see `federation.strategies.RoundObserver`): records, never intervenes."""

    def __init__(self, keep_rounds: bool = False) -> None:
        self.keep_rounds = keep_rounds
        self.round_states: list[dict[str, np.ndarray]] = []  # each round's aggregate, when kept
        self.node_sites: dict[int, str] = {}
        self.curves: dict[str, list[float]] = {}
        self.last_calibration: dict[str, CalibrationSummary] = {}
        self.last_confusion: dict[str, np.ndarray] = {}
        self.failures: list[str] = []

    def start_weights(self, server_round: int, proposed: ArrayRecord) -> ArrayRecord:
        return proposed

    def record_replies(self, server_round: int, phase: str, replies: list[SiteReply]) -> None:
        for r in replies:
            if not r.ok:
                self.failures.append(f"round {server_round} {phase} {r.site}: {r.error}")
                continue
            if phase == "evaluate" and r.site:
                self.curves.setdefault(r.site, []).append(float(r.metrics["balanced-accuracy"]))
                self.last_calibration[r.site] = CalibrationSummary.from_record(r.metrics)
                flat = np.asarray(r.metrics["confusion"], dtype=np.int64)
                side = round(len(flat) ** 0.5)
                self.last_confusion[r.site] = flat.reshape(side, side)

    def pooled_confusion(self) -> np.ndarray | None:
        return sum(self.last_confusion.values()) if self.last_confusion else None  # type: ignore[return-value]

    def record_aggregate(self, server_round: int, arrays: ArrayRecord | None) -> None:
        if self.keep_rounds and arrays is not None:
            self.round_states.append({k: v.numpy().copy() for k, v in arrays.to_torch_state_dict().items()})

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        return None


def train_federated(
    strategy: str,
    contract: ModelContract,
    top: str,
    sites: dict[str, SiteFeatures],
    recipe: Recipe,
    seed: int,
    *,
    proximal_mu: float | None = None,
    server_lr: float | None = None,
    uniform_weights: bool = False,
    keep_rounds: bool = False,
) -> RowModel:
    """`uniform_weights`: every site weighs the same in the average (not by its number of cells);
    `keep_rounds`: the returned model carries every round's aggregate (`RowModel.round_states`)."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    t0 = time.time()
    split = fresh_split(contract, top, seed)
    initial = ArrayRecord(split.top_state())
    buffers = set(split.top_state_keys()) - {n for n, _ in split.model.named_parameters()}
    observer = BenchObserver(keep_rounds)
    mu = recipe.proximal_mu if proximal_mu is None else proximal_mu
    strat = make_strategy(
        strategy,
        min_nodes=len(sites),
        proximal_mu=mu,
        server_lr=recipe.server_lr if server_lr is None else server_lr,
        client_lr=recipe.lr,
        observer=observer,
        buffer_keys=buffers,
        uniform_weights=uniform_weights,
    )
    keys = {}
    for i, (site, data) in enumerate(sorted(sites.items())):
        key = f"{id(data)}-{site}"
        handlers.SITE_DATA[key] = data
        keys[1000 + i] = {"site": site, "bench-key": key}
    # The nodes' skeleton models must not share the server's parameters: site_split builds its own.
    site_split(contract, top)
    grid = LocalGrid({n: handlers.app for n in keys}, keys, {})
    contract_json = contract.to_json()
    train_config = ConfigRecord(
        {
            "contract": contract_json,
            "top": top,
            "local-epochs": recipe.local_epochs,
            "lr": recipe.lr,
            "batch-size": recipe.batch_size,
            "seed": seed,
            **recipe.message_config(),
        }
    )
    if recipe.pooled_class_weights:  # what the sites' size sums already tell the server: counts per class
        pooled = sum(np.bincount(s.train_y, minlength=contract.num_classes) for s in sites.values())
        train_config["class-counts"] = [float(c) for c in pooled]
    evaluate_config = ConfigRecord({"contract": contract_json, "top": top, "batch-size": recipe.batch_size})
    try:
        with grid:
            result = strat.start(
                grid=grid,
                initial_arrays=initial,
                num_rounds=recipe.rounds,
                timeout=3600,
                train_config=train_config,
                evaluate_config=evaluate_config,
                evaluate_fn=observer,
            )
    finally:
        for cfg in keys.values():
            handlers.SITE_DATA.pop(cfg["bench-key"], None)
    if observer.failures:
        raise RuntimeError("site failures: " + "; ".join(observer.failures[:3]))
    split.load_top_state({k: torch.as_tensor(v) for k, v in result.arrays.to_torch_state_dict().items()})
    calibration = pool(observer.last_calibration.values()) if observer.last_calibration else None
    return RowModel(
        split,
        time.time() - t0,
        observer.curves,
        calibration,
        grid.messages_sent,
        val_confusion=observer.pooled_confusion(),
        round_states=observer.round_states,
    )
