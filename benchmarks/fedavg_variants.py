"""FedAvg variants scored as the product serves them: what steadies the federated answer at a new hospital?

    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped,pooled-class-weights --tails 3
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped --tails 5 --rounds 20 --no-loso
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped,no-clean-view --tails 5
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped,fresh-augmentation --tails 5 --no-loso
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train pool-2,pool-4,pool-8,pool-16 --tails 5 --views-per-cell 16
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped --tails 5 --no-loso --product-temperature
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped --tails 5 --granule-weights 0,0.5,1 --product-temperature
    .venv/bin/python benchmarks/fedavg_variants.py --seeds 0,1,2 --train shipped --tails 5 --colour-weights 0,0.5,1,2 --product-temperature

FedAvg's Barcelona answer moves with the seed, with 24 training cells fewer and with more rounds, each
time trading eosinophils against lymphocytes (docs/results.md, "The site's reference"), while the
centralised model's does not (eosinophil recall 0.91 centralised, 0.70 federated). Two kinds of variant:

- training: `pooled-class-weights` has every site weigh its classes by the federation's pooled class
  counts (which the sites' size sums already send) instead of its own, so the sites' losses add up to
  the centralised loss; the shipped recipe balances each site's classes locally (capped at 3x), which
  weighs `jiangxi-tecom`'s 22 eosinophils 8x its neutrophils; `no-clean-view` never draws the clean
  cell from the cached views (the deployment's sites always augment; the benchmark draws it 1 time in 9);
  `fresh-augmentation` trains with the deployment's own ClientApp (a fresh augmented view every step, as
  a SuperNode does) instead of the finite pool of cached views;
- after training: the global model averaged over its last k rounds (uniform, in weight space: the
  server's own Polyak / SWA average; one exported graph), or the last k rounds' answers averaged (an
  ensemble: k graphs to serve), `--tails`.

Every variant is scored as the product serves it: the shipped arm (frozen trunk, texture augmentation),
the shipped test-time views (`--views`), the temperature fitted on the training sites' pooled val cells
(NLL grid, the same rule for every variant), the size opinion at weight 2 and the granule opinion at the
shipped 1 (`--granule-weights`) against each site's neutrophils (Barcelona's: the cells that variant's
network calls neutrophils). The choice is made by a
federated leave-one-site-out criterion that never sees Barcelona: FedAvg over two training sites, scored
on the third's train + val cells (clean view, size opinion as deployed there). The shipped arm's cached
features and views (var/benchmark) are reused.
"""

from __future__ import annotations

import argparse
import copy
from dataclasses import dataclass, replace
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from benchmarks.site_reference import located_diameters
from benchmarks.granule_prior import blues, fit_colour, fit_granules, granules, hue_spread
from benchmarks.size_prior import TEMPERATURES, _nll, combine_probs, fit, size_ll
from benchmarks.tta import fixed_view_features, shipped_arm
from federation.averaging import mean_of
from federation.benchmark.full import train_full_federated
from federation.benchmark.handlers import SiteFeatures
from federation.prepared import PreparedImages, cached_source
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import RowModel, fresh_split, train_federated
from federation.sites import EXTERNAL_SITE, DataRoot, resolve_data_root
from federation.task import set_prepared_source
from federation.trunk import TOPS
from models.calibration import expected_calibration_error, softmax
from models.evaluate import compute_metrics
from models.granule_prior import anchored_granule_reference, site_median
from models.size_prior import ANCHOR_CLASS, MIN_ANCHOR_CELLS, anchored_reference, site_reference
from models.test_views import VIEW_SETS

SIZE_WEIGHT = 2.0  # the shipped `size-weight`
REPORTED = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")


def averaged(model: RowModel, states: list[dict[str, np.ndarray]]) -> RowModel:
    """The model with the mean of these rounds' top states, averaged by the server's own code
    (`federation.averaging.mean_of`: float arrays averaged, counters the latest's)."""
    mean = mean_of([ArrayRecord({k: Array(v) for k, v in s.items()}) for s in states])
    out = copy.deepcopy(model)
    out.split.load_top_state({k: torch.as_tensor(a.numpy()) for k, a in mean.items()})
    return out


TRAINING = {"shipped": {}, "pooled-class-weights": {"pooled_class_weights": True}, "no-clean-view": {},
            "fresh-augmentation": {}}
FRESH_SETTINGS = {"augment": "texture", "clean-view-p": 1 / 9}  # the deployment's run config for these


def train_variant(b: "Bench", training: str, site_names: list[str], seed: int, cache: Path) -> RowModel:
    """FedAvg at these training sites, keeping every round's aggregate. `fresh-augmentation` runs the
    deployment's own ClientApp at every node (`federation.benchmark.full`: fresh augmentation every step,
    the trunk run on every view) instead of the cached views; its model is then scored on the same cached
    test-time views as every other variant (the top's weights are the whole difference)."""
    arm, d = b.arm, b.data
    recipe = replace(arm.recipe, **TRAINING.get(training, {}))
    if training != "fresh-augmentation":
        sites = training_sites(training, {s: d.sites[s] for s in site_names})
        return train_federated("fedavg", d.contract, arm.top, sites, recipe, seed, keep_rounds=True)
    set_prepared_source(cached_source(cache / "prepared"))  # cells located once, not in every message
    try:
        with tempfile.TemporaryDirectory() as work:
            full = train_full_federated("fedavg", d.contract, DataRoot(resolve_data_root(None)), site_names,
                                        recipe, seed, Path(work), train_top=arm.top, train_settings=FRESH_SETTINGS,
                                        keep_rounds=True)
    finally:
        set_prepared_source(None)
    split = fresh_split(d.contract, arm.top, seed)
    keys = split.top_state_keys()
    states = [{k: s[k] for k in keys} for s in full.round_states]
    split.load_top_state({k: torch.as_tensor(v) for k, v in states[-1].items()})
    return RowModel(split, full.seconds, full.curves, full.val_calibration, round_states=states)


def known_training(training: str) -> bool:
    return training in TRAINING or (training.startswith("pool-") and training[5:].isdigit())


def training_sites(training: str, sites: dict[str, SiteFeatures]) -> dict[str, SiteFeatures]:
    """`no-clean-view`: each epoch draws only among the 8 augmented views, never the clean cell (view 0),
    as the deployment's sites did before `clean-view-p` (fresh augmentation every step); the shipped
    benchmark draws the clean view one time in nine. `pool-K`: the clean cell and the first K augmented
    views of each cell (views are seeded per cell and view, so a smaller pool is a prefix of a larger one;
    K up to `--views-per-cell`)."""
    if training.startswith("pool-"):
        k = int(training[5:])
        if any(s.train_x.shape[1] < 1 + k for s in sites.values()):
            raise SystemExit(f"{training}: only {next(iter(sites.values())).train_x.shape[1] - 1} views cached "
                             "per cell; run with --views-per-cell K or more")
        return {name: replace(s, train_x=s.train_x[:, : 1 + k]) for name, s in sites.items()}
    if training != "no-clean-view":
        return sites
    return {name: replace(s, train_x=s.train_x[:, 1:]) for name, s in sites.items()}


def variants(model: RowModel, tails: list[int], training: str, ensembles: bool = True) -> dict[str, list[RowModel]]:
    """name -> the models whose mean softmax answers (one model unless it is an ensemble)."""
    states = model.round_states
    out = {f"{training}, last round": [model]}
    for k in tails:
        if 1 < k <= len(states):
            out[f"{training}, weights averaged over the last {k} rounds"] = [averaged(model, states[-k:])]
    for k in tails if ensembles else ():
        if 1 < k <= len(states):
            out[f"{training}, answers averaged over the last {k} rounds"] = [averaged(model, [s]) for s in states[-k:]]
    return out


def probabilities(models: list[RowModel], inputs: list[np.ndarray], t: float) -> np.ndarray:
    """Mean over models and views of softmax(logits / t): what an ensemble of served graphs answers."""
    return np.mean([softmax(m.logits(x), t) for m in models for x in inputs], axis=0)


def temperature(models: list[RowModel], val: list[tuple[np.ndarray, np.ndarray]]) -> float:
    y = np.concatenate([vy for _, vy in val])
    return min(TEMPERATURES, key=lambda t: _nll(probabilities(models, [np.concatenate([vx for vx, _ in val])], t), y))


def product_probabilities(models: list[RowModel], inputs: list[np.ndarray], t: float) -> np.ndarray:
    """What the product answers: the exported graph's log of the mean softmax over the test views, then the
    service's softmax at temperature t (models.test_views, service.inference); mean over models."""
    return np.mean([softmax(np.log(np.mean([softmax(m.logits(x), 1.0) for x in inputs], axis=0) + 1e-12), t)
                    for m in models], axis=0)


def product_temperature(models: list[RowModel], val_views: dict[str, tuple[list[np.ndarray], np.ndarray]]) -> float:
    """The deployment's rule: the NLL-best temperature of the sites' pooled val answers as served (views
    averaged inside the graph), where `temperature` fits the clean view and applies t to every view."""
    y = np.concatenate([vy for _, vy in val_views.values()])
    views = len(next(iter(val_views.values()))[0])
    x = [np.concatenate([vx[v] for vx, _ in val_views.values()]) for v in range(views)]
    return min(TEMPERATURES, key=lambda t: _nll(product_probabilities(models, x, t), y))


@dataclass
class Bench:
    """The shipped arm's data as every FedAvg variant is scored on it."""

    arm: object
    layout: object
    data: object
    classes: list[str]
    dia: np.ndarray  # located cell diameters, layout order
    r: np.ndarray  # log size relative to the training site's neutrophils (NaN elsewhere)
    d_every: np.ndarray  # every Barcelona cell's diameter (its reference as deployed)
    x_every: np.ndarray  # every Barcelona cell's clean-view trunk features
    views: dict[str, list[np.ndarray]]  # evaluation split -> trunk features per test-time view
    val_views: dict[str, tuple[list[np.ndarray], np.ndarray]] | None = None  # site -> its val cells' views, labels
    granules: np.ndarray | None = None  # the locator's granule density, layout order (NaN: not measured)
    g: np.ndarray | None = None  # ... relative to the training site's labelled neutrophils (NaN elsewhere)
    g_every: np.ndarray | None = None  # every Barcelona cell's granule density (its reference as deployed)
    granule_every_class: bool = False  # a granule Gaussian per class, not the shipped eosinophil/neutrophil pair
    blue: np.ndarray | None = None  # research: the cytoplasm's hue (`granule_prior.cytoplasm_blue`), layout order
    bl: np.ndarray | None = None  # ... against the training site's labelled neutrophils, over the site's spread
    b_every: np.ndarray | None = None  # every Barcelona cell's hue (its reference and spread as deployed)
    colour_classes: tuple[str, ...] = ()  # the classes with a hue Gaussian of their own


def prepare(cache: Path, view_set: str = "turns-zooms", rounds: int = 0, views_per_cell: int = 0,
            colour_classes: tuple[str, ...] = (), external_site: str = EXTERNAL_SITE, input_size: int = 0,
            top: str = "", arch: str = "") -> Bench:
    """Features, test-time views and sizes (cached under `cache`): a training site's sizes relative to its
    labelled neutrophils; a held-out or new site's relative to the cells the scored network calls
    neutrophils (what `wbc data site-scale` measures), computed per variant by the caller.
    `views_per_cell`: cache this many augmented views per training cell instead of the arm's 8.
    `external_site`: protocol 3, that site held out (its every cell, all classes, for its references).
    `input_size` > 0: the network's input at that size instead of the shipped 128 px (new features);
    `arch`: a larger EfficientNet-Lite instead of Lite0 (new features)."""
    arm, layout, d, trunk = shipped_arm(cache, views_per_cell, external_site, input_size, top, arch)
    if rounds:  # the longer preset (`wbc federate --rounds 20`)
        arm = replace(arm, recipe=replace(arm.recipe, rounds=rounds))
    classes = list(d.contract.class_names)
    y = layout.y
    anchor = classes.index(ANCHOR_CLASS)
    dia = located_diameters(layout.samples, cache)
    site_of = np.array([s.site for s in layout.samples])
    ref = {}
    for site in layout.train:
        own = np.array(layout.train[site])
        ok = np.isfinite(dia[own])
        anchors = dia[own][ok & (y[own] == anchor)]
        ref[site] = site_reference(anchors if len(anchors) >= MIN_ANCHOR_CELLS else dia[own][ok])
    r = np.full(len(dia), np.nan)
    for site, value in ref.items():
        r[site_of == site] = np.log(dia[site_of == site] / value)
    every = DataRoot(resolve_data_root(None)).select([external_site], ["train", "val", "test"])
    d_every = located_diameters(every, cache)
    x_every = next(iter(fixed_view_features(
        trunk, every, PreparedImages.build(every, d.contract, cache / "prepared"), d.contract,
        VIEW_SETS["none"], cache / "features").values()))
    views = {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, d.contract, cache / "prepared")
        views[name] = list(fixed_view_features(trunk, samples, prepared, d.contract, VIEW_SETS[view_set],
                                               cache / "features").values())
    val_views = {}
    for site, idx in layout.val.items():  # the training sites' val cells as the served graph sees them
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, d.contract, cache / "prepared")
        val_views[site] = (list(fixed_view_features(trunk, samples, prepared, d.contract, VIEW_SETS[view_set],
                                                    cache / "features").values()), y[idx])
    gran = granules(layout.samples, cache)  # the product's measure (models.cellcrop), cached by path
    g = np.full(len(gran), np.nan)
    for site in layout.train:
        own = np.array(layout.train[site])
        g[site_of == site] = gran[site_of == site] - site_median(gran[own], y[own] == anchor)
    blue = bl = b_every = None
    if colour_classes:  # the research hue, as `benchmarks/granule_prior.py --colour-scaled` scores it
        blue, b_every, bl = blues(layout.samples, cache), blues(every, cache), np.full(len(gran), np.nan)
        for site in layout.train:
            own = np.array(layout.train[site])
            here = site_of == site
            bl[here] = (blue[here] - site_median(blue[own], y[own] == anchor)) / hue_spread(blue[own])
    return Bench(arm, layout, d, classes, dia, r, d_every, x_every, views, val_views, gran, g,
                 granules(every, cache), blue=blue, bl=bl, b_every=b_every, colour_classes=colour_classes)


Scores = dict[tuple[str, str], list[float]]


def with_granules(b: Bench, p: np.ndarray, network: np.ndarray, fit_idx: list[int], idx, raw: np.ndarray,
                  weight: float) -> np.ndarray:
    """`p` with the granule opinion at `weight` (models.granule_prior), the Gaussians fitted on `fit_idx`,
    the cells `idx` measured against the median of the ones `network` calls neutrophils (`raw` over the
    same cells: a held-out or new site's reference, as `wbc data site-scale` measures it)."""
    if not weight:
        return p
    prior = fit_granules(b.g[fit_idx], b.layout.y[fit_idx], b.classes, b.granule_every_class)
    reference = anchored_granule_reference(raw, network, b.classes, ANCHOR_CLASS)
    return combine_probs(p, size_ll(b.granules[idx] - reference, prior), weight)


def with_colour(b: Bench, p: np.ndarray, network: np.ndarray, fit_idx: list[int], idx, raw: np.ndarray,
                weight: float) -> np.ndarray:
    """`p` with the research hue opinion at `weight`: the cells `idx` against the median of the ones `network`
    calls neutrophils among `raw` (their site's cells, unlabelled), over that site's spread."""
    if not weight:
        return p
    assert b.blue is not None and b.bl is not None
    prior = fit_colour(b.bl[fit_idx], b.layout.y[fit_idx], b.classes, list(b.colour_classes))
    called = network.argmax(axis=1) == b.classes.index(ANCHOR_CLASS)
    hue = (b.blue[idx] - site_median(raw, called)) / hue_spread(raw)
    return combine_probs(p, size_ll(hue, prior), weight)


def score_held_out(b: Bench, models: list[RowModel], held: str, name: str, scores: Scores,
                   granule_weight: float = 0.0, colour_weight: float = 0.0) -> None:
    """The federated leave-one-site-out criterion for one variant trained without `held`: its train + val
    cells, clean view, the size and granule opinions as deployed there (their references from the cells
    the network calls neutrophils), the temperature from the other sites' val cells."""
    layout, d, classes, y = b.layout, b.data, b.classes, b.layout.y
    rest = [s for s in layout.train if s != held]
    fit_idx = [i for s in rest for i in layout.train[s]]
    prior = fit(b.r[fit_idx], y[fit_idx], len(classes))
    h = d.sites[held]
    hx = np.concatenate([np.asarray(h.train_x[:, 0]), np.asarray(h.val_x)])
    h_idx = list(layout.train[held]) + list(layout.val[held])
    t = temperature(models, [(d.sites[s].val_x, d.sites[s].val_y) for s in rest])
    network = probabilities(models, [hx], t)
    r_held = np.log(b.dia[h_idx] / anchored_reference(b.dia[h_idx], network, classes, ANCHOR_CLASS))
    p = combine_probs(network, size_ll(r_held, prior), SIZE_WEIGHT)
    p = with_granules(b, p, network, fit_idx, h_idx, b.granules[h_idx], granule_weight)
    if colour_weight:
        p = with_colour(b, p, network, fit_idx, h_idx, b.blue[h_idx], colour_weight)
    scores.setdefault((name, "loso"), []).append(compute_metrics(classes, y[h_idx], p).balanced_accuracy)


def score_served(b: Bench, models: list[RowModel], name: str, scores: Scores, product: bool = False,
                 granule_weight: float = 0.0, colour_weight: float = 0.0, sites: list[str] | None = None) -> None:
    """Internal and Barcelona figures of one variant trained at all three sites, as the product serves it.
    `product`: the temperature fitted and applied exactly as the deployment does (`product_temperature`,
    `product_probabilities`) instead of the benchmark's rule (fitted on the clean view, applied per view).
    `sites`: the model was trained at these only (a single-site row): its opinions' Gaussians and its
    temperature come from their cells alone."""
    layout, classes, y = b.layout, b.classes, b.layout.y
    sites = sites or list(layout.train)
    fit_idx = [i for s in sites for i in layout.train[s]]
    prior = fit(b.r[fit_idx], y[fit_idx], len(classes))
    if product:
        assert b.val_views is not None
        t, answer = product_temperature(models, {s: b.val_views[s] for s in sites}), product_probabilities
    else:
        t, answer = temperature(models, [(b.data.sites[s].val_x, b.data.sites[s].val_y) for s in sites]), probabilities
    ext = layout.evaluation["external"]
    r = b.r.copy()
    every = answer(models, [b.x_every], t)
    r[ext] = np.log(b.dia[ext] / anchored_reference(b.d_every, every, classes, ANCHOR_CLASS))
    for split, idx in layout.evaluation.items():
        p = combine_probs(answer(models, b.views[split], t), size_ll(r[idx], prior), SIZE_WEIGHT)
        if split == "external":
            p = with_granules(b, p, every, fit_idx, idx, b.g_every, granule_weight)
            if colour_weight:
                p = with_colour(b, p, every, fit_idx, idx, b.b_every, colour_weight)
        else:  # a training site's own cells: against its labelled neutrophils, as it sent them
            prior_g = fit_granules(b.g[fit_idx], y[fit_idx], classes, b.granule_every_class)
            p = combine_probs(p, size_ll(b.g[idx], prior_g), granule_weight)
            if colour_weight:
                prior_b = fit_colour(b.bl[fit_idx], y[fit_idx], classes, list(b.colour_classes))
                p = combine_probs(p, size_ll(b.bl[idx], prior_b), colour_weight)
        m = compute_metrics(classes, y[idx], p)
        scores.setdefault((name, split), []).append(m.balanced_accuracy)
        if split == "external":
            scores.setdefault((name, "ece"), []).append(expected_calibration_error(p, y[idx]))
            for c in REPORTED:
                scores.setdefault((name, c), []).append(float(m.recall[classes.index(c)]))


def print_table(title: str, scores: Scores) -> None:
    names = list(dict.fromkeys(k[0] for k in scores))
    print(f"\n| {title} | federated LOSO | internal | Barcelona | Barcelona ECE | Barcelona recall "
          + " / ".join(c[:4] for c in REPORTED) + " |")
    print("|---|---|---|---|---|---|")
    for name in names:
        loso = _mean_sd(scores[name, "loso"]) if (name, "loso") in scores else "—"
        recall = " / ".join(f"{np.mean(scores[name, c]):.2f}" for c in REPORTED)
        print(f"| {name} | {loso} | {_mean_sd(scores[name, 'internal'])} | {_mean_sd(scores[name, 'external'])} | "
              f"{_mean_sd(scores[name, 'ece'])} | {recall} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--train", default="shipped,pooled-class-weights",
                    help="training variants, comma-separated: " + ", ".join(TRAINING) + ", pool-K")
    ap.add_argument("--tails", default="3", help="how many last rounds each averaged variant takes (1 = none)")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--views", default="turns-zooms", choices=("none", "turns-zooms"))
    ap.add_argument("--no-loso", action="store_true", help="skip the federated leave-one-site-out criterion")
    ap.add_argument("--rounds", type=int, default=0, help="train this many rounds instead of the shipped recipe's 5")
    ap.add_argument("--product-temperature", action="store_true",
                    help="also score every variant with the temperature fitted and applied as the deployment does")
    ap.add_argument("--granule-weights", default="1",
                    help="the granule opinion's weights to score each variant with (the shipped 1; 0 = off)")
    ap.add_argument("--granule-every-class", action="store_true",
                    help="a granule Gaussian for every class (the first version) instead of the shipped pair")
    ap.add_argument("--colour-weights", default="",
                    help="research: also the cytoplasm-hue opinion, site-scaled, at these weights "
                         "(benchmarks/granule_prior.py --colour-scaled), beside each granule weight")
    ap.add_argument("--colour-classes", default="basophil,monocyte",
                    help="the classes with a hue Gaussian of their own (the rest share the all-cells one)")
    ap.add_argument("--views-per-cell", type=int, default=0,
                    help="augmented views cached per training cell (default: the arm's 8); for pool-K with K > 8")
    ap.add_argument("--no-ensembles", action="store_true",
                    help="skip the answers-averaged rows (k graphs served; the slowest to score)")
    ap.add_argument("--input-size", type=int, default=0,
                    help="the network's input, pixels a side (default: the shipped 128); new cached features")
    ap.add_argument("--top", default="", choices=("", *TOPS),
                    help="what the sites train (federation.trunk; default: the shipped 'stage'); new cached features")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    tails = [int(k) for k in args.tails.split(",")]
    trainings = args.train.split(",")
    granule_weights = [float(w) for w in args.granule_weights.split(",")]
    colour_weights = [float(w) for w in args.colour_weights.split(",")] if args.colour_weights else []
    # the opinion weights every variant is scored with: (granule w, hue w)
    opinion_weights = [(g, c) for g in granule_weights for c in (colour_weights or [0.0])]

    def named(name: str, w: tuple[float, float]) -> str:
        parts = [f"granules w = {w[0]:g}"] if len(granule_weights) > 1 else []
        parts += [f"hue w = {w[1]:g}"] if colour_weights else []
        return ", ".join([name, *parts])

    if unknown := {t for t in trainings if not known_training(t)}:
        ap.error(f"unknown --train {sorted(unknown)}; known: {list(TRAINING)} and pool-K")
    t0 = time.time()
    colour_classes = tuple(args.colour_classes.split(",")) if colour_weights else ()
    b = replace(prepare(args.cache, args.views, args.rounds, args.views_per_cell, colour_classes,
                        input_size=args.input_size, top=args.top),
                granule_every_class=args.granule_every_class)
    layout = b.layout
    print(f"[{time.time() - t0:.0f} s] features, views and sizes ready", flush=True)

    scores: Scores = {}
    if not args.no_loso:
        for seed in seeds:
            for held, training in ((h, tr) for h in layout.train for tr in trainings):
                model = train_variant(b, training, [s for s in layout.train if s != held], seed, args.cache)
                for (name, models), w in ((v, w) for v in variants(model, tails, training, not args.no_ensembles).items()
                                          for w in opinion_weights):
                    score_held_out(b, models, held, named(name, w), scores, *w)
            print(f"[{time.time() - t0:.0f} s] LOSO seed {seed}: " + ", ".join(
                f"{k[0]} {np.mean(v[-3:]):.3f}" for k, v in scores.items() if k[1] == "loso"), flush=True)

    for seed, training in ((s, tr) for s in seeds for tr in trainings):
        model = train_variant(b, training, list(layout.train), seed, args.cache)
        for (plain, models), w in ((v, w) for v in variants(model, tails, training, not args.no_ensembles).items() for w in opinion_weights):
            name = named(plain, w)
            score_served(b, models, name, scores, granule_weight=w[0], colour_weight=w[1])
            if args.product_temperature:
                score_served(b, models, f"{name}, the product's temperature", scores, product=True,
                             granule_weight=w[0], colour_weight=w[1])
            print(f"[{time.time() - t0:.0f} s] seed {seed} {name}: internal {scores[name, 'internal'][-1]:.3f}, "
                  f"Barcelona {scores[name, 'external'][-1]:.3f}", flush=True)

    granule_note = f", granule w = {granule_weights[0]:g}" if len(granule_weights) == 1 else ""
    print_table(f"FedAvg, {args.views} views, size w = {SIZE_WEIGHT:g}{granule_note}", scores)
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
