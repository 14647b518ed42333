"""Test-time augmentation: does averaging a cell's prediction over K re-framed views help a new hospital?

    .venv/bin/python benchmarks/tta.py --views 4 --seeds 0,1,2

The shipped recipe's arm (EfficientNet-Lite0, frozen trunk + trained last stage, texture augmentation):
centralised and FedAvg rows trained exactly as `benchmarks/ablations.py` trains them (cached views),
then each evaluation cell is scored on its clean view alone (what the service does) and on the mean
softmax over the clean view + K geometric views (rotation, flip, 0.8-1.25x zoom, shift: the framing
uncertainty of the cell locator; no colour or texture change). Internal = the training sites' test
splits, external = every Barcelona cell of the five shared classes. The TTA views' trunk features are
cached beside the training views (var/benchmark/features).
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
from federation.benchmark.features import trunk_features
from federation.benchmark.prepared import PreparedImages
from federation.benchmark.presets import LITE0
from federation.benchmark.protocols import _TopTrainers, arm_features, paper_layout
from federation.benchmark.runs import fresh_split
from federation.sites import DataRoot, resolve_data_root
from models.calibration import softmax
from models.evaluate import compute_metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--views", type=int, default=4, help="geometric views averaged with the clean one")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    arm = replace(LITE0, name="augmentation: texture", augment=AugmentConfig.texture())
    layout = paper_layout(DataRoot(resolve_data_root(None)))
    data = arm_features(arm, layout, args.cache)
    trunk = fresh_split(data.contract, arm.top, seed=0)
    views = {}
    for name, idx in layout.evaluation.items():
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, data.contract, args.cache / "prepared")
        views[name] = trunk_features(
            trunk, samples, prepared, data.contract, views=args.views, augment=AugmentConfig.geometry_only(),
            seed=1, cache_dir=args.cache / "features",
        )  # fmt: skip
    trainers = _TopTrainers(arm, data)
    classes = data.contract.class_names
    print(f"| row | seed | set | clean view | clean + {args.views} views | lymphocyte recall, clean / TTA |")
    print("|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        for row, model in (
            ("centralised", trainers.pooled(trainers.site_names, seed)),
            ("FedAvg", trainers.federated("fedavg", seed, {})),
        ):
            for name, feats in views.items():
                y = data.evaluation[name][1]
                per_view = np.stack([softmax(model.logits(np.ascontiguousarray(feats[:, v]))) for v in range(feats.shape[1])])
                clean = compute_metrics(classes, y, per_view[0])
                tta = compute_metrics(classes, y, per_view.mean(axis=0))
                lym = classes.index("lymphocyte")
                print(
                    f"| {row} | {seed} | {name} | {clean.balanced_accuracy:.3f} | {tta.balanced_accuracy:.3f} | "
                    f"{clean.recall[lym]:.2f} / {tta.recall[lym]:.2f} |",
                    flush=True,
                )
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
