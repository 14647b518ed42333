"""Research: centralised top training on cached frozen-trunk features, with the LOSO criterion.

    .venv/bin/python benchmarks/tops.py --arch tf_efficientnet_lite0 --size 128 --top stage --views 8

Barcelona subsampled (150 per class, seeded) for speed; selection by LOSO / internal val only.
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

import torch

from federation.augment import AugmentConfig
from federation.benchmark.protocols import Arm, arm_features, leave_one_site_out, paper_layout, run_rows
from federation.benchmark.runs import Recipe
from federation.sites import DataRoot, resolve_data_root


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="tf_efficientnet_lite0")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--top", default="stage")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--color", default="rgb")
    ap.add_argument("--norm", default="white-balance")
    ap.add_argument("--crop", type=float, default=1.3)
    ap.add_argument("--augment", default="default", choices=["default", "geometry", "none"])
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--epochs", type=int, default=10, help="rounds x local epochs")
    ap.add_argument("--strategies", nargs="*", default=[])
    ap.add_argument("--loso", action="store_true")
    ap.add_argument("--confusion", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    aug = {
        "default": AugmentConfig(),
        "geometry": AugmentConfig.geometry_only(),
        "none": AugmentConfig.none(),
    }
    recipe = Recipe(rounds=5, local_epochs=max(1, args.epochs // 5), lr=args.lr)
    arm = Arm(
        f"{args.arch}-{args.size}-{args.top}-{args.color}-v{args.views}-{args.augment}",
        args.arch,
        args.size,
        args.top,
        args.views,
        args.color,
        args.norm,
        args.crop,
        aug[args.augment],
        recipe,
    )
    layout = paper_layout(DataRoot(resolve_data_root(None)), args.per_class)
    data = arm_features(arm, layout, ROOT / "var" / "benchmark")
    rows = run_rows(arm, data, args.seed, args.strategies, single_site=False, log=lambda s: None)
    for r in rows:
        rec = " ".join(f"{v:.2f}" for v in r["external"]["recall"].values())
        print(
            f"{arm.name} lr{args.lr} ep{args.epochs} {r['row']:<12} internal {r['internal']['balanced_accuracy']:.3f} "
            f"external {r['external']['balanced_accuracy']:.3f} [{rec}] ece {r['external']['ece']:.3f}->"
            f"{r['external']['ece_calibrated']:.3f} T={r['temperature']:.2f} {r['seconds']:.0f}s",
            flush=True,
        )
        if args.confusion:
            print("  external confusion (rows true b/e/l/m/n):", r["external"]["confusion"], flush=True)
    if args.loso:
        print(
            f"{arm.name} LOSO",
            {k: round(v, 3) for k, v in leave_one_site_out(arm, data, 0).items()},
            flush=True,
        )


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"[{time.time() - t0:.0f} s]")
