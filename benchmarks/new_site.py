"""A new hospital joins: how many reviewed cells per class does it need to label before it trains with
the federation, and what does that buy it?

    .venv/bin/python benchmarks/new_site.py --shots 5,20,50 --seeds 0,1,2

Barcelona (PBC) is the hospital the shipped model never saw (external balanced accuracy ~0.66). Here it
becomes a fourth site holding only k labelled cells per class, drawn (seeded) from its own train split,
e.g. cells its clinicians confirmed on the review page. Rows, on the shipped recipe (EfficientNet-Lite0,
frozen trunk + last stage on cached views, texture augmentation):
  - FedAvg, 3 sites (k = 0): the shipped situation;
  - FedAvg, 4 sites: Barcelona trains with the others; its cells never leave it;
  - Barcelona alone: a model from its k cells per class only;
  - FedAvg (3 sites) fine-tuned at Barcelona: the shipped federated model, its trained top then trained
    on the k cells per class with the same recipe (personalisation: nothing leaves Barcelona either).
Scored on Barcelona's test split (658 cells, never drawn) and on the three sites' test splits, clean
view and with the shipped test-time views (turns-zooms). This does not bear on the issue's goal of a
model "trained only at the three other sites"; it measures the path a new hospital actually has.
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

from federation.features import trunk_features
from federation.benchmark.handlers import SiteFeatures
from federation.top_training import train_top
from federation.prepared import PreparedImages
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import train_federated, train_pooled
from federation.sites import EXTERNAL_SITE
from models.calibration import softmax
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS, View

sys.path.insert(0, str(ROOT / "benchmarks"))
from tta import fixed_view_features, shipped_arm  # noqa: E402  (the arm and cached views tta.py uses)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shots", default="5,20,50", help="labelled cells per class at the new site")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    arm, layout, data, trunk = shipped_arm(args.cache)
    classes = data.contract.class_names
    views = VIEW_SETS["turns-zooms"]

    # The new site's train cells with the recipe's augmented views (as its SuperNode would draw them).
    external = layout.evaluation["external"]
    pool = [i for i in external if layout.samples[i].split == "train"]
    pool_samples = [layout.samples[i] for i in pool]
    prepared = PreparedImages.build(pool_samples, data.contract, args.cache / "prepared")
    pool_x = trunk_features(trunk, pool_samples, prepared, data.contract, views=arm.views, augment=arm.augment,
                            seed=0, cache_dir=args.cache / "features")  # fmt: skip
    pool_y = layout.y[pool]

    # Scored sets, every shipped view of each cell (cached by tta.py for all of Barcelona).
    scored = {}
    for name, idx in (("internal", layout.evaluation["internal"]), ("Barcelona test", external)):
        samples = [layout.samples[i] for i in idx]
        prep = PreparedImages.build(samples, data.contract, args.cache / "prepared")
        feats = fixed_view_features(trunk, samples, prep, data.contract, views, args.cache / "features")
        keep = np.arange(len(idx)) if name == "internal" else np.array(
            [k for k, i in enumerate(idx) if layout.samples[i].split == "test"])
        scored[name] = (layout.y[np.asarray(idx)[keep]], {v: f[keep] for v, f in feats.items()})
    print(f"[{time.time() - t0:.0f} s] features ready: {len(pool)} Barcelona train cells to draw from, "
          f"{len(scored['Barcelona test'][0])} Barcelona test cells")

    def score(model) -> dict[tuple[str, str], float]:
        out = {}
        for name, (y, by_view) in scored.items():
            probs = {v: softmax(model.logits(f)) for v, f in by_view.items()}
            out[name, "clean"] = compute_metrics(classes, y, probs[View()]).balanced_accuracy
            out[name, "views"] = compute_metrics(classes, y, np.mean([probs[v] for v in views], axis=0)).balanced_accuracy
            if name == "Barcelona test":
                recall = compute_metrics(classes, y, np.mean([probs[v] for v in views], axis=0)).as_dict()["recall"]
                out[name, "lymphocyte recall"] = recall["lymphocyte"]
        return out

    columns = [("Barcelona test", "clean"), ("Barcelona test", "views"), ("Barcelona test", "lymphocyte recall"),
               ("internal", "clean"), ("internal", "views")]
    print("| row | k per class | seed | " + " | ".join(f"{a}, {b}" for a, b in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    results: dict[tuple[str, int], list[dict]] = {}

    def report(row: str, k: int, seed: int, model) -> None:
        s = score(model)
        results.setdefault((row, k), []).append(s)
        print(f"| {row} | {k} | {seed} | " + " | ".join(f"{s[c]:.3f}" for c in columns) + " |", flush=True)

    shots = [int(k) for k in args.shots.split(",")]
    for seed in (int(s) for s in args.seeds.split(",")):
        federated = train_federated("fedavg", data.contract, arm.top, data.sites, arm.recipe, seed)
        report("FedAvg, 3 sites", 0, seed, federated)
        shipped_top = {k: v.clone() for k, v in federated.split.top_state().items()}
        rng = np.random.default_rng(seed)
        for k in shots:
            picked = np.concatenate([rng.choice(np.flatnonzero(pool_y == c), k, replace=False) for c in range(len(classes))])
            # Its val reply scores its own labelled cells (clean view): a new site has no more labels.
            new = SiteFeatures(EXTERNAL_SITE, pool_x[picked], pool_y[picked], pool_x[picked][:, 0], pool_y[picked])
            sites = {**data.sites, EXTERNAL_SITE: new}
            report("FedAvg, 4 sites", k, seed, train_federated("fedavg", data.contract, arm.top, sites, arm.recipe, seed))
            report("Barcelona alone", k, seed, train_pooled(data.contract, arm.top, new.train_x, new.train_y,
                                                             [(new.val_x, new.val_y)], arm.recipe, seed))  # fmt: skip
            federated.split.load_top_state({k: v.clone() for k, v in shipped_top.items()})
            epochs = arm.recipe.rounds * arm.recipe.local_epochs
            train_top(federated.split, new.train_x, new.train_y, len(classes), arm.recipe.train_config(epochs, seed))
            report("FedAvg (3 sites) fine-tuned at Barcelona", k, seed, federated)
        federated.split.load_top_state(shipped_top)
    print("\nmeans ± sd over seeds")
    print("| row | k per class | " + " | ".join(f"{a}, {b}" for a, b in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for (row, k), runs in results.items():
        print(f"| {row} | {k} | " + " | ".join(_mean_sd([r[c] for r in runs]) for c in columns) + " |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
