"""Test-time augmentation: does averaging a cell's prediction over K re-framed views help a new hospital?

    .venv/bin/python benchmarks/tta.py --views 4 --seeds 0,1,2

The shipped recipe's arm (EfficientNet-Lite0, frozen trunk + trained last stage, texture augmentation):
centralised and FedAvg rows trained exactly as `benchmarks/ablations.py` trains them (cached views),
then each evaluation cell is scored on its clean view alone (what the service does) and on the mean
softmax over the clean view + K geometric views (rotation, flip, 0.8-1.25x zoom, shift: the framing
uncertainty of the cell locator; no colour or texture change), and on the fixed views a contract can
carry (`models.test_views`: "flips" = 4, "dihedral" = 8 exact symmetries of the input, what the
exported graph averages). Internal = the training sites' test
splits, external = every Barcelona cell of the five shared classes. The TTA views' trunk features are
cached beside the training views (var/benchmark/features). `--single` adds the single-site rows, clean vs
the shipped views (the goal "federated >= best single site + 0.10").
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

from federation.augment import AugmentConfig
from federation.features import cache_key, render_view, trunk_features
from federation.prepared import PreparedImages
from federation.benchmark.presets import LITE0
from federation.benchmark.protocols import _TopTrainers, arm_features, paper_layout
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import fresh_split
from federation.sites import EXTERNAL_SITE, DataRoot, resolve_data_root
from models.calibration import softmax
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS, ZOOM, View, apply_view


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=4, help="random geometric views averaged with the clean one")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loso", action="store_true", help="only the leave-one-training-site-out criterion per view set")
    ap.add_argument("--single", action="store_true",
                    help="only: single-site rows next to FedAvg and centralised, clean vs the shipped views")
    ap.add_argument("--render-check", action="store_true",
                    help="only: the clean cell rendered by the augmentation's affine resample, vs the contract's resize")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    arm, layout, data, trunk = shipped_arm(args.cache)
    if args.render_check:
        return render_check(arm, data, layout, trunk, [int(s) for s in args.seeds.split(",")], args.cache)
    if args.single:
        return single_sites(arm, data, layout, trunk, [int(s) for s in args.seeds.split(",")], args.cache, t0)
    if args.loso:
        return loso_by_view_set(arm, data, layout, trunk, [int(s) for s in args.seeds.split(",")], args.cache, t0)
    random_views, bank = {}, {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, data.contract, args.cache / "prepared")
        random_views[name] = trunk_features(
            trunk, samples, prepared, data.contract, views=args.views, augment=AugmentConfig.geometry_only(),
            seed=1, cache_dir=args.cache / "features",
        )  # fmt: skip
        bank[name] = fixed_view_features(trunk, samples, prepared, data.contract, BANK, args.cache / "features")
    trainers = _TopTrainers(arm, data)
    classes = data.contract.class_names
    columns = ["clean", f"{args.views} random", *SETS]
    print(f"[{time.time() - t0:.0f} s] views ready; balanced accuracy per view set ({', '.join(f'{k} = {len(v)}' for k, v in SETS.items())} views)")
    print("| row | seed | set | " + " | ".join(columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    scores: dict[tuple[str, str, str], list[float]] = {}
    for seed in (int(s) for s in args.seeds.split(",")):
        for row, model in (
            ("centralised", trainers.pooled(trainers.site_names, seed)),
            ("FedAvg", trainers.federated("fedavg", seed, {})),
        ):
            for name, feats in random_views.items():
                y = data.evaluation[name][1]
                rand = np.stack([softmax(model.logits(np.ascontiguousarray(feats[:, v]))) for v in range(feats.shape[1])])
                probs = {v: softmax(model.logits(f)) for v, f in bank[name].items()}
                results = {"clean": rand[0], f"{args.views} random": rand.mean(axis=0)}
                results |= {s: np.mean([probs[v] for v in views], axis=0) for s, views in SETS.items()}
                line = []
                for column, p in results.items():
                    ba = compute_metrics(classes, y, p).balanced_accuracy
                    scores.setdefault((row, name, column), []).append(ba)
                    line.append(f"{ba:.3f}")
                print(f"| {row} | {seed} | {name} | " + " | ".join(line) + " |", flush=True)
    print("\nmeans over seeds")
    print("| row | set | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for row in ("centralised", "FedAvg"):
        for name in random_views:
            print(f"| {row} | {name} | " + " | ".join(f"{np.mean(scores[row, name, c]):.3f}" for c in columns) + " |")
    print(f"[{time.time() - t0:.0f} s]")


def shipped_arm(cache: Path, views_per_cell: int = 0, external_site: str = EXTERNAL_SITE, input_size: int = 0,
                top: str = "", arch: str = ""):
    """The shipped recipe's arm (texture augmentation), the paper layout, its cached features and trunk;
    `views_per_cell` > 0 caches that many augmented views per training cell instead of the arm's 8;
    `external_site`: protocol 3's layout with that site held out (`paper_layout`);
    `input_size` > 0: the network's input at that many pixels a side instead of the shipped 128;
    `top`: what the sites train (`federation.trunk`) instead of the shipped "stage";
    `arch`: another timm backbone with offline weights (a larger EfficientNet-Lite) instead of Lite0."""
    arm = replace(LITE0, name="augmentation: texture", augment=AugmentConfig.texture())
    if arch:
        arm = replace(arm, name=f"{arm.name}, {arch}", architecture=arch)
    if input_size:
        arm = replace(arm, input_size=input_size)
    if top:
        arm = replace(arm, top=top)
    if views_per_cell:
        arm = replace(arm, views=views_per_cell)
    layout = paper_layout(DataRoot(resolve_data_root(None)), external_site=external_site)
    data = arm_features(arm, layout, cache)
    return arm, layout, data, fresh_split(data.contract, arm.top, seed=0)


def render_check(arm, data, layout, trunk, seeds, cache: Path) -> None:
    """Is part of the random views' gain their rendering? Training views all pass through the
    augmentation's affine resample (federation.augment.geometric), the served clean view through the
    contract's antialiased resize. Here the clean cell is also rendered by the affine path with no zoom,
    rotation or shift (AugmentConfig.none(); only the random mirror remains, an exact symmetry)."""
    trainers = _TopTrainers(arm, data)
    feats = {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, data.contract, cache / "prepared")
        feats[name] = trunk_features(trunk, samples, prepared, data.contract, views=2, augment=AugmentConfig.none(), seed=1, cache_dir=cache / "features")
    print("| row | seed | set | contract resize | affine render | affine render (2nd mirror draw) |")
    print("|---|---|---|---|---|---|")
    for seed in seeds:
        for row, model in (("centralised", trainers.pooled(trainers.site_names, seed)), ("FedAvg", trainers.federated("fedavg", seed, {}))):
            for name, f in feats.items():
                y = data.evaluation[name][1]
                scores = [compute_metrics(data.contract.class_names, y, softmax(model.logits(np.ascontiguousarray(f[:, v])))).balanced_accuracy for v in range(3)]
                print(f"| {row} | {seed} | {name} | " + " | ".join(f"{b:.3f}" for b in scores) + " |", flush=True)


def loso_by_view_set(arm, data, layout, trunk, seeds, cache: Path, t0: float) -> None:
    """The model-selection criterion that never sees Barcelona (as in benchmarks/ablations.py --loso):
    for each training site, the top trained centrally on the other two, tested on the held-out site's
    train + val cells under every view set; the mean over the three held-out sites, per seed."""
    trainers = _TopTrainers(arm, data)
    classes = data.contract.class_names
    held_out = {}
    for site in trainers.site_names:
        idx = layout.train[site] + layout.val[site]
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, data.contract, cache / "prepared")
        held_out[site] = (layout.y[idx], fixed_view_features(trunk, samples, prepared, data.contract, BANK, cache / "features"))
    print(f"[{time.time() - t0:.0f} s] held-out views ready")
    columns = ["clean", *SETS]
    print("| seed | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    means: dict[str, list[float]] = {c: [] for c in columns}
    for seed in seeds:
        per_site: dict[str, list[float]] = {c: [] for c in columns}
        for site, (y, feats) in held_out.items():
            model = trainers.pooled([s for s in trainers.site_names if s != site], seed)
            probs = {v: softmax(model.logits(f)) for v, f in feats.items()}
            per_site["clean"].append(compute_metrics(classes, y, probs[View()]).balanced_accuracy)
            for name, views in SETS.items():
                per_site[name].append(compute_metrics(classes, y, np.mean([probs[v] for v in views], axis=0)).balanced_accuracy)
        for c in columns:
            means[c].append(float(np.mean(per_site[c])))
        print(f"| {seed} | " + " | ".join(f"{means[c][-1]:.3f}" for c in columns) + " |", flush=True)
    print("| mean | " + " | ".join(f"**{np.mean(means[c]):.3f}**" for c in columns) + " |")
    print(f"[{time.time() - t0:.0f} s]")


def single_sites(arm, data, layout, trunk, seeds, cache: Path, t0: float, view_set: str = "turns-zooms") -> None:
    """The goal "federated >= best single site + 0.10" judged with the shipped test-time views on every
    row: each training site's own model, FedAvg and centralised, same recipe and seeds, clean vs views."""
    trainers = _TopTrainers(arm, data)
    classes = data.contract.class_names
    views = VIEW_SETS[view_set]
    feats = {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, data.contract, cache / "prepared")
        feats[name] = fixed_view_features(trunk, samples, prepared, data.contract, views, cache / "features")
    print(f"[{time.time() - t0:.0f} s] views ready")
    rows = [*(f"{s} alone" for s in trainers.site_names), "FedAvg", "centralised"]
    scores: dict[tuple[str, str, str], list[float]] = {}
    print(f"| row | seed | set | clean | {view_set} |")
    print("|---|---|---|---|---|")
    for seed in seeds:
        models = {f"{s} alone": trainers.pooled([s], seed) for s in trainers.site_names}
        models |= {"FedAvg": trainers.federated("fedavg", seed, {}), "centralised": trainers.pooled(trainers.site_names, seed)}
        for row, model in models.items():
            for name, by_view in feats.items():
                y = data.evaluation[name][1]
                probs = {v: softmax(model.logits(f)) for v, f in by_view.items()}
                clean = compute_metrics(classes, y, probs[View()]).balanced_accuracy
                viewed = compute_metrics(classes, y, np.mean([probs[v] for v in views], axis=0)).balanced_accuracy
                scores.setdefault((row, name, "clean"), []).append(clean)
                scores.setdefault((row, name, view_set), []).append(viewed)
                print(f"| {row} | {seed} | {name} | {clean:.3f} | {viewed:.3f} |", flush=True)
    print("\nmeans ± sd over seeds")
    print(f"| row | set | clean | {view_set} |")
    print("|---|---|---|---|")
    for row in rows:
        for name in feats:
            cells = [_mean_sd(scores[row, name, c]) for c in ("clean", view_set)]
            print(f"| {row} | {name} | " + " | ".join(cells) + " |")
    print(f"[{time.time() - t0:.0f} s]")


# The fixed views measured: the contract's sets plus zoomed and shifted candidates (15 % either way: the
# cell locator's framing uncertainty), each view's trunk output computed once and combined below.
SETS: dict[str, tuple[View, ...]] = {
    "flips": VIEW_SETS["flips"],
    "dihedral": VIEW_SETS["dihedral"],
    "zoom 3": (View(), View(zoom=ZOOM), View(zoom=1 / ZOOM)),
    "5 crops": (View(), *(View(zoom=ZOOM, shift=(dy, dx)) for dy in (-1, 1) for dx in (-1, 1))),
    "4 turns x 3 zooms": VIEW_SETS["turns-zooms"],
    "dihedral + 8 zoomed": (*VIEW_SETS["dihedral"], *(View(k, False, z) for z in (ZOOM, 1 / ZOOM) for k in range(4))),
}
BANK: tuple[View, ...] = tuple(dict.fromkeys(v for views in SETS.values() for v in views))


def fixed_view_features(trunk, samples, prepared, contract, views, cache_dir: Path) -> dict[View, np.ndarray]:
    """Trunk outputs of each fixed view of the clean input (`models.test_views`), cached like the rest."""
    out = {}
    for view in views:
        variant = f"fixed-{view.turns}-{view.mirror}"
        if view.zoom != 1.0:
            variant += f"-zoom{view.zoom:.4f}-shift{view.shift[0]:+.2f}{view.shift[1]:+.2f}-centred"
        key = cache_key(contract, trunk.top_name, samples, 0, None, 0, variant=variant)
        path = cache_dir / f"fixed-{contract.architecture}-{trunk.top_name}-{contract.input_size}-{key}.npy"
        if not path.is_file():
            parts = []
            for start in range(0, len(samples), 64):
                x = torch.from_numpy(np.stack([render_view(prepared, i, 0, contract, None, 0) for i in range(start, min(start + 64, len(samples)))]))
                parts.append(trunk.trunk_features(apply_view(x, view)).numpy().astype(np.float16))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, np.concatenate(parts))
        out[view] = np.load(path).astype(np.float32)
    return out


if __name__ == "__main__":
    main()
