"""Protocol 3 of the benchmark protocols (the stretch): each of the four sites in turn is the new hospital,
the other three train; the served model as shipped against centralised and each training site alone.

    .venv/bin/python benchmarks/leave_one_site_out.py --seeds 0,1,2          # ~30 min cold, caches in var/benchmark
    .venv/bin/python benchmarks/leave_one_site_out.py --seeds 0 --held bccd
    .venv/bin/python benchmarks/leave_one_site_out.py --plot var/benchmark/leave-one-site-out.json   # the plot again

Barcelona held out is protocol 1 (docs/results.md, "Granules"); the other three rows ask whether what was
built for Barcelona travels to any new hospital, including one whose cells look nothing like it (the three
small sites crop tightly, at other magnifications and stains, with few cells per class). Barcelona then
trains as a site of its own (its train split, five classes), the largest of the three.

Every row is scored as the product serves it (`benchmarks/fedavg_variants.py`): the shipped arm (frozen
EfficientNet-Lite0 trunk, texture augmentation, a pool of cached views per cell), the shipped test-time
views, the product's temperature rule (fitted on the training sites' val cells as served), the size
opinion at weight 2 and the granule opinion at weight 1 against each site's neutrophils (the held-out
site's: the cells the row's network calls neutrophils among all its images, as `wbc data site-scale`
measures them; a single site's Gaussians from its own cells only). FedAvg is the served model: the mean of
the five rounds' global models. Nothing here was chosen on these figures.
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

from benchmarks.fedavg_variants import REPORTED, Scores, averaged, prepare, score_served, train_variant
from federation.benchmark.protocols import PROTOCOL_SITES, _TopTrainers
from federation.benchmark.report import _mean_sd

GRANULE_WEIGHT = 1.0  # the shipped `granule-weight`
AVERAGED_ROUNDS = 5  # the shipped `average-rounds`


def held_out_rows(held: str, seeds: list[int], cache: Path, t0: float) -> tuple[Scores, list[str]]:
    """Scores of FedAvg (served), centralised and each training site alone, with `held` as the new hospital."""
    b = prepare(cache, external_site=held)
    training = list(b.layout.train)
    print(f"[{time.time() - t0:.0f} s] {held} held out: features, views and measures ready "
          f"(training at {', '.join(training)})", flush=True)
    trainers = _TopTrainers(b.arm, b.data)
    scores: Scores = {}
    for seed in seeds:
        fedavg = train_variant(b, "shipped", training, seed, cache)
        served = averaged(fedavg, fedavg.round_states[-AVERAGED_ROUNDS:])
        score_served(b, [served], "FedAvg", scores, product=True, granule_weight=GRANULE_WEIGHT)
        score_served(b, [trainers.pooled(training, seed)], "centralised", scores, product=True,
                     granule_weight=GRANULE_WEIGHT)
        for site in training:
            score_served(b, [trainers.pooled([site], seed)], f"{site} alone", scores, product=True,
                         granule_weight=GRANULE_WEIGHT, sites=[site])
        print(f"[{time.time() - t0:.0f} s] {held} held out, seed {seed}: " + ", ".join(
            f"{name} {scores[name, 'external'][-1]:.3f}" for name in dict.fromkeys(k[0] for k in scores)), flush=True)
    return scores, training


def plot(results: dict[str, dict], path: Path) -> Path:
    """Per held-out site: FedAvg (served), centralised and each training site alone, mean and sd over seeds
    (the sample sd, as the tables print it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.6), sharey=True, squeeze=False)
    for ax, (held, result) in zip(axes[0], results.items()):
        rows = result["rows"]
        names = list(rows)
        means = [float(np.mean(rows[n]["external"])) for n in names]
        sds = [float(np.std(rows[n]["external"], ddof=1)) if len(rows[n]["external"]) > 1 else 0.0 for n in names]
        colours = ["tab:blue" if n == "FedAvg" else "tab:gray" if n == "centralised" else "tab:orange" for n in names]
        ax.bar(range(len(names)), means, yerr=sds, color=colours, capsize=3)
        ax.set_xticks(range(len(names)), [n.removesuffix(" alone") for n in names], rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{held} held out", fontsize=9)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("balanced accuracy at the held-out site")
    fig.suptitle("Leave one site out: FedAvg (served, blue), centralised (gray), one site alone (orange)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--held", default=",".join(PROTOCOL_SITES), help="the sites held out in turn")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "var" / "benchmark" / "leave-one-site-out.json")
    ap.add_argument("--plot", type=Path, help="only draw the plot of this earlier run's JSON (beside it, .png)")
    args = ap.parse_args()
    if args.plot:
        print(plot(json.loads(args.plot.read_text()), args.plot.with_suffix(".png")))
        return
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.time()
    results: dict[str, dict] = {}
    tables = []
    for held in args.held.split(","):
        scores, training = held_out_rows(held, seeds, args.cache, t0)
        rows = list(dict.fromkeys(k[0] for k in scores))
        singles = {name: float(np.mean(scores[name, "external"])) for name in rows if name.endswith(" alone")}
        best = max(singles, key=singles.get)
        fed = float(np.mean(scores["FedAvg", "external"]))
        results[held] = {
            "training_sites": training, "seeds": seeds, "best_single_site": best,
            "margin_over_best_single_site": fed - singles[best],
            "rows": {name: {k: scores[name, k] for k in ("internal", "external", "ece", *REPORTED)} for name in rows},
        }
        tables.append((held, rows, scores, best, fed - singles[best]))
    for held, rows, scores, best, margin in tables:
        print(f"\n{held} held out (the new hospital), {len(seeds)} seeds; FedAvg over the best single site "
              f"({best}): {margin:+.3f}")
        print(f"| row | internal | {held} | {held} ECE | {held} recall " + " / ".join(c[:4] for c in REPORTED) + " |")
        print("|---|---|---|---|---|")
        for name in rows:
            print(f"| {name} | {_mean_sd(scores[name, 'internal'])} | {_mean_sd(scores[name, 'external'])} | "
                  f"{_mean_sd(scores[name, 'ece'])} | " + " / ".join(f"{np.mean(scores[name, c]):.2f}" for c in REPORTED)
                  + " |")
    print("\n| held out | FedAvg (served) | centralised | best single site | FedAvg − best single |")
    print("|---|---|---|---|---|")
    for held, rows, scores, best, margin in tables:
        print(f"| {held} | {_mean_sd(scores['FedAvg', 'external'])} | {_mean_sd(scores['centralised', 'external'])} | "
              f"{best.removesuffix(' alone')} {_mean_sd(scores[best, 'external'])} | {margin:+.3f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"[{time.time() - t0:.0f} s] {args.out}, {plot(results, args.out.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
