"""The benchmark protocols of docs/benchmark-protocol.md as functions that return result records.

    records = run_paper(data_root, arms, seeds=(0, 1, 2), strategies=PAPER_STRATEGIES, out=...)
    records = run_in_domain(data_root, arms, seeds=(0,), ...)

Protocol 1 ("paper"): sites tehran-lisc, jiangxi-tecom, bccd each train on their own `train` split and
validate on their own `val` split; internal test = their pooled `test` splits; external = barcelona-pbc
(five shared classes, all splits, never trained on, never used to choose anything). Rows: each site
alone, centralised (pooled), and federated with each strategy.
Protocol 2 ("in-domain"): barcelona-pbc `train` split cut into 4 simulated sites by a seeded
Dirichlet(0.5) label draw (val: the `val` split cut the same way), 8 classes, tested on its `test` split.

Each arm (backbone configuration) computes its frozen-trunk features once (clean view of every image,
plus K augmented views of every training image); every row of every seed then trains only the arm's top.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from federation.augment import AugmentConfig
from federation.features import trunk_features
from federation.benchmark.handlers import SiteFeatures
from federation.benchmark.partition import describe, dirichlet_partition
from federation.prepared import PreparedImages, cached_source
from federation.benchmark.runs import Recipe, RowModel, fresh_split, train_federated, train_pooled
from federation.sites import DEFAULT_TRAINING_SITES, EXTERNAL_SITE, DataRoot, Sample
from federation.style import amplitude, mean_amplitude
from federation.task import build_contract, set_prepared_source
from models.calibration import CalibrationSummary, expected_calibration_error, softmax
from models.contract import SHARED_CLASSES, CellCrop, ModelContract
from models.evaluate import compute_metrics

PAPER_STRATEGIES = ("fedavg", "fedmedian", "fedprox", "fedadam")
STRATEGY_LABELS = {
    "fedavg": "FedAvg",
    "fedmedian": "FedMedian",
    "fedprox": "FedProx",
    "fedadam": "FedOpt (FedAdam)",
    "fedyogi": "FedOpt (FedYogi)",
    "fedadagrad": "FedOpt (FedAdagrad)",
}
IN_DOMAIN_SITES = 4
IN_DOMAIN_ALPHA = 0.5


@dataclass(frozen=True)
class Arm:
    """One backbone configuration: contract preprocessing, what is trained, how many augmented views."""

    name: str
    architecture: str
    input_size: int
    top: str = "stage"
    views: int = 8
    color: str = "rgb"
    color_norm: str = "white-balance"
    cell_crop: float = 1.3
    detail: int | None = None  # contract low-pass (pixels a side), None: off
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    recipe: Recipe = field(default_factory=Recipe)
    pretrained: bool = True  # False: random init (ResNet-34: no offline ImageNet weights here)
    note: str = ""
    # Image arms cost ~10-20 min of CPU per row here: they may run a subset of the rows.
    strategies: tuple[str, ...] | None = None  # None: every strategy the command asks for
    single_site: bool = True
    # Where the amplitude spectra the views mix in (AugmentConfig.style_p) come from: "sites" = each
    # training site shares its mean amplitude (federation.style); "own cells" = each site mixes among the
    # amplitudes of its own training cells, nothing shared (FACT's within-domain amplitude mix).
    style_source: str = "sites"

    def contract(self, class_names: Sequence[str]) -> ModelContract:
        return build_contract(
            self.architecture,
            self.input_size,
            class_names=class_names,
            cell_crop=CellCrop(scale=self.cell_crop) if self.cell_crop else None,
            color=self.color,
            color_norm=self.color_norm,
            detail=self.detail,
        )

    def describe(self) -> dict[str, Any]:
        out = asdict(self)
        out["augment"] = "default" if self.augment == AugmentConfig() else asdict(self.augment)
        return out


@dataclass
class Layout:
    """Where each sample goes: training sites (train / val indices) and the evaluation sets."""

    samples: list[Sample]
    class_names: tuple[str, ...]
    train: dict[str, list[int]]  # site → indices
    val: dict[str, list[int]]
    evaluation: dict[str, list[int]]  # "internal" / "external" / "test" → indices

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.class_names)}
        return np.array([index[s.label] for s in self.samples], dtype=np.int64)


PROTOCOL_SITES = (*DEFAULT_TRAINING_SITES, EXTERNAL_SITE)  # the four sites of protocol 3, each held out in turn


def paper_layout(data: DataRoot, external_per_class: int = 0, external_site: str = EXTERNAL_SITE) -> Layout:
    """Protocol 1: the three training sites' train / val splits, their test splits as the internal set and
    every cell of Barcelona (five classes) as the external one. `external_site`: protocol 3 (leave one site
    out), the other three of the four sites train. `external_per_class` > 0: a seeded subsample of the
    external site per class (research runs only)."""
    if external_site not in PROTOCOL_SITES:
        raise ValueError(f"external site {external_site!r} is not one of {PROTOCOL_SITES}")
    training = tuple(s for s in PROTOCOL_SITES if s != external_site)
    external = data.select([external_site], classes=SHARED_CLASSES)
    if external_per_class:
        rng = np.random.default_rng(0)
        keep: set[int] = set()
        for c in SHARED_CLASSES:
            idx = [i for i, s in enumerate(external) if s.label == c]
            keep |= set(rng.choice(idx, min(len(idx), external_per_class), replace=False).tolist())
        external = [s for i, s in enumerate(external) if i in keep]
    samples = data.select(training, classes=SHARED_CLASSES) + external
    where = lambda site, split: [
        i for i, s in enumerate(samples) if s.site == site and (split is None or s.split == split)
    ]
    return Layout(
        samples,
        SHARED_CLASSES,
        train={site: where(site, "train") for site in training},
        val={site: where(site, "val") for site in training},
        evaluation={
            "internal": [i for site in training for i in where(site, "test")],
            "external": where(external_site, None),
        },
    )


def in_domain_layout(data: DataRoot, seed: int) -> tuple[Layout, dict[str, Any]]:
    samples = data.select([EXTERNAL_SITE])
    classes = tuple(sorted({s.label for s in samples}))
    train = [i for i, s in enumerate(samples) if s.split == "train"]
    val = [i for i, s in enumerate(samples) if s.split == "val"]
    parts_train = dirichlet_partition([samples[i] for i in train], IN_DOMAIN_SITES, IN_DOMAIN_ALPHA, seed)
    # The val split is cut with the same class shares per site, so each site validates on what it has.
    parts_val = _same_shares([samples[i] for i in train], parts_train, [samples[i] for i in val], seed)
    names = [f"pbc-site-{k + 1}" for k in range(IN_DOMAIN_SITES)]
    split = Layout(
        samples,
        classes,
        train={n: [train[j] for j in p] for n, p in zip(names, parts_train)},
        val={n: [val[j] for j in p] for n, p in zip(names, parts_val)},
        evaluation={"test": [i for i, s in enumerate(samples) if s.split == "test"]},
    )
    partition = {
        "alpha": IN_DOMAIN_ALPHA,
        "seed": seed,
        "train_counts": dict(zip(names, describe([samples[i] for i in train], parts_train))),
        "val_counts": dict(zip(names, describe([samples[i] for i in val], parts_val))),
        "train_files": {n: [samples[i].path.name for i in split.train[n]] for n in names},
    }
    return split, partition


def _same_shares(
    train: Sequence[Sample], parts: Sequence[Sequence[int]], val: Sequence[Sample], seed: int
) -> list[list[int]]:
    rng = np.random.default_rng([seed, 7])
    out: list[list[int]] = [[] for _ in parts]
    for label in sorted({s.label for s in val}):
        counts = np.array([sum(train[i].label == label for i in p) for p in parts], dtype=np.float64)
        shares = counts / counts.sum() if counts.sum() else np.full(len(parts), 1.0 / len(parts))
        idx = rng.permutation([i for i, s in enumerate(val) if s.label == label])
        cuts = (np.cumsum(shares) * len(idx)).round().astype(int)[:-1]
        for site, chunk in enumerate(np.split(idx, cuts)):
            out[site].extend(int(i) for i in chunk)
    return [sorted(p) for p in out]


# ---- features ---------------------------------------------------------------------------------------
@dataclass
class ArmData:
    contract: ModelContract
    sites: dict[str, SiteFeatures]  # empty for full (image) arms
    evaluation: dict[str, tuple[Any, np.ndarray]]  # name → (clean features, or samples for full arms; labels)
    seconds: float
    layout: Layout | None = None  # full arms train on the layout's images
    data: DataRoot | None = None
    workdir: Path | None = None


def arm_features(
    arm: Arm, split: Layout, cache: Path, log: Callable[[str], None] = print, data: DataRoot | None = None
) -> ArmData:
    t0 = time.time()
    contract = arm.contract(split.class_names)
    y = split.y
    if arm.top == "full":  # images, not features: only the prepared cells are cached
        set_prepared_source(cached_source(cache / "prepared"))
        evaluation = {
            name: ([split.samples[i] for i in idx], y[idx]) for name, idx in split.evaluation.items()
        }
        return ArmData(contract, {}, evaluation, time.time() - t0, split, data, cache / "sites")
    prepared = PreparedImages.build(split.samples, contract, cache / "prepared", log=log)
    model = fresh_split(contract, arm.top, seed=0)  # the trunk is pretrained and frozen: seed-free

    def feats(indices: list[int], views: int, styles: Sequence[np.ndarray] = ()) -> np.ndarray:
        return trunk_features(
            model,
            [split.samples[i] for i in indices],
            prepared.subset(indices),
            contract,
            views=views,
            augment=arm.augment if views else None,
            seed=0,
            cache_dir=cache / "features",
            log=log,
            styles=styles,
        )

    if arm.style_source not in ("sites", "own cells"):
        raise ValueError(f"style_source {arm.style_source!r} is not one of 'sites', 'own cells'")
    train_x: dict[str, np.ndarray] = {}
    if arm.augment.style_p > 0 and arm.style_source == "own cells":
        # Each site mixes among its own training cells' amplitudes (a cell's texture and sharpness handed to
        # cells of other classes at the same site), so its views are computed site by site.
        for site, idx in split.train.items():
            sub = prepared.subset(list(idx))
            bank = [amplitude(sub.image(k), contract.input_size) for k in range(len(sub))]
            train_x[site] = feats(list(idx), arm.views, bank)
            log(f"{arm.name}: {site} mixes among its own {len(bank)} cells' amplitudes")
    else:
        train_idx = sorted(i for idx in split.train.values() for i in idx)
        styles: list[np.ndarray] = []
        if arm.augment.style_p > 0:  # each training site shares its mean amplitude (federation.style)
            for idx in split.train.values():
                sub = prepared.subset(list(idx))
                styles.append(mean_amplitude((sub.image(k) for k in range(len(sub))), contract.input_size))
            log(f"{arm.name}: styles of {len(styles)} training sites shared")
        train_all = feats(train_idx, arm.views, styles)
        position = {i: k for k, i in enumerate(train_idx)}
        train_x = {site: train_all[[position[i] for i in idx]] for site, idx in split.train.items()}
    other_idx = sorted(
        {i for idx in split.val.values() for i in idx} | {i for v in split.evaluation.values() for i in v}
    )
    clean_all = feats(other_idx, 0)[:, 0]
    where = {i: k for k, i in enumerate(other_idx)}
    sites = {
        site: SiteFeatures(
            site,
            train_x[site],
            y[split.train[site]],
            clean_all[[where[i] for i in split.val[site]]],
            y[split.val[site]],
        )
        for site in split.train
    }
    evaluation = {
        name: (clean_all[[where[i] for i in idx]], y[idx]) for name, idx in split.evaluation.items()
    }
    return ArmData(contract, sites, evaluation, time.time() - t0, split, data)


# ---- rows ---------------------------------------------------------------------------------------------
def evaluate_row(
    kind: str,
    name: str,
    arm: Arm,
    seed: int,
    data: ArmData,
    model: RowModel,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # The temperature fitted on the training sites' val (temperature-rule "fitted", the default) and the
    # "soften-only" rule's max(1, T) (models.calibration.calibrate), each with its ECE.
    temperature = model.val_calibration.best_temperature() if model.val_calibration else 1.0
    softened = max(1.0, temperature)
    record: dict[str, Any] = {
        "arm": arm.name,
        "kind": kind,
        "row": name,
        "seed": seed,
        "seconds": round(model.seconds, 2),
        "temperature": temperature,
        "val_balanced_accuracy": model.val_balanced_accuracy,
        "curves": model.curves,
        "messages": model.messages,
        **(extra or {}),
    }
    for eval_name, (x, y) in data.evaluation.items():
        logits = model.logits(x)
        m = compute_metrics(data.contract.class_names, y, softmax(logits))
        record[eval_name] = {
            "balanced_accuracy": m.balanced_accuracy,
            "macro_f1": m.macro_f1,
            "accuracy": m.accuracy,
            "recall": m.as_dict()["recall"],
            "confusion": m.confusion.tolist(),
            "ece": expected_calibration_error(softmax(logits), y),
            "ece_calibrated": expected_calibration_error(softmax(logits, temperature), y),
            "ece_soften_only": expected_calibration_error(softmax(logits, softened), y),
            "nll": CalibrationSummary.from_logits(logits, y, (1.0, temperature)).nll(1.0),
            "nll_calibrated": CalibrationSummary.from_logits(logits, y, (1.0, temperature)).nll(temperature),
            "n": len(y),
        }
    return record


def run_rows(
    arm: Arm,
    data: ArmData,
    seed: int,
    strategies: Sequence[str],
    *,
    single_site: bool = True,
    centralised: bool = True,
    strategy_params: dict[str, dict[str, float]] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    trainers = _FullTrainers(arm, data) if arm.top == "full" else _TopTrainers(arm, data)
    # CPU seconds beside wall seconds: other work on a shared machine stretches the wall clock only.
    if single_site:
        for site in trainers.site_names:
            c0 = time.process_time()
            model = trainers.pooled([site], seed)
            cpu = {"cpu_seconds": round(time.process_time() - c0, 1)}
            rows.append(evaluate_row("single-site", site, arm, seed, data, model, cpu))
            log(_line(rows[-1]))
    if centralised:
        c0 = time.process_time()
        model = trainers.pooled(trainers.site_names, seed)
        cpu = {"cpu_seconds": round(time.process_time() - c0, 1)}
        rows.append(evaluate_row("centralised", "centralised", arm, seed, data, model, cpu))
        log(_line(rows[-1]))
    for strategy in strategies:
        params = (strategy_params or {}).get(strategy, {})
        c0 = time.process_time()
        model = trainers.federated(strategy, seed, params)
        extra = {"strategy": strategy, **params, "cpu_seconds": round(time.process_time() - c0, 1)}
        label = STRATEGY_LABELS.get(strategy, strategy)
        rows.append(evaluate_row("federated", label, arm, seed, data, model, extra))
        log(_line(rows[-1]))
    return rows


class _TopTrainers:
    """Rows of a cached-feature arm: the top trained on the sites' cached views."""

    def __init__(self, arm: Arm, data: ArmData):
        self.arm, self.data = arm, data
        self.site_names = list(data.sites)

    def pooled(self, sites: Sequence[str], seed: int) -> RowModel:
        d = [self.data.sites[s] for s in sites]
        x = np.concatenate([s.train_x for s in d]) if len(d) > 1 else d[0].train_x
        y = np.concatenate([s.train_y for s in d])
        val = [(s.val_x, s.val_y) for s in d]
        return train_pooled(self.data.contract, self.arm.top, x, y, val, self.arm.recipe, seed)

    def federated(self, strategy: str, seed: int, params: dict[str, float]) -> RowModel:
        return train_federated(
            strategy, self.data.contract, self.arm.top, self.data.sites, self.arm.recipe, seed, **params
        )


class _FullTrainers:
    """Rows of an image arm: every layer trained on images (the federated rows run the real ClientApp)."""

    def __init__(self, arm: Arm, data: ArmData):
        assert data.layout is not None and data.data is not None and data.workdir is not None
        self.arm, self.data, self.layout = arm, data, data.layout
        self.site_names = list(self.layout.train)
        self.pretrained = arm.pretrained

    def pooled(self, sites: Sequence[str], seed: int) -> RowModel:
        from federation.benchmark.full import train_full_pooled

        samples = self.layout.samples
        train = [samples[i] for s in sites for i in self.layout.train[s]]
        val = [[samples[i] for i in self.layout.val[s]] for s in sites]
        return train_full_pooled(
            self.data.contract, train, val, self.arm.recipe, seed, pretrained=self.pretrained
        )

    def federated(self, strategy: str, seed: int, params: dict[str, float]) -> RowModel:
        from federation.benchmark.full import train_full_federated

        assert self.data.data is not None and self.data.workdir is not None
        return train_full_federated(
            strategy, self.data.contract, self.data.data, self.site_names, self.arm.recipe, seed,
            self.data.workdir, pretrained=self.pretrained, **params,
        )  # fmt: skip


def _line(row: dict[str, Any]) -> str:
    parts = [f"{row['arm']} seed {row['seed']} {row['row']:<18}"]
    for key in ("internal", "external", "test"):
        if key in row:
            parts.append(f"{key} {row[key]['balanced_accuracy']:.3f}")
    parts.append(f"T={row['temperature']:.2f} {row['seconds']:.1f} s ({row.get('cpu_seconds', 0):.0f} s CPU)")
    return "  ".join(parts)


def leave_one_site_out(arm: Arm, data: ArmData, seed: int) -> dict[str, float]:
    """Model-selection criterion that never looks at the external site: for each training site, train
    centrally on the other two and test on the held-out site's train (clean view) + val cells.

    Also the calibration rules a new hospital would get, judged on the held-out sites: ECE of the raw
    model (T = 1), with the temperature fitted on the two training sites' val splits (T_val), and with
    that temperature never below 1 (T = max(1, T_val): only ever soften).
    """
    scores: dict[str, float] = {}
    held_logits, held_y, temps = [], [], []
    for held in data.sites:
        rest = [d for s, d in data.sites.items() if s != held]
        x = np.concatenate([d.train_x for d in rest])
        y = np.concatenate([d.train_y for d in rest])
        model = train_pooled(data.contract, arm.top, x, y, [(d.val_x, d.val_y) for d in rest], arm.recipe, seed)
        h = data.sites[held]
        hx = np.concatenate([np.asarray(h.train_x[:, 0]), np.asarray(h.val_x)])
        hy = np.concatenate([h.train_y, h.val_y])
        logits = model.logits(hx)
        scores[held] = compute_metrics(data.contract.class_names, hy, softmax(logits)).balanced_accuracy
        t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
        held_logits.append(logits)
        held_y.append(hy)
        temps.append(t)
    scores["mean"] = float(np.mean([scores[s] for s in data.sites]))
    for rule, pick in (("ece_t1", lambda t: 1.0), ("ece_tval", lambda t: t), ("ece_tmax1", lambda t: max(1.0, t))):
        scores[rule] = float(
            np.mean([expected_calibration_error(softmax(lg, pick(t)), y) for lg, y, t in zip(held_logits, held_y, temps)])
        )
    return scores
