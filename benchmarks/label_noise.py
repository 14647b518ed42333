"""Suspect labels at the training sites: does dropping them help the new hospital?

    .venv/bin/python benchmarks/label_noise.py --seeds 0,1,2

Some of `bccd`'s "eosinophil" crops look like neutrophils (pale cytoplasm, no granules). Each training site
can check its own labels without sharing anything: K-fold on its own cells (the shipped arm's top trained
on K-1 folds of the site, scoring the held-out fold, confident-learning style), a cell is *suspect* when
its out-of-fold probability of its own label is below --below and another class is above --above.
Reported: suspects per site and class (and what they are called); then FedAvg and centralised trained
with and without the suspects, 3 seeds, scored inside (the sites' test splits, labels as given) and at
Barcelona (five classes, shipped test-time views, with the shipped size opinion: anchored on neutrophils,
w = 2, Barcelona's reference from all its images), plus LOSO (pooled on two sites, suspects dropped or
not, scored on the third site's cells as labelled). Shipped arm's cached features.
"""

from __future__ import annotations

import argparse
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

from benchmarks.site_reference import located_diameters
from benchmarks.tta import fixed_view_features, shipped_arm
from federation.prepared import PreparedImages
from federation.benchmark.protocols import ArmData, _TopTrainers
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import train_pooled
from federation.sites import SPLITS, DataRoot, resolve_data_root
from models.calibration import softmax
from models.evaluate import compute_metrics
from models.size_prior import ANCHOR_CLASS, SizeStatistics, anchored_reference, apply_size_prior, fit_prior
from models.test_views import VIEW_SETS


def out_of_fold(arm, data: ArmData, site: str, folds: int, seed: int) -> np.ndarray:
    """(N, C) out-of-fold probabilities of a site's train cells (clean view), from its own other folds."""
    s = data.sites[site]
    rng = np.random.default_rng(seed)
    fold = rng.permutation(len(s.train_y)) % folds
    p = np.zeros((len(s.train_y), data.contract.num_classes))
    for k in range(folds):
        model = train_pooled(data.contract, arm.top, s.train_x[fold != k], s.train_y[fold != k],
                             [(s.val_x, s.val_y)], arm.recipe, seed)
        t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
        p[fold == k] = softmax(model.logits(s.train_x[fold == k][:, 0]), t)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--below", type=float, default=0.1, help="suspect: own label's probability below this ...")
    ap.add_argument("--above", type=float, default=0.8, help="... and another class above this")
    args = ap.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    arm, layout, data, trunk = shipped_arm(args.cache)
    classes = list(data.contract.class_names)
    n = len(classes)

    keep: dict[str, np.ndarray] = {}
    for site, s in data.sites.items():
        p = out_of_fold(arm, data, site, args.folds, seed=0)
        own = p[np.arange(len(s.train_y)), s.train_y]
        other = np.where(np.eye(n, dtype=bool)[s.train_y], 0.0, p).max(axis=1)
        suspect = (own < args.below) & (other > args.above)
        keep[site] = ~suspect
        called = np.where(np.eye(n, dtype=bool)[s.train_y], -1.0, p).argmax(axis=1)
        summary = {classes[c]: f"{int(suspect[s.train_y == c].sum())}/{int((s.train_y == c).sum())}" for c in range(n)
                   if (s.train_y == c).any()}
        moves = {}
        for i in np.flatnonzero(suspect):
            key = f"{classes[s.train_y[i]][:4]}→{classes[called[i]][:4]}"
            moves[key] = moves.get(key, 0) + 1
        print(f"[{time.time() - t0:.0f} s] {site}: {int(suspect.sum())} suspect of {len(suspect)}: {summary}; {moves}",
              flush=True)
    cleaned = replace(data, sites={k: replace(v, train_x=v.train_x[keep[k]], train_y=v.train_y[keep[k]])
                                   for k, v in data.sites.items()})

    # The size opinion as shipped; each training site's sums from all its train cells (sizes are not labels'
    # opinions; the Gaussians move little either way).
    d = located_diameters(layout.samples, args.cache)
    y = layout.y
    anchor = classes.index(ANCHOR_CLASS)
    prior = fit_prior([SizeStatistics.of(d[np.array(layout.train[s])], y[np.array(layout.train[s])], n, anchor=anchor)
                       for s in layout.train], 2.0, anchor=ANCHOR_CLASS)
    every = DataRoot(resolve_data_root(None)).select(["barcelona-pbc"], list(SPLITS))
    d_every = located_diameters(every, args.cache)
    x_every = next(iter(fixed_view_features(trunk, every, PreparedImages.build(every, data.contract, args.cache / "prepared"),
                                            data.contract, VIEW_SETS["none"], args.cache / "features").values()))
    ext = layout.evaluation["external"]
    ext_samples = [layout.samples[i] for i in ext]
    views = fixed_view_features(trunk, ext_samples, PreparedImages.build(ext_samples, data.contract, args.cache / "prepared"),
                                data.contract, VIEW_SETS["turns-zooms"], args.cache / "features")
    x_int, y_int = data.evaluation["internal"]
    y_ext = data.evaluation["external"][1]

    scores: dict[tuple, list[float]] = {}
    for seed in (int(v) for v in args.seeds.split(",")):
        for name, arm_data in (("as labelled", data), ("suspects dropped", cleaned)):
            trainers = _TopTrainers(arm, arm_data)
            for row, model in (("FedAvg", trainers.federated("fedavg", seed, {})),
                               ("centralised", trainers.pooled(list(layout.train), seed))):
                t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
                scores.setdefault((row, name, "internal"), []).append(
                    compute_metrics(classes, y_int, softmax(model.logits(x_int), t)).balanced_accuracy)
                mean = np.mean([softmax(model.logits(f)) for f in views.values()], axis=0)
                p_net = softmax(np.log(np.clip(mean, 1e-12, None)), t)
                ref = anchored_reference(d_every, softmax(model.logits(x_every), t), classes, ANCHOR_CLASS)
                p = apply_size_prior(p_net, np.log(d[ext] / ref), prior)
                m = compute_metrics(classes, y_ext, p)
                scores.setdefault((row, name, "Barcelona"), []).append(m.balanced_accuracy)
                scores.setdefault((row, name, "Barcelona network"), []).append(
                    compute_metrics(classes, y_ext, p_net).balanced_accuracy)
                for c in ("eosinophil", "lymphocyte"):
                    scores.setdefault((row, name, c), []).append(float(m.recall[classes.index(c)]))
            for held in layout.train:  # LOSO: pooled on the other two sites, the held-out site as labelled
                rest = [s for s in layout.train if s != held]
                model = trainers.pooled(rest, seed)
                h = data.sites[held]
                hx = np.concatenate([h.train_x[:, 0], h.val_x])
                hy = np.concatenate([h.train_y, h.val_y])
                scores.setdefault(("LOSO", name, "held-out"), []).append(
                    compute_metrics(classes, hy, softmax(model.logits(hx))).balanced_accuracy)
        print(f"[{time.time() - t0:.0f} s] seed {seed} done", flush=True)

    print("\n| row | training labels | internal | Barcelona network (views) | Barcelona with size | eosinophil recall | lymphocyte recall |")
    print("|---|---|---|---|---|---|---|")
    for row in ("FedAvg", "centralised"):
        for name in ("as labelled", "suspects dropped"):
            print(f"| {row} | {name} | " + " | ".join(_mean_sd(scores[row, name, k]) for k in
                  ("internal", "Barcelona network", "Barcelona", "eosinophil", "lymphocyte")) + " |")
    for name in ("as labelled", "suspects dropped"):
        print(f"LOSO ({name}): {_mean_sd(scores['LOSO', name, 'held-out'])}")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
