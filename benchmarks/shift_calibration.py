"""Which validation cells should fit the temperature, so that it still holds at a hospital never seen?

    .venv/bin/python benchmarks/shift_calibration.py --seeds 0,1,2

The shipped rule fits the temperature on the training sites' clean validation cells (T_val ~ 0.4: the
label-smoothed models are under-confident in-domain, so it sharpens them) and a new hospital, right two
times in three, then gets over-confident answers: the deployed runs' Barcelona ECE went from 0.034 to
0.134. Calibration for domain drift (Tomani et al., CVPR 2021) fits it instead on validation cells that
were perturbed the way hospitals differ. Each site can do that with its own cells and nothing else: it
renders K perturbed copies of each validation cell (the training augmentation, seeded) and sends their
calibration summary beside the clean one.

Rows (the shipped arm: EfficientNet-Lite0, frozen trunk + trained last stage, texture augmentation,
cached training views, the shipped test-time views `turns-zooms` on every scored cell): FedAvg, FedProx
μ = 1 and centralised, each seed. Temperature rules compared: fitted on clean validation (shipped),
on the perturbed copies, on clean + perturbed pooled, never below 1 (`soften-only`). Scored: ECE and NLL
on the internal test cells and on every Barcelona cell of the five shared classes, and the oracle
temperature on Barcelona (reported, never used). The criterion that may choose (never Barcelona): the
same rules for a centralised model trained on two training sites, scored on the third (LOSO).
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

from benchmarks.tta import fixed_view_features, shipped_arm
from federation.augment import AugmentConfig, CellAugment
from federation.features import cache_key, render_view
from federation.prepared import PreparedImages
from federation.benchmark.protocols import _TopTrainers
from models.calibration import CalibrationSummary, pool, softmax
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS, apply_view

VIEWS = VIEW_SETS["turns-zooms"]
PERTURBATIONS = {
    "texture": AugmentConfig.texture(),  # what the sites train with
    "strong colour": AugmentConfig.strong_colour(),
}


def perturbed_view_features(trunk, samples, prepared, contract, augment, copies, seed, cache_dir: Path) -> list[dict]:
    """For each of `copies` seeded perturbed renders of every cell: trunk outputs of each test-time view."""
    aug = CellAugment(contract.input_size, augment)
    out = []
    for copy in range(1, copies + 1):
        key = cache_key(contract, trunk.top_name, samples, copy, augment, seed, variant="perturbed-turns-zooms")
        path = cache_dir / f"perturbed-{contract.architecture}-{trunk.top_name}-{contract.input_size}-{key}.npz"
        if not path.is_file():
            parts: dict[int, list[np.ndarray]] = {k: [] for k in range(len(VIEWS))}
            for start in range(0, len(samples), 64):
                idx = range(start, min(start + 64, len(samples)))
                x = torch.from_numpy(np.stack([render_view(prepared, i, copy, contract, aug, seed) for i in idx]))
                for k, view in enumerate(VIEWS):
                    parts[k].append(trunk.trunk_features(apply_view(x, view)).numpy().astype(np.float16))
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(path, **{str(k): np.concatenate(v) for k, v in parts.items()})
        stored = np.load(path)
        out.append({view: stored[str(k)].astype(np.float32) for k, view in enumerate(VIEWS)})
    return out


def viewed_logits(model, by_view: dict) -> np.ndarray:
    """What the exported graph answers: log of the mean softmax over the test-time views."""
    return np.log(np.clip(np.mean([softmax(model.logits(by_view[v])) for v in VIEWS], axis=0), 1e-12, None))


def rules(clean: CalibrationSummary, perturbed: dict[str, CalibrationSummary]) -> dict[str, float]:
    t_clean = clean.best_temperature()
    out = {"clean (shipped)": t_clean, "soften-only": max(1.0, t_clean)}
    for name, s in perturbed.items():
        out[f"{name} copies"] = s.best_temperature()
        out[f"clean + {name} copies"] = (clean + s).best_temperature()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--copies", type=int, default=4, help="perturbed renders per validation cell")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-loso", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    arm, layout, data, trunk = shipped_arm(args.cache)
    contract, classes = data.contract, data.contract.class_names
    fcache = args.cache / "features"

    def views_of(idx):
        samples = [layout.samples[i] for i in idx]
        prepared = PreparedImages.build(samples, contract, args.cache / "prepared")
        return samples, prepared, fixed_view_features(trunk, samples, prepared, contract, VIEWS, fcache)

    val, val_perturbed = {}, {}
    for site, idx in layout.val.items():
        samples, prepared, feats = views_of(idx)
        val[site] = (layout.y[idx], feats)
        val_perturbed[site] = {
            name: perturbed_view_features(trunk, samples, prepared, contract, aug, args.copies, 0, fcache)
            for name, aug in PERTURBATIONS.items()
        }
    scored = {name: (layout.y[idx], views_of(idx)[2]) for name, idx in layout.evaluation.items()}
    print(f"[{time.time() - t0:.0f} s] views ready", flush=True)

    def summaries(model, sites):
        clean = pool(CalibrationSummary.from_logits(viewed_logits(model, val[s][1]), val[s][0]) for s in sites)
        perturbed = {
            name: pool(
                CalibrationSummary.from_logits(viewed_logits(model, copy), val[s][0])
                for s in sites
                for copy in val_perturbed[s][name]
            )
            for name in PERTURBATIONS
        }
        return clean, perturbed

    trainers = _TopTrainers(arm, data)
    results: dict[tuple[str, str], list[dict]] = {}
    print("| row | seed | rule | T | internal ECE | Barcelona ECE | Barcelona NLL | Barcelona oracle T | Barcelona bal. acc. |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed in seeds:
        models = {
            "FedAvg": trainers.federated("fedavg", seed, {}),
            "FedProx mu=1": trainers.federated("fedprox", seed, {"proximal_mu": 1.0}),
            "centralised": trainers.pooled(trainers.site_names, seed),
        }
        for row, model in models.items():
            clean, perturbed = summaries(model, trainers.site_names)
            logits = {name: viewed_logits(model, feats) for name, (_, feats) in scored.items()}
            ext = CalibrationSummary.from_logits(logits["external"], scored["external"][0])
            internal = CalibrationSummary.from_logits(logits["internal"], scored["internal"][0])
            ba = compute_metrics(classes, scored["external"][0], softmax(logits["external"])).balanced_accuracy
            for rule, t in rules(clean, perturbed).items():
                r = {"T": t, "internal": internal.ece(t), "external": ext.ece(t), "nll": ext.nll(t),
                     "oracle": ext.best_temperature(), "ba": ba}  # fmt: skip
                results.setdefault((row, rule), []).append(r)
                print(f"| {row} | {seed} | {rule} | {t:.2f} | {r['internal']:.3f} | {r['external']:.3f} | "
                      f"{r['nll']:.3f} | {r['oracle']:.2f} | {ba:.3f} |", flush=True)  # fmt: skip
    print(f"\nmeans ± sd over seeds {args.seeds} [{time.time() - t0:.0f} s]")
    print("| row | rule | T | internal ECE | Barcelona ECE | Barcelona NLL | Barcelona oracle T |")
    print("|---|---|---|---|---|---|---|")
    for (row, rule), rs in results.items():
        m = lambda k: f"{np.mean([r[k] for r in rs]):.3f} ± {np.std([r[k] for r in rs]):.3f}"
        print(f"| {row} | {rule} | {np.mean([r['T'] for r in rs]):.2f} | {m('internal')} | {m('external')} | "
              f"{m('nll')} | {np.mean([r['oracle'] for r in rs]):.2f} |")  # fmt: skip
    if not args.no_loso:
        loso(trainers, layout, views_of, val, val_perturbed, summaries, seeds, t0)


def loso(trainers, layout, views_of, val, val_perturbed, summaries, seeds, t0) -> None:
    """The criterion: centralised on two training sites (T from their validation cells by each rule),
    ECE on every train + val cell of the third, mean over the three held-out sites."""
    held = {}
    for site in trainers.site_names:
        idx = layout.train[site] + layout.val[site]
        held[site] = (layout.y[idx], views_of(idx)[2])
    ece: dict[str, list[float]] = {}
    for seed in seeds:
        for site, (y, feats) in held.items():
            others = [s for s in trainers.site_names if s != site]
            model = trainers.pooled(others, seed)
            clean, perturbed = summaries(model, others)
            target = CalibrationSummary.from_logits(viewed_logits(model, feats), y)
            for rule, t in rules(clean, perturbed).items():
                ece.setdefault(rule, []).append(target.ece(t))
                ece.setdefault(f"{rule} [{site}]", []).append(target.ece(t))
    print(f"\nLOSO ECE (held-out training site; mean over sites and seeds {seeds}) [{time.time() - t0:.0f} s]")
    print("| rule | mean | " + " | ".join(trainers.site_names) + " |")
    print("|---|---|" + "---|" * len(trainers.site_names))
    for rule in [r for r in ece if "[" not in r]:
        per_site = " | ".join(f"{np.mean(ece[f'{rule} [{s}]']):.3f}" for s in trainers.site_names)
        print(f"| {rule} | {np.mean(ece[rule]):.3f} | {per_site} |")


if __name__ == "__main__":
    main()
