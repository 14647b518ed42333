"""Which label-free site reference makes the size opinion travel? A probe at the new hospital.

    .venv/bin/python benchmarks/site_reference.py --seeds 0,1,2                                # the product's
    .venv/bin/python benchmarks/site_reference.py --seeds 0,1,2 --training-reference median    # before it
    .venv/bin/python benchmarks/site_reference.py --seeds 0,1,2 --training-reference mode

The size opinion (models/size_prior.py) sizes each cell against one reference diameter per site. A
deployed site has no labels and images whatever it has: at Barcelona all 8 cell types (platelets,
erythroblasts, immature granulocytes too). Its median over all of them moved the five-class score from
0.766 (median of the five shared classes) to 0.728. Here: Barcelona's score for each label-free estimate
of its reference, and a sweep around one of them (--sweep-around):

- median:                the median over all of the site's images (the first product);
- mode:                  the peak of a kernel density of log diameter;
- fitted:                the reference that makes the site's cells most likely under the pooled per-class
                         Gaussians, each cell weighted by the network's own (temperature-scaled) answer;
- predicted neutrophils: the median of the cells the network (before size) calls neutrophils
                         (`models.size_prior.anchored_reference`: the product since this probe).
The training sites' own references are set by --training-reference (their median, their mode, or their
labelled neutrophils: `SizeStatistics.of(..., anchor=)`, the product). Each estimator is also judged
without Barcelona: leave one training site out, and the same with the held-out site's class mix skewed
(Dirichlet(1) subsamples), since a hospital's mix is not the training sites'.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from rich.progress import track

from benchmarks.tta import shipped_arm
from federation.benchmark.protocols import _TopTrainers
from federation.benchmark.report import _mean_sd
from federation.sites import SPLITS, DataRoot, resolve_data_root
from models.calibration import softmax
from models.cellcrop import cell_diameter
from models.evaluate import compute_metrics
from models.preprocess import to_rgb
from models.size_prior import SizeStatistics, anchored_reference, apply_size_prior, fit_prior, log_likelihood

OFFSETS = np.round(np.arange(-0.30, 0.301, 0.05), 2)


def located_diameters(samples, cache: Path) -> np.ndarray:
    """The product's diameters (NaN where no nucleus was found), cached by path."""
    return cached_measure(samples, cache / "located-diameters.json", cell_diameter, "locating cells")


def cached_measure(samples, path: Path, measure, description: str) -> np.ndarray:
    """`measure(RGB image)` of every sample (NaN: not measured), cached by image path in the JSON `path`."""
    known = json.loads(path.read_text()) if path.is_file() else {}
    missing = [s for s in samples if str(s.path) not in known]
    for s in track(missing, description=description) if missing else []:
        with Image.open(s.path) as img:
            value = measure(to_rgb(img))
        known[str(s.path)] = None if not np.isfinite(value) else value
    if missing:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(known))
    return np.array([np.nan if known[str(s.path)] is None else known[str(s.path)] for s in samples])


def mode_reference(d: np.ndarray) -> float:
    logd = np.log(d[np.isfinite(d)])
    grid = np.linspace(logd.min(), logd.max(), 400)
    bw = 1.06 * logd.std() * len(logd) ** -0.2
    density = np.exp(-0.5 * ((grid[:, None] - logd[None]) / bw) ** 2).sum(axis=1)
    return float(np.exp(grid[np.argmax(density)]))


def fitted_reference(d: np.ndarray, p_net: np.ndarray, prior, start: float) -> float:
    """argmax over the reference of sum_i log sum_c p_net(c|i) N(log(d_i/ref) | mean_c, sd_c)."""
    ok = np.isfinite(d)
    d, p = d[ok], p_net[ok]
    grid = start * np.exp(np.linspace(-0.5, 0.5, 201))

    def loglik(ref):
        ll = log_likelihood(np.log(d / ref), prior) - 0.5 * np.log(2 * np.pi)
        z = np.log(np.clip(p, 1e-12, None)) + ll
        m = z.max(axis=1, keepdims=True)
        return float(np.sum(m[:, 0] + np.log(np.exp(z - m).sum(axis=1))))

    return float(grid[np.argmax([loglik(r) for r in grid])])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--weight", type=float, default=2.0)
    ap.add_argument("--training-reference", choices=("median", "mode", "neutrophil"), default="neutrophil",
                    help="what each training site's sizes are relative to (its median, its mode, its neutrophils)")
    ap.add_argument("--sweep-around", default="median, all images")
    args = ap.parse_args()
    torch.set_num_threads(2)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    data_root = DataRoot(resolve_data_root(None))
    arm, layout, data, trunk = shipped_arm(args.cache)
    classes = list(data.contract.class_names)
    n = len(classes)
    y = layout.y
    d = located_diameters(layout.samples, args.cache)
    every = data_root.select(["barcelona-pbc"], list(SPLITS))
    d_every = located_diameters(every, args.cache)
    print(f"[{time.time() - t0:.0f} s] features and diameters ready; Barcelona: {np.isfinite(d_every).sum()} of "
          f"{len(every)} located", flush=True)

    # The network on every Barcelona image (all 8 types): what a deployed site's cells would get.
    from benchmarks.tta import fixed_view_features
    from federation.prepared import PreparedImages
    from models.test_views import VIEW_SETS

    prepared = PreparedImages.build(every, data.contract, args.cache / "prepared")
    x_every = next(iter(fixed_view_features(trunk, every, prepared, data.contract, VIEW_SETS["none"],
                                            args.cache / "features").values()))
    print(f"[{time.time() - t0:.0f} s] network inputs of all Barcelona images ready", flush=True)

    neutrophil = classes.index("neutrophil")

    def training_reference(dd, yy):
        """A training site's own reference, by --training-reference (labels may be used: it is theirs)."""
        if args.training_reference == "mode":
            return mode_reference(dd)
        if args.training_reference == "neutrophil":
            return float(np.nanmedian(dd[yy == neutrophil]))
        return float(np.nanmedian(dd))

    def stats(idx):
        s = None
        for site in layout.train:
            own = np.array([i for i in idx if layout.samples[i].site == site])
            if len(own) and args.training_reference == "neutrophil":  # the product's own sums
                part = SizeStatistics.of(d[own], y[own], n, anchor=neutrophil)
                s = part if s is None else s + part
            elif len(own):
                ok = np.isfinite(d[own])
                rr = np.log(d[own][ok] / training_reference(d[own], y[own]))
                yy = y[own][ok]
                part = SizeStatistics(np.bincount(yy, minlength=n).astype(float), np.bincount(yy, rr, n),
                                      np.bincount(yy, rr * rr, n))
                s = part if s is None else s + part
        return s

    def predicted_neutrophils(dd, p):
        """The median cell the network (without size) calls a neutrophil: an anchor a mix cannot move much."""
        return anchored_reference(dd[np.isfinite(dd)], p[np.isfinite(dd)], classes, "neutrophil")

    ext = layout.evaluation["external"]
    five = set(str(layout.samples[i].path) for i in ext)
    references: dict[str, list[float]] = {}
    sweep: dict[str, list[float]] = {}
    trainers = _TopTrainers(arm, data)
    loso: dict[str, list[float]] = {}
    skewed: dict[str, list[float]] = {}
    for seed in seeds:
        # Leave one training site out: the held-out site's reference from its own cells by each estimator.
        for held in layout.train:
            rest = [s for s in layout.train if s != held]
            model = trainers.pooled(rest, seed)
            t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
            prior = fit_prior([stats([i for s in rest for i in layout.train[s]])], args.weight)
            h = data.sites[held]
            hx = np.concatenate([np.asarray(h.train_x[:, 0]), np.asarray(h.val_x)])
            h_idx = list(layout.train[held]) + list(layout.val[held])
            p = softmax(model.logits(hx), t)
            hd = d[h_idx]
            med = float(np.nanmedian(hd))
            for name, ref in (("network", None), ("median", med), ("mode", mode_reference(hd)),
                              ("fitted", fitted_reference(hd, p, prior, med)),
                              ("predicted neutrophils", predicted_neutrophils(hd, p))):
                q = p if ref is None else apply_size_prior(p, np.log(hd / ref), prior)
                loso.setdefault(name, []).append(compute_metrics(classes, y[h_idx], q).balanced_accuracy)
            # The same held-out site with its class mix skewed (Dirichlet(1) over classes, 4 draws): which
            # reference survives a hospital whose cells are not the training sites' mix?
            rng = np.random.default_rng(seed)
            yh = y[h_idx]
            for _ in range(4):
                mix = rng.dirichlet(np.ones(n))
                have = [k for k in range(n) if (yh == k).sum() >= 10]
                size = min((yh == k).sum() / mix[k] for k in have)
                pick = np.concatenate([rng.choice(np.flatnonzero(yh == k), max(1, int(size * mix[k])), replace=False)
                                       for k in have])
                pd, pp, py = hd[pick], p[pick], yh[pick]
                pm = float(np.nanmedian(pd))
                for name, ref in (("median", pm), ("mode", mode_reference(pd)),
                                  ("predicted neutrophils", predicted_neutrophils(pd, pp))):
                    q = apply_size_prior(pp, np.log(pd / ref), prior)
                    skewed.setdefault(name, []).append(compute_metrics(classes, py, q).balanced_accuracy)
        print(f"[{time.time() - t0:.0f} s] LOSO seed {seed}: " + ", ".join(
            f"{k} {np.mean(v[-3:]):.3f}" for k, v in loso.items()), flush=True)

        model = trainers.federated("fedavg", seed, {})
        t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
        prior = fit_prior([stats([i for s in layout.train for i in layout.train[s]])], args.weight)
        x_ext, y_ext = data.evaluation["external"]
        p_ext = softmax(model.logits(x_ext), t)
        p_every = softmax(model.logits(x_every), t)
        d_ext = d[ext]
        med_all = float(np.nanmedian(d_every))
        found = {
            "median, five classes (labels used)": float(np.nanmedian(d_ext)),
            "median, all images": med_all,
            "mode, all images": mode_reference(d_every),
            "fitted, all images": fitted_reference(d_every, p_every, prior, med_all),
            "fitted, five classes": fitted_reference(d_ext, p_ext, prior, med_all),
            "predicted neutrophils, all images": predicted_neutrophils(d_every, p_every),
            "predicted neutrophils, five classes": predicted_neutrophils(d_ext, p_ext),
        }
        for name, ref in found.items():
            references.setdefault(name, []).append(ref)
            p = apply_size_prior(p_ext, np.log(d_ext / ref), prior)
            sweep.setdefault(name, []).append(compute_metrics(classes, y_ext, p).balanced_accuracy)
        sweep.setdefault("network alone", []).append(compute_metrics(classes, y_ext, p_ext).balanced_accuracy)
        for off in OFFSETS:
            p = apply_size_prior(p_ext, np.log(d_ext / (found[args.sweep_around] * np.exp(off))), prior)
            sweep.setdefault(f"{args.sweep_around} x exp({off:+.2f})", []).append(
                compute_metrics(classes, y_ext, p).balanced_accuracy)
        print(f"[{time.time() - t0:.0f} s] seed {seed} done", flush=True)

    print("\nLeave one training site out (held-out site's train + val cells), mean over sites and seeds:")
    for k, v in loso.items():
        print(f"  {k:8s} {np.mean(v):.3f}")
    print("Same, each held-out site subsampled to 4 random class mixes (Dirichlet(1)):")
    for k, v in skewed.items():
        print(f"  {k:8s} {np.mean(v):.3f} (worst {np.min(v):.3f})")
    print("\n| Barcelona reference | px | balanced accuracy (FedAvg, 5 classes) |\n|---|---|---|")
    for k, v in sweep.items():
        px = f"{np.mean(references[k]):.1f}" if k in references else ""
        print(f"| {k} | {px} | {_mean_sd(v)} |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
