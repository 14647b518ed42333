"""Ablations of the default arm (protocol 1): one change per row, everything else as shipped.

    .venv/bin/python benchmarks/ablations.py --out var/benchmark/ablations --seeds 0
    .venv/bin/python benchmarks/ablations.py --only recipe        # cached-feature rows only (cheap)

Rows (centralised and FedAvg unless the row is about a strategy):
  recipe     no class weights; no label smoothing; no augmented views (clean view only); head-only top;
             FedProx mu 0.01 / 0.1 / 1; FedAdam server lr 0.001 / 0.01 / 0.1
  input      no cell crop; no colour normalisation; stain normalisation; grayscale (each needs new features)
  texture    contract low-pass 48 / 64 px; texture augmentation (blur, down-sampling, sharpening); strong
             colour; low-pass + strong colour (the GPU run's diagnosis: texture stands in for the class);
             the training sites' styles (mean amplitude spectra, federation/style.py) mixed into views
  texture-strategies   the texture recipes under FedProx (mu 1), FedAdam and FedMedian, local logit adjustment
  texture-rounds       the texture recipes with 20 rounds x 1 local epoch
  texture-bn           the texture recipes with the trained stage's BatchNorm statistics frozen
  averaging            the texture recipe with its weights averaged over the last 50 % / 75 % of each local run
  own-styles           texture + amplitude spectra mixed among each site's own cells (nothing shared)
  site-weights         the texture recipe with every site weighing the same in FedAvg / FedProx (not by cells)
  full       full fine-tuning on images (no frozen trunk, fresh augmentation every step)
Model selection reads only `val_balanced_accuracy` (the training sites' pooled val splits); the external
(Barcelona) column is reported, never used to choose.
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

import torch

from federation.augment import AugmentConfig
from federation.benchmark import report
from federation.benchmark.presets import LITE0, LITE0_FULL
from federation.benchmark.protocols import arm_features, leave_one_site_out, paper_layout, run_rows
from federation.sites import DataRoot, resolve_data_root


# The two texture recipes the follow-up groups (strategies, rounds, BatchNorm) run: (augmentation, name).
TEXTURE_RECIPES = (
    (AugmentConfig.texture(), "augmentation: texture"),
    (AugmentConfig.texture_and_style(), "texture + sites' styles (amplitude mix)"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "benchmark" / "ablations")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--only", nargs="*", default=["recipe", "input", "full"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--loso", action="store_true", help="also the leave-one-training-site-out criterion")
    ap.add_argument("--loso-only", action="store_true",
                    help="only the leave-one-site-out criterion, for every seed (no rows trained)")
    ap.add_argument("--arms", nargs="*", default=None, help="only these ablation names")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    data = DataRoot(resolve_data_root(None))
    layout = paper_layout(data)
    rows = []
    t0, c0 = time.time(), time.process_time()

    loso: dict[str, dict[str, float]] = {}

    def run(arm, strategies=("fedavg",), single=False, central=True, params=None):
        if args.arms and arm.name not in args.arms:
            return
        d = arm_features(arm, layout, args.cache, data=data)
        if args.loso_only:
            per_seed = [leave_one_site_out(arm, d, seed) for seed in seeds]
            loso[arm.name] = {k: float(sum(p[k] for p in per_seed) / len(per_seed)) for k in per_seed[0]}
            print(f"{arm.name}: leave-one-site-out, mean over seeds {seeds}: {loso[arm.name]}; "
                  f"per seed: {[round(p['mean'], 3) for p in per_seed]}", flush=True)
            return
        if args.loso and arm.top != "full":
            loso[arm.name] = leave_one_site_out(arm, d, seeds[0])
            print(f"{arm.name}: leave-one-site-out {loso[arm.name]}", flush=True)
        for seed in seeds:
            rows.extend(
                run_rows(
                    arm, d, seed, strategies, single_site=single, centralised=central, strategy_params=params
                )
            )
        save()

    def save():
        report.write_json(
            args.out / "ablations.json",
            {"rows": rows, "wall_seconds": time.time() - t0, "cpu_seconds": time.process_time() - c0},
        )
        table = report.markdown_table(rows, ["internal", "external"])
        val = "\n".join(
            f"- {r['arm']} / {r['row']} seed {r['seed']}: pooled val balanced accuracy "
            f"{r['val_balanced_accuracy']:.3f}"
            for r in rows
            if r.get("val_balanced_accuracy") is not None
        )
        (args.out / "ablations.md").write_text(
            f"{table}\n\nModel-selection criterion (training sites' val):\n\n{val}\n"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    base = LITE0
    if "recipe" in args.only:
        run(
            replace(base, name="default"),
            strategies=("fedavg", "fedprox", "fedadam"),
            params={"fedprox": {"proximal_mu": 0.01}, "fedadam": {"server_lr": 0.01}},
        )
        for mu in (0.1, 1.0):
            run(
                replace(base, name=f"FedProx mu={mu}"),
                strategies=("fedprox",),
                central=False,
                params={"fedprox": {"proximal_mu": mu}},
            )
        for lr in (0.001, 0.1):
            run(
                replace(base, name=f"FedAdam server lr={lr}"),
                strategies=("fedadam",),
                central=False,
                params={"fedadam": {"server_lr": lr}},
            )
        for epochs in (1, 4):
            run(replace(base, name=f"local epochs {epochs}", recipe=replace(base.recipe, local_epochs=epochs)))
        run(replace(base, name="logit adjustment, no class weights",
                    recipe=replace(base.recipe, logit_adjustment=1.0, class_balanced=False)))
        run(replace(base, name="logit adjustment + class weights",
                    recipe=replace(base.recipe, logit_adjustment=1.0)))
        run(replace(base, name="no class weights", recipe=replace(base.recipe, class_balanced=False)))
        run(replace(base, name="no label smoothing", recipe=replace(base.recipe, label_smoothing=0.0)))
        run(replace(base, name="no augmented views (clean only)", views=0))
        run(replace(base, name="head only (linear probe)", top="head", recipe=replace(base.recipe, lr=1e-2)))
    if "input" in args.only:
        run(replace(base, name="no cell crop", cell_crop=0.0))
        run(replace(base, name="no colour normalisation", color_norm="none"))
        run(replace(base, name="stain normalisation", color_norm="stain"))
        run(replace(base, name="grayscale input", color="gray"))
        run(replace(base, name="augmentation: geometry only", augment=AugmentConfig.geometry_only()))
        run(replace(base, name="augmentation: strong colour", augment=AugmentConfig.strong_colour()))
        run(replace(base, name="16 augmented views", views=16))
    if "texture" in args.only:  # optical resolution: the cue that sends sharp lymphocytes to basophil
        run(replace(base, name="default"))
        for side in (48, 64):
            run(replace(base, name=f"contract low-pass {side} px", detail=side))
        run(replace(base, name="augmentation: texture", augment=AugmentConfig.texture()))
        run(replace(base, name="augmentation: strong colour", augment=AugmentConfig.strong_colour()))
        run(replace(base, name="low-pass 64 px + strong colour", detail=64, augment=AugmentConfig.strong_colour()))
        stronger = replace(AugmentConfig.texture(), blur_p=0.7, lowres_p=0.7, sharpen_p=0.4)
        run(replace(base, name="augmentation: texture, stronger", augment=stronger))
        run(replace(base, name="low-pass 64 px + texture", detail=64, augment=AugmentConfig.texture()))
        run(replace(base, name=TEXTURE_RECIPES[1][1], augment=AugmentConfig.texture_and_style()))
        style_only = replace(AugmentConfig(), style_p=0.5)
        run(replace(base, name="sites' styles (amplitude mix)", augment=style_only))
    if "texture-strategies" in args.only:  # the texture recipes under the other aggregation rules
        for augment, label in TEXTURE_RECIPES:
            run(replace(base, name=label, augment=augment), strategies=("fedprox", "fedadam", "fedmedian"),
                central=False, params={"fedprox": {"proximal_mu": 1.0}, "fedadam": {"server_lr": 0.01}})
            # Local logit adjustment (FedLC-style): each site's own class prior, absent classes masked, so
            # the sites without basophils stop pushing every cell away from that class.
            run(replace(base, name=f"{label}, local logit adjustment", augment=augment,
                        recipe=replace(base.recipe, logit_adjustment=1.0, class_balanced=False)))
    if "texture-rounds" in args.only:  # more, shorter rounds: less drift between the sites' models
        for augment, label in TEXTURE_RECIPES:
            run(replace(base, name=f"{label}, 20 rounds x 1 epoch", augment=augment,
                        recipe=replace(base.recipe, rounds=20, local_epochs=1)))
    if "texture-bn" in args.only:  # the trained stage's BatchNorm statistics: per-site and averaged, or fixed
        for augment, label in TEXTURE_RECIPES:
            run(replace(base, name=f"{label}, BatchNorm statistics frozen", augment=augment,
                        recipe=replace(base.recipe, frozen_bn_stats=True)),
                strategies=("fedavg", "fedprox"), params={"fedprox": {"proximal_mu": 1.0}})
    if "averaging" in args.only:  # weight averaging over the tail of every local run (SWA / SWAD)
        texture = replace(base, name="augmentation: texture", augment=AugmentConfig.texture())
        run(texture)
        for tail in (0.5, 0.75):
            run(replace(texture, name=f"texture + weight averaging, last {tail:.0%} of steps",
                        recipe=replace(base.recipe, average_tail=tail)))
    if "own-styles" in args.only:  # amplitude mixed among a site's own cells: texture crosses classes, nothing shared
        run(replace(base, name="augmentation: texture", augment=AugmentConfig.texture()))
        run(replace(base, name="texture + own cells' amplitudes (within-site mix)",
                    augment=AugmentConfig.texture_and_style(), style_source="own cells"),
            strategies=("fedavg", "fedprox"), params={"fedprox": {"proximal_mu": 1.0}})
    if "site-weights" in args.only:  # every site weighs the same: bccd's lymphocytes count as much as LISC's
        run(replace(base, name="augmentation: texture, sites weighted equally", augment=AugmentConfig.texture()),
            strategies=("fedavg", "fedprox"), central=False,
            params={"fedavg": {"uniform_weights": True}, "fedprox": {"proximal_mu": 1.0, "uniform_weights": True}})
    if "full" in args.only:
        run(LITE0_FULL)
    save()
    print(f"done in {time.time() - t0:.0f} s ({time.process_time() - c0:.0f} CPU-s)")


if __name__ == "__main__":
    main()
