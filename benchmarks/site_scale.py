"""Framing by the site's cell size instead of each cell's own: does keeping relative size help a new hospital?

    .venv/bin/python benchmarks/site_scale.py --seeds 0,1,2 --loso

The shipped crop frames every cell at 1.3 x its own located diameter, so a lymphocyte and a basophil
arrive the same size: the network never sees that lymphocytes are the small cells. Measured with the
locator (`models.cellcrop.locate_cell`), a site's lymphocytes are 0.78-0.90 and its basophils 1.07-1.13
of the site's median cell, at `tehran-lisc` and at Barcelona alike (AUC 0.96-0.98 lymphocyte vs basophil
by that ratio alone), while raw pixel sizes differ by 2x between sites (magnification).

Here each image is framed at `scale` x its *site's* median located diameter (centre still the cell's):
the site median is one number per site, computed from its own cells without labels (Barcelona's from
its cells of the five classes; a deployment would compute it from the cells it receives). Everything
else is the shipped arm (EfficientNet-Lite0 128 px, white balance, texture augmentation, frozen trunk +
last stage, cached views). Rows: centralised and FedAvg per seed, the leave-one-site-out criterion,
Barcelona's lymphocyte and basophil recall. Each framing has its own cache root (var/benchmark-site-*).
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

import federation.prepared as prepared_module
from federation.augment import AugmentConfig
from federation.benchmark.presets import LITE0
from federation.benchmark.protocols import _TopTrainers, arm_features, leave_one_site_out, paper_layout
from federation.benchmark.report import _mean_sd
from federation.sites import DataRoot, resolve_data_root
from models.calibration import softmax
from models.cellcrop import _analyse, _cut, white_balance
from models.contract import CellCrop
from models.evaluate import compute_metrics
from models.preprocess import to_rgb


def site_diameters(samples, cache: Path) -> dict[str, float]:
    """Median located diameter per site over all its listed cells (labels unused), cached as JSON."""
    path = cache / "site-diameters.json"
    if path.is_file():
        return json.loads(path.read_text())
    found: dict[str, list[float]] = {}
    for s in samples:
        with Image.open(s.path) as img:
            found.setdefault(s.site, []).append(_analyse(to_rgb(img)).diameter)
    out = {site: float(np.median(d)) for site, d in found.items()}
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    return out


def site_framed_prepare(site_of: dict[str, str], diameters: dict[str, float], scale: float):
    """`prepare` with the square's side = scale x the site's median diameter, centred on the cell."""

    def prepare(image, contract):
        rgb = to_rgb(image)
        found = _analyse(rgb)._replace(diameter=diameters[site_of[str(getattr(image, "filename", ""))]])
        return white_balance(_cut(rgb, found, CellCrop(scale=scale)))

    return prepare


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--scales", default="1.6", help="frame sides as multiples of the site's median diameter")
    ap.add_argument("--zooms", default="0.8-1.25,0.9-1.1", help="augmentation zoom ranges for site framing")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loso", action="store_true")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    data_root = DataRoot(resolve_data_root(None))
    layout = paper_layout(data_root)
    shipped = replace(LITE0, name="shipped: cell-framed 1.3", augment=AugmentConfig.texture())
    arms = [] if args.no_baseline else [(shipped, ROOT / "var" / "benchmark", None)]
    diameters = site_diameters(layout.samples, ROOT / "var" / "benchmark-site")
    print("site median diameters (px):", {k: round(v, 1) for k, v in diameters.items()}, flush=True)
    site_of = {str(s.path): s.site for s in layout.samples}
    for scale in (float(v) for v in args.scales.split(",")):
        for zoom in args.zooms.split(","):
            lo, hi = (float(v) for v in zoom.split("-"))
            augment = replace(AugmentConfig.texture(), zoom=(lo, hi))
            arm = replace(shipped, name=f"site-framed {scale}, zoom {lo}-{hi}", cell_crop=scale, augment=augment)
            arms.append((arm, ROOT / "var" / f"benchmark-site-{scale}", site_framed_prepare(site_of, diameters, scale)))
    original = prepared_module.prepare
    classes = None
    table = []
    for arm, cache, prepare in arms:
        prepared_module.prepare = prepare or original
        d = arm_features(arm, layout, cache, data=data_root)
        prepared_module.prepare = original
        classes = d.contract.class_names
        print(f"[{time.time() - t0:.0f} s] {arm.name}: features ready", flush=True)
        if args.loso:
            per_seed = [leave_one_site_out(arm, d, s) for s in seeds]
            loso = {k: float(np.mean([p[k] for p in per_seed])) for k in per_seed[0]}
            print(f"{arm.name}: LOSO {loso['mean']:.3f} per seed {[round(p['mean'], 3) for p in per_seed]} "
                  f"({', '.join(f'{k} {v:.3f}' for k, v in loso.items())})", flush=True)
        trainers = _TopTrainers(arm, d)
        scores: dict[tuple[str, str], list[float]] = {}
        for seed in seeds:
            for row, model in (("centralised", trainers.pooled(trainers.site_names, seed)),
                               ("FedAvg", trainers.federated("fedavg", seed, {}))):
                for name, (x, y) in d.evaluation.items():
                    m = compute_metrics(classes, y, softmax(model.logits(x)))
                    scores.setdefault((row, name), []).append(m.balanced_accuracy)
                    if name == "external":
                        for c in ("lymphocyte", "basophil"):
                            scores.setdefault((row, c), []).append(float(m.recall[classes.index(c)]))
                print(f"{arm.name} | {row} | seed {seed} | " + " | ".join(
                    f"{k[1]} {v[-1]:.3f}" for k, v in scores.items() if k[0] == row), flush=True)
        for row in ("centralised", "FedAvg"):
            line = f"| {arm.name} | {row} | " + " | ".join(
                _mean_sd(scores[row, k]) for k in (*d.evaluation, "lymphocyte", "basophil")) + " |"
            table.append(line)
            print(line, flush=True)
    print("\n| arm | row | " + " | ".join(("internal", "external", "Barcelona lymphocyte recall", "basophil recall")) + " |")
    print("|---|---|---|---|---|---|")
    print("\n".join(table))
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
