"""A cell's relative size as a second, federated opinion: does it fix the new hospital's lymphocytes?

    .venv/bin/python benchmarks/size_prior.py --seeds 0,1,2
    .venv/bin/python benchmarks/size_prior.py --seeds 0,1,2 --external-reference all-classes --views turns-zooms --single
    .venv/bin/python benchmarks/size_prior.py --seeds 0,1,2 --external-reference neutrophils --views turns-zooms --single
    .venv/bin/python benchmarks/size_prior.py --seeds 0,1,2 --external-reference neutrophils --views turns-zooms --rounds 20

The shipped crop frames every cell at 1.3 x its own diameter, so the network cannot see size; yet a
site's lymphocytes are 0.78-0.90 and its basophils 1.07-1.13 of the site's median cell, at
`tehran-lisc` and at Barcelona alike (`benchmarks/site_scale.py` measures both; framing by the site's
median instead gave the frozen trunk no gain). Here size enters beside the network, naive-Bayes style:

    log p(class | cell) = log softmax(logits / T) + w * log N(log(d / d_site) | mu_class, sigma_class)

d = the locator's diameter (`models.cellcrop.locate_cell`), d_site = the site's median over its own
cells (labels unused; one number per site, Barcelona's from its five-class cells), mu / sigma per class
from the training sites' train cells: a federation needs only per-class count, sum and sum of squares
from each site (exactly what pooling gives). T: the row's temperature fitted on the sites' validation
cells. The weight w is chosen by the leave-one-site-out criterion (fit on two sites, score the third),
never by Barcelona. The shipped arm's cached features (var/benchmark) are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from benchmarks.tta import shipped_arm
from federation.benchmark.protocols import _TopTrainers
from federation.benchmark.report import _mean_sd
from federation.sites import DataRoot, resolve_data_root
from models.calibration import expected_calibration_error, softmax
from models.cellcrop import locate_cell
from models.contract import SizePrior
from models.evaluate import compute_metrics
from models.size_prior import (
    ANCHOR_CLASS,
    MIN_ANCHOR_CELLS,
    SizeStatistics,
    anchored_reference,
    fit_prior,
    log_likelihood,
    site_reference,
)
from models.preprocess import to_rgb

TEMPERATURES = tuple(float(t) for t in np.round(np.exp(np.linspace(np.log(0.2), np.log(5.0), 41)), 4))
WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None))))


def diameters(samples, cache: Path) -> np.ndarray:
    path = cache / "diameters.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = [s for s in samples if str(s.path) not in known]
    for s in missing:
        with Image.open(s.path) as img:
            known[str(s.path)] = locate_cell(to_rgb(img))[2]
    if missing:
        path.write_text(json.dumps(known))
    return np.array([known[str(s.path)] for s in samples])


def relative_log_size(samples, d: np.ndarray, ref: dict[str, float] | None = None) -> np.ndarray:
    sites = np.array([s.site for s in samples])
    ref = {site: float(np.median(d[sites == site])) for site in set(sites)} | (ref or {})
    return np.log(d / np.array([ref[s] for s in sites]))


def fit(r: np.ndarray, y: np.ndarray, n_classes: int) -> SizePrior:
    """The product's Gaussians (models.size_prior.fit_prior) from these cells' relative log sizes."""
    r, y = r[np.isfinite(r)], y[np.isfinite(r)]
    stats = SizeStatistics(np.bincount(y, minlength=n_classes).astype(np.float64),
                           np.bincount(y, r, n_classes), np.bincount(y, r * r, n_classes))
    return fit_prior([stats], weight=1.0)


def size_ll(r: np.ndarray, prior: SizePrior) -> np.ndarray:
    """Gaussian log-likelihoods; 0 (no opinion) for a cell without a located size, as the product does."""
    ll = log_likelihood(np.nan_to_num(r, nan=0.0), prior)
    ll[~np.isfinite(r)] = 0.0
    return ll


def combine(logits: np.ndarray, t: float, ll: np.ndarray, w: float) -> np.ndarray:
    return combine_probs(softmax(logits, t), ll, w)


def combine_probs(p: np.ndarray, ll: np.ndarray, w: float) -> np.ndarray:
    z = np.log(p + 1e-12) + w * ll
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p / p.sum(axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--views", default="none", choices=("none", "turns-zooms"),
                    help="score with the contract's test-time views (what the exported graph averages) too")
    ap.add_argument("--single", action="store_true",
                    help="also each training site alone, its size Gaussians from its own cells only")
    ap.add_argument("--external-reference", choices=("five-classes", "all-classes", "neutrophils"),
                    default="five-classes",
                    help="Barcelona's median cell from its cells of the five shared classes, or from all its "
                         "cells; or, as the product now does, every site's neutrophils: a training site's "
                         "labelled ones, a held-out or new site's the ones the row's network calls so (over "
                         "all of Barcelona's images, picked by the clean view)")
    ap.add_argument("--rounds", type=int, default=0,
                    help="train every row this many rounds (x local epochs) instead of the shipped recipe's 5")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    data_root = DataRoot(resolve_data_root(None))
    arm, layout, d, trunk = shipped_arm(args.cache)
    classes = list(d.contract.class_names)
    n = len(classes)
    ref = None
    if args.external_reference == "all-classes":  # what a deployment sees: every cell type, platelets too
        every = data_root.select(["barcelona-pbc"], ["train", "val", "test"])
        ref = {"barcelona-pbc": float(np.median(diameters(every, args.cache)))}
        print(f"Barcelona's reference from all {len(every)} of its cells (8 classes): {ref['barcelona-pbc']:.1f} px")
    y = layout.y
    anchored = args.external_reference == "neutrophils"
    if anchored:  # the product's located diameters (NaN where no nucleus was found: no size opinion)
        from benchmarks.site_reference import located_diameters

        dia = located_diameters(layout.samples, args.cache)
        site_of = np.array([s.site for s in layout.samples])
        ref = {"barcelona-pbc": np.nan}  # per row: the cells its network calls neutrophils
        for site in layout.train:
            own = np.array(layout.train[site])
            ok = np.isfinite(dia[own])
            anchors = dia[own][ok & (y[own] == classes.index(ANCHOR_CLASS))]
            ref[site] = site_reference(anchors if len(anchors) >= MIN_ANCHOR_CELLS else dia[own][ok])
        r = np.log(dia / np.array([ref[s] for s in site_of]))
        every = data_root.select(["barcelona-pbc"], ["train", "val", "test"])
        d_every = located_diameters(every, args.cache)
        from benchmarks.tta import fixed_view_features
        from federation.prepared import PreparedImages
        from models.test_views import VIEW_SETS

        x_every = next(iter(fixed_view_features(
            trunk, every,
            PreparedImages.build(every, d.contract, args.cache / "prepared"), d.contract, VIEW_SETS["none"],
            args.cache / "features").values()))
    else:
        r = relative_log_size(layout.samples, diameters(layout.samples, args.cache), ref)
    print(f"[{time.time() - t0:.0f} s] features and sizes ready", flush=True)
    for site in layout.train:
        idx = layout.train[site]
        print(site, {c: round(float(np.exp(np.nanmedian(r[idx][y[idx] == k]))), 2)
                     for k, c in enumerate(classes) if (y[idx] == k).any()})
    ext = layout.evaluation["external"]
    if not anchored:
        print("barcelona-pbc", {c: round(float(np.exp(np.median(r[ext][y[ext] == k]))), 2) for k, c in enumerate(classes)})
    if args.rounds:  # the longer preset (`wbc federate --rounds 20`)
        arm = replace(arm, recipe=replace(arm.recipe, rounds=args.rounds))
    trainers = _TopTrainers(arm, d)

    # Leave one training site out: the CNN and the size prior both fitted on the other two sites.
    loso: dict[float, list[float]] = {w: [] for w in WEIGHTS}
    for seed in seeds:
        for held in layout.train:
            rest = [s for s in layout.train if s != held]
            model = trainers.pooled(rest, seed)
            t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
            fit_idx = [i for s in rest for i in layout.train[s]]
            prior = fit(r[fit_idx], y[fit_idx], n)
            h = d.sites[held]
            hx = np.concatenate([np.asarray(h.train_x[:, 0]), np.asarray(h.val_x)])
            h_idx = list(layout.train[held]) + list(layout.val[held])
            logits = model.logits(hx)
            r_held = r[h_idx]
            if anchored:  # a held-out site has no labels: its neutrophils are the ones this network calls so
                r_held = np.log(dia[h_idx] / anchored_reference(dia[h_idx], softmax(logits, t), classes, ANCHOR_CLASS))
            ll = size_ll(r_held, prior)
            for w in WEIGHTS:
                loso[w].append(compute_metrics(classes, y[h_idx], combine(logits, t, ll, w)).balanced_accuracy)
        print(f"[{time.time() - t0:.0f} s] LOSO seed {seed}: " + ", ".join(
            f"w={w}: {np.mean(v[-3:]):.3f}" for w, v in loso.items()), flush=True)
    print("LOSO mean over seeds and held-out sites: " + ", ".join(f"w={w}: {np.mean(v):.3f}" for w, v in loso.items()))

    views = None
    if args.views != "none":  # the trunk outputs of each fixed view, cached beside the training views
        from benchmarks.tta import fixed_view_features
        from federation.prepared import PreparedImages
        from models.test_views import VIEW_SETS

        views = {}
        for name, idx in layout.evaluation.items():
            samples = [layout.samples[i] for i in idx]
            prepared = PreparedImages.build(samples, d.contract, args.cache / "prepared")
            views[name] = fixed_view_features(trunk, samples, prepared, d.contract, VIEW_SETS[args.views],
                                              args.cache / "features")
        print(f"[{time.time() - t0:.0f} s] {args.views} views ready", flush=True)

    def network_logits(model, name, x):
        """What the served graph answers before the temperature: logits, or log mean softmax over views."""
        if views is None:
            return model.logits(x)
        mean = np.mean([softmax(model.logits(f)) for f in views[name].values()], axis=0)
        return np.log(np.clip(mean, 1e-12, None))

    fit_idx = [i for s in layout.train for i in layout.train[s]]
    pooled = fit(r[fit_idx], y[fit_idx], n)
    print("prior (relative size): " + ", ".join(
        f"{c} {np.exp(m):.2f} x/ {np.exp(s):.2f}" for c, m, s in zip(classes, pooled.mean, pooled.sd)))
    scores: dict[tuple, list[float]] = {}
    rows = ["centralised", "FedAvg"] + ([f"{s} alone" for s in layout.train] if args.single else [])
    for seed in seeds:
        models = {"centralised": trainers.pooled(list(layout.train), seed),
                  "FedAvg": trainers.federated("fedavg", seed, {})}
        if args.single:
            models |= {f"{s} alone": trainers.pooled([s], seed) for s in layout.train}
        for row, model in models.items():
            t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
            own = [row.removesuffix(" alone")] if row.endswith(" alone") else list(layout.train)
            own_idx = [i for s in own for i in layout.train[s]]
            prior = fit(r[own_idx], y[own_idx], n)  # a site alone has only its own cells' sizes
            # The temperature refitted with the size term in: NLL of the combined answer on the sites' val cells.
            val_logits = np.concatenate([model.logits(d.sites[s].val_x) for s in own])
            val_idx = [i for s in own for i in layout.val[s]]
            val_ll = size_ll(r[val_idx], prior)
            refit = {w: min(TEMPERATURES, key=lambda tt: _nll(combine(val_logits, tt, val_ll, w), y[val_idx]))
                     for w in WEIGHTS}
            if anchored:
                ref_b = anchored_reference(d_every, softmax(model.logits(x_every), t), classes, ANCHOR_CLASS)
                r[ext] = np.log(dia[ext] / ref_b)
                scores.setdefault((row, "reference px", 0.0), []).append(ref_b)
            for name, (x, yy) in d.evaluation.items():
                idx = layout.evaluation[name]
                z, ll = network_logits(model, name, x), size_ll(r[idx], prior)
                p_net = softmax(z, t)
                for w in WEIGHTS:
                    p = combine_probs(p_net, ll, w)
                    m = compute_metrics(classes, yy, p)
                    scores.setdefault((row, name, w), []).append(m.balanced_accuracy)
                    if name == "external":
                        scores.setdefault((row, "ece", w), []).append(expected_calibration_error(p, yy))
                        p_refit = combine_probs(softmax(z, refit[w]), ll, w)
                        scores.setdefault((row, "ece refit", w), []).append(expected_calibration_error(p_refit, yy))
                        for c in ("lymphocyte", "basophil", "eosinophil"):
                            scores.setdefault((row, c, w), []).append(float(m.recall[classes.index(c)]))
        print(f"[{time.time() - t0:.0f} s] seed {seed} done", flush=True)
    if anchored:
        print("Barcelona's reference (median of the cells each row's network calls neutrophils): " + ", ".join(
            f"{row} {_mean_sd(scores[row, 'reference px', 0.0])} px" for row in rows))
    print("\n| row | w | internal | Barcelona | Barcelona ECE | ECE, T refitted with size | lymphocyte recall | basophil recall | eosinophil recall |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for w in WEIGHTS:
            print(f"| {row} | {w} | " + " | ".join(
                _mean_sd(scores[row, k, w]) for k in ("internal", "external", "ece", "ece refit", "lymphocyte", "basophil", "eosinophil")) + " |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
