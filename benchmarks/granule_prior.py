"""Cytoplasm granule density as a third opinion beside the network and the cell's size.

    .venv/bin/python benchmarks/granule_prior.py --seeds 0,1,2            # 15 min cold (caches), 3 min warm
    .venv/bin/python benchmarks/granule_prior.py --seeds 0,1,2 --single   # and each training site alone
    .venv/bin/python benchmarks/granule_prior.py --seeds 0,1,2 --single --colour-weights 0,0.5,1,2
    .venv/bin/python benchmarks/granule_prior.py --seeds 0,1,2 --soften-only   # the T = max(1, fitted) rule

What is left at Barcelona is eosinophils called neutrophils. `benchmarks/nucleus_shape.py` showed the
training sites teach a compact nucleus for eosinophils, which Barcelona's do not have. Their granules are
the textbook cue, and one measure of them agrees at every site: the optical density of the densest 30 % of
the cytoplasm (the cell's disc around the nucleus, nucleus and background out), relative to the nucleus's
own mean density, on a log scale (`models.cellcrop.cell_measures`). Eosinophil > neutrophil AUC within each site: tehran-lisc 0.94,
jiangxi-tecom 0.93, bccd 0.75, barcelona-pbc 1.00 (printed first). Being a ratio inside one cell it needs
no white balance, magnification or stain strength to agree.

It enters like the size opinion (`models.size_prior`: per-class Gaussians from per-class count, sum and
sum of squares the sites send), with the same anchor choice measured both ways: raw, or relative to the
site's neutrophils (a training site's labelled ones, a held-out or new site's the ones its network calls
so). Size stays at the shipped w = 2; the granule weight is chosen by the leave-one-site-out criterion.
As shipped, only eosinophils and neutrophils get a Gaussian of their own (`models.granule_prior`);
`--every-class` gives every class one (the first version).

`--colour-weights 0,0.5,1,2` adds a fourth opinion on top of the shipped granule one, for what is left at
Barcelona (monocytes called basophils and eosinophils): the cytoplasm's hue, log(red / green optical
density) over the nucleus's, against the site's neutrophils (monocytes and lymphocytes are blue-grey,
basophils and eosinophils are not; within-site AUC monocyte > basophil 0.88-0.98). Only lymphocytes and
monocytes get their own Gaussian (`--colour-classes`). Not in the product: the criterion turned it down.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from benchmarks.site_reference import cached_measure, located_diameters
from benchmarks.size_prior import combine_probs, fit, size_ll
from benchmarks.tta import fixed_view_features, shipped_arm
from federation.prepared import PreparedImages
from federation.benchmark.protocols import _TopTrainers
from federation.benchmark.report import _mean_sd
from federation.sites import DataRoot, resolve_data_root
from models.calibration import expected_calibration_error, softmax
from models.cellcrop import cell_measures
from models.evaluate import compute_metrics
from models.contract import SizePrior
from models.granule_prior import fit_granule_prior, site_median
from models.size_prior import ANCHOR_CLASS, SizeStatistics, anchored_reference, fit_prior, site_reference
from models.test_views import VIEW_SETS

SIZE_WEIGHT = 2.0
WEIGHTS = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)


def granules(samples, cache: Path) -> np.ndarray:
    """The product's granule densities (`models.cellcrop.cell_measures`; NaN: not measured), cached by path."""
    return cached_measure(samples, cache / "granule-density.json", lambda rgb: cell_measures(rgb).granules,
                          "measuring granules")


def cytoplasm_blue(rgb) -> float:
    """log(OD red / OD green) of the cytoplasm minus the nucleus's (NaN: not measured). A research measure
    on the locator's own analysis (`models.cellcrop` internals), not a product one."""
    from models import cellcrop as cc

    box = cc._content_box(rgb)
    content = rgb.crop(box) if box != (0, 0, rgb.width, rgb.height) else rgb
    factor = max(1, int(round(max(content.size) / cc._WORK_SIDE)))
    score, density = cc._stain(np.asarray(content.reduce(factor) if factor > 1 else content))
    nucleus = cc._nucleus_from(score, density)
    if nucleus is None:
        return float("nan")
    ys, xs = np.nonzero(nucleus)
    reach = cc._CYTOPLASM_REACH * cc._CELL_PER_NUCLEUS * cc._spread(ys, xs)
    total = density.sum(axis=-1)
    yy, xx = np.mgrid[: total.shape[0], : total.shape[1]]
    near = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= reach**2
    cytoplasm = near & ~nucleus & (total > cc._MIN_CYTOPLASM_DENSITY)
    if cytoplasm.sum() < cc._MIN_CYTOPLASM_PIXELS:
        return float("nan")
    c, n = density[cytoplasm].mean(axis=0), density[nucleus].mean(axis=0)
    return float(np.log(c[0] / c[1]) - np.log(n[0] / n[1]))


def blues(samples, cache: Path) -> np.ndarray:
    return cached_measure(samples, cache / "cytoplasm-blue.json", cytoplasm_blue, "measuring cytoplasm hue")


def hue_spread(values: np.ndarray) -> float:
    """A site's hue spread: the median absolute deviation of all its cells (no label)."""
    return float(np.nanmedian(np.abs(values - np.nanmedian(values)))) or 1.0


def fit_colour(b: np.ndarray, y: np.ndarray, classes: list[str], own: list[str]) -> SizePrior:
    ok = np.isfinite(b)
    stats = SizeStatistics.of_relative(b[ok], y[ok], len(classes))
    return fit_prior([stats], 1.0, opinion_classes=[k for k, c in enumerate(classes) if c in own])


def fit_granules(g: np.ndarray, y: np.ndarray, classes: list[str], every_class: bool = False) -> SizePrior:
    """The product's granule Gaussians (`models.granule_prior.fit_granule_prior`: eosinophils and
    neutrophils their own, the rest the all-cells one) from these cells; `every_class`: one per class."""
    ok = np.isfinite(g)
    stats = SizeStatistics.of_relative(g[ok], y[ok], len(classes))
    return fit_prior([stats], 1.0) if every_class else fit_granule_prior([stats], 1.0, classes, None)


def auc(p: np.ndarray, q: np.ndarray) -> float:
    p, q = p[np.isfinite(p)], q[np.isfinite(q)]
    diff = p[:, None] - q[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--anchor", choices=("neutrophils", "none"), default="neutrophils")
    ap.add_argument("--every-class", action="store_true",
                    help="a granule Gaussian for every class (the first version) instead of the shipped "
                         "eosinophil and neutrophil ones")
    ap.add_argument("--colour-weights", default="",
                    help="also the cytoplasm-hue opinion at these weights, the granule one at the shipped 1")
    ap.add_argument("--colour-classes", default="lymphocyte,monocyte")
    ap.add_argument("--colour-scaled", action="store_true",
                    help="the hue also divided by the site's own spread (all its cells, no label)")
    ap.add_argument("--soften-only", action="store_true",
                    help="the product's temperature-rule soften-only (T = max(1, fitted)) for every row and the "
                         "LOSO check: a softer network lets the opinions say more")
    ap.add_argument("--single", action="store_true",
                    help="also each training site alone, its size and granule Gaussians from its own cells only")
    args = ap.parse_args()
    colour = [float(w) for w in args.colour_weights.split(",")] if args.colour_weights else []
    colour_classes = args.colour_classes.split(",")
    # the grid scored: granule weights alone, or (granule 1, colour w) when --colour-weights is given
    grid = [(w, 0.0) for w in WEIGHTS] if not colour else [(1.0, w) for w in colour]

    def scale(values: np.ndarray) -> float:
        """1, or with --colour-scaled the site's hue spread (median absolute deviation, all its cells)."""
        return hue_spread(values) if args.colour_scaled else 1.0

    def _w(weights: tuple[float, float]) -> str:  # a grid point as printed
        return f"{weights[0]} / {weights[1]}" if colour else f"{weights[0]}"

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    data_root = DataRoot(resolve_data_root(None))
    arm, layout, d, trunk = shipped_arm(args.cache)
    classes = list(d.contract.class_names)
    n, y, neut = len(classes), layout.y, classes.index(ANCHOR_CLASS)
    site_of = np.array([s.site for s in layout.samples])
    dia = located_diameters(layout.samples, args.cache)
    gran = granules(layout.samples, args.cache)
    blue = blues(layout.samples, args.cache) if colour else np.zeros(len(layout.samples))
    every = data_root.select(["barcelona-pbc"], ["train", "val", "test"])
    d_every, g_every = located_diameters(every, args.cache), granules(every, args.cache)
    b_every = blues(every, args.cache) if colour else np.zeros(len(every))
    x_every = next(iter(fixed_view_features(
        trunk, every, PreparedImages.build(every, d.contract, args.cache / "prepared"), d.contract,
        VIEW_SETS["none"], args.cache / "features").values()))
    use_anchor = args.anchor == "neutrophils"
    r, g, bl = np.full(len(y), np.nan), np.full(len(y), np.nan), np.full(len(y), np.nan)
    for site in layout.train:  # training sites: their labelled neutrophils
        own = np.array(layout.train[site])
        own_all = np.flatnonzero(site_of == site)
        ref_d = site_reference(dia[own][np.isfinite(dia[own]) & (y[own] == neut)])
        ref_g = site_median(gran[own], y[own] == neut) if use_anchor else 0.0
        r[own_all], g[own_all] = np.log(dia[own_all] / ref_d), gran[own_all] - ref_g
        bl[own_all] = (blue[own_all] - site_median(blue[own], y[own] == neut)) / scale(blue[own])
    print(f"[{time.time() - t0:.0f} s] features, sizes and granules ready", flush=True)
    for site in (*layout.train, "barcelona-pbc"):
        own = np.flatnonzero(site_of == site)
        e, nn = gran[own][y[own] == classes.index("eosinophil")], gran[own][y[own] == neut]
        print(f"{site}: eosinophil > neutrophil AUC {auc(e, nn):.2f}; median per class " + ", ".join(
            f"{c} {np.nanmedian(g[own][y[own] == k]) if site != 'barcelona-pbc' else np.nanmedian(gran[own][y[own] == k]):+.2f}"
            for k, c in enumerate(classes) if (y[own] == k).any()))
        if colour:  # the hue against the site's labelled neutrophils, every site alike
            b = blue[own] - site_median(blue[own], y[own] == neut)
            of = {c: b[y[own] == k] for k, c in enumerate(classes)}
            print(f"  cytoplasm hue: AUC monocyte > basophil {auc(of['monocyte'], of['basophil']):.2f}, monocyte > "
                  f"eosinophil {auc(of['monocyte'], of['eosinophil']):.2f}, lymphocyte > basophil "
                  f"{auc(of['lymphocyte'], of['basophil']):.2f}; median per class "
                  + ", ".join(f"{c} {np.nanmedian(v):+.2f}" for c, v in of.items() if len(v)))
    trainers = _TopTrainers(arm, d)

    def temperature(model) -> float:
        """The network's temperature under the product's rule (`--soften-only`: never below 1)."""
        t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
        return max(1.0, t) if args.soften_only else t

    def opinions(priors, logits, t, dia_, gran_, blue_):
        """(size ll, granule ll, colour ll) of a site without labels: anchored on the cells its network calls
        neutrophils."""
        prior_r, prior_g, prior_b = priors
        called = softmax(logits, t).argmax(axis=1) == neut
        rr = np.log(dia_ / anchored_reference(dia_, softmax(logits, t), classes, ANCHOR_CLASS))
        gg = gran_ - (site_median(gran_, called) if use_anchor else 0.0)
        bb = (blue_ - site_median(blue_, called)) / scale(blue_)
        return size_ll(rr, prior_r), size_ll(gg, prior_g), size_ll(bb, prior_b)

    def fit_all(idx):
        """The size, granule and colour Gaussians from these labelled cells."""
        return (fit(r[idx], y[idx], n), fit_granules(g[idx], y[idx], classes, args.every_class),
                fit_colour(bl[idx], y[idx], classes, colour_classes))

    loso: dict[tuple[float, float], list[float]] = {w: [] for w in grid}
    for seed in seeds:
        for held in layout.train:
            rest = [s for s in layout.train if s != held]
            model = trainers.pooled(rest, seed)
            t = temperature(model)
            fit_idx = [i for s in rest for i in layout.train[s]]
            priors = fit_all(fit_idx)
            h = d.sites[held]
            hx = np.concatenate([np.asarray(h.train_x[:, 0]), np.asarray(h.val_x)])
            h_idx = list(layout.train[held]) + list(layout.val[held])
            logits = model.logits(hx)
            ll_r, ll_g, ll_b = opinions(priors, logits, t, dia[h_idx], gran[h_idx], blue[h_idx])
            p_net = softmax(logits, t)
            for w, wc in grid:
                p = combine_probs(p_net, SIZE_WEIGHT * ll_r + w * ll_g + wc * ll_b, 1.0)
                loso[w, wc].append(compute_metrics(classes, y[h_idx], p).balanced_accuracy)
        print(f"[{time.time() - t0:.0f} s] LOSO seed {seed}: " + ", ".join(
            f"w={_w(w)}: {np.mean(v[-3:]):.3f}" for w, v in loso.items()), flush=True)
    print(f"LOSO (size w = 2, granule w{' / colour w' if colour else ''} below), mean over seeds and held-out sites: "
          + ", ".join(f"w={_w(w)}: {np.mean(v):.3f}" for w, v in loso.items()))

    views = {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, d.contract, args.cache / "prepared")
        views[name] = fixed_view_features(trunk, samples, prepared, d.contract, VIEW_SETS["turns-zooms"],
                                          args.cache / "features")
    print(f"[{time.time() - t0:.0f} s] test views ready", flush=True)
    fit_idx = [i for s in layout.train for i in layout.train[s]]
    prior_r, prior_g, prior_b = fit_all(fit_idx)
    if colour:
        print("colour prior: " + ", ".join(f"{c} {m:+.2f} ± {s:.2f}" for c, m, s in zip(classes, prior_b.mean, prior_b.sd)))
    print("granule prior: " + ", ".join(f"{c} {m:+.2f} ± {s:.2f}" for c, m, s in zip(classes, prior_g.mean, prior_g.sd)))
    scores: dict[tuple, list[float]] = {}
    ext = layout.evaluation["external"]
    for seed in seeds:
        models = {"centralised": trainers.pooled(list(layout.train), seed),
                  "FedAvg": trainers.federated("fedavg", seed, {})}
        if args.single:
            models |= {f"{s} alone": trainers.pooled([s], seed) for s in layout.train}
        for row, model in models.items():
            t = temperature(model)
            if row.endswith(" alone"):  # a site alone has only its own cells' statistics
                prior_r, prior_g, prior_b = fit_all(list(layout.train[row.removesuffix(" alone")]))
            else:
                prior_r, prior_g, prior_b = fit_all(fit_idx)
            called = softmax(model.logits(x_every), t).argmax(axis=1) == neut
            ref_d = site_reference(d_every[called & np.isfinite(d_every)])
            ref_g = site_median(g_every, called) if use_anchor else 0.0
            r[ext], g[ext] = np.log(dia[ext] / ref_d), gran[ext] - ref_g
            bl[ext] = (blue[ext] - site_median(b_every, called)) / scale(b_every)
            for name, (x, yy) in d.evaluation.items():
                idx = layout.evaluation[name]
                mean = np.mean([softmax(model.logits(f)) for f in views[name].values()], axis=0)
                p_net = softmax(np.log(np.clip(mean, 1e-12, None)), t)
                ll_r, ll_g, ll_b = size_ll(r[idx], prior_r), size_ll(g[idx], prior_g), size_ll(bl[idx], prior_b)
                for w in grid:
                    p = combine_probs(p_net, SIZE_WEIGHT * ll_r + w[0] * ll_g + w[1] * ll_b, 1.0)
                    m = compute_metrics(classes, yy, p)
                    scores.setdefault((row, name, w), []).append(m.balanced_accuracy)
                    if name == "external":
                        scores.setdefault((row, "ece", w), []).append(expected_calibration_error(p, yy))
                        for c in classes:
                            scores.setdefault((row, c, w), []).append(float(m.recall[classes.index(c)]))
        print(f"[{time.time() - t0:.0f} s] seed {seed} done", flush=True)
    print(f"\n| row | granule w{' / colour w' if colour else ''} | internal | Barcelona | Barcelona ECE | Barcelona recall {' / '.join(c[:4] for c in classes)} |")
    print("|---|---|---|---|---|---|")
    for row in dict.fromkeys(k[0] for k in scores):
        for w in grid:
            print(f"| {row} | {_w(w)} | " + " | ".join(_mean_sd(scores[row, k, w]) for k in ("internal", "external", "ece"))
                  + " | " + " / ".join(f"{np.mean(scores[row, c, w]):.2f}" for c in classes) + " |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
