"""Inside the training sites FedAvg trails the centralised model (0.91 vs 0.95): where, and what closes it?

    .venv/bin/python benchmarks/client_drift.py --seeds 0,1,2                 # 6 min with the caches built
    .venv/bin/python benchmarks/client_drift.py --seeds 0,1 --personal        # and each site's own version

The shipped arm's cached features (var/benchmark, `benchmarks/tta.py shipped_arm`); the network alone with
the shipped test-time views (no size or granule opinion, which add the same to every row), scored on the
pooled internal test cells (balanced accuracy, and each site's accuracy on its own cells) and Barcelona.

FedAvg runs here in a plain loop over the sites (the sites' own `train_top`, their seeds, the cell-weighted
average of every top tensor as `federation.strategies` takes it) so that the variants can change what a
round does; the `flower-fedavg` row is the benchmark's Flower run of the same seed, to show the loop
reproduces it. Variants (Barcelona is reported, never used to choose):

- `scaffold`: SCAFFOLD's control variates (Karimireddy et al. 2020, option I): at each round's start every
  site computes its training loss's full gradient at the global weights; each local step adds the
  cell-weighted mean of those gradients minus its own, so that every site descends the federation's
  objective rather than its own. One extra exchange per round (the gradients, as large as the top);
  `scaffold-stale` is the classic one-exchange form, the variates from the previous round's start.
- `etf:S`: the classifier fixed at a simplex equiangular tight frame of row norm S and never trained
  (FedBABU, Oh et al. 2022; FedETF, Li et al. 2023): with label skew each site's classifier is what drifts
  toward its own classes; fixed, every site pulls its cells toward the same class directions
  (`TrainConfig.frozen_classifier`).
- `--personal`: each training site fine-tunes the federated top on its own train cells (what `wbc adapt`
  does with reviewed cells) and scores its own test cells with it, against each site trained alone.
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
import torch.nn.functional as F

from benchmarks.tta import fixed_view_features, shipped_arm
from federation.benchmark.protocols import _TopTrainers
from federation.benchmark.runs import fresh_split
from federation.client_app import site_seed
from federation.prepared import PreparedImages
from federation.task import class_weights
from federation.top_training import top_logits, train_top, view_batches
from federation.trunk import Split
from models.calibration import softmax
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS


def simplex_etf(split: Split, seed: int, scale: float) -> None:
    """The classifier's rows: K unit directions at equal angles (cos = -1/(K-1)) in a random subspace, x scale."""
    lin = split.model.get_classifier()
    k, dim = lin.weight.shape
    basis, _ = torch.linalg.qr(torch.randn(dim, k, generator=torch.Generator().manual_seed(seed)))
    frame = (k / (k - 1)) ** 0.5 * basis @ (torch.eye(k) - torch.ones(k, k) / k)
    with torch.no_grad():
        lin.weight.copy_(scale * frame.T)
        lin.bias.zero_()


class Drift:
    def __init__(self, cache: Path):
        self.arm, self.layout, self.data, trunk = shipped_arm(cache)
        self.recipe = self.arm.recipe
        self.classes = list(self.data.contract.class_names)
        self.views = {}
        for name, idx in self.layout.evaluation.items():
            samples = [self.layout.samples[i] for i in idx]
            prepared = PreparedImages.build(samples, self.data.contract, cache / "prepared")
            self.views[name] = fixed_view_features(trunk, samples, prepared, self.data.contract,
                                                   VIEW_SETS["turns-zooms"], cache / "features")
        self.site_of = np.array([self.layout.samples[i].site for i in self.layout.evaluation["internal"]])
        self.sites = sorted(self.data.sites)

    def answers(self, split: Split, name: str, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        return np.mean([softmax(top_logits(split, f[rows])) for f in self.views[name].values()], axis=0)

    def score(self, internal: np.ndarray, external: np.ndarray | None) -> dict[str, object]:
        """`external` None: a row with no single model for a new hospital (each site's own versions)."""
        (_, y_int), (_, y_ext) = self.data.evaluation["internal"], self.data.evaluation["external"]
        pred = internal.argmax(1)
        out = {"internal": compute_metrics(self.classes, y_int, internal).balanced_accuracy,
               **{s: float(np.mean(pred[self.site_of == s] == y_int[self.site_of == s])) for s in self.sites}}
        if external is not None:
            ext = compute_metrics(self.classes, y_ext, external)
            out |= {"external": ext.balanced_accuracy, "recall": [float(r) for r in ext.recall]}
        return out

    def site_gradient(self, split: Split, names: list[str], site: str, seed: int) -> list[torch.Tensor]:
        """The site's training loss (its class weights, label smoothing, one view per cell), full-data
        gradient at the current weights; BatchNorm statistics left as they were."""
        d, r = self.data.sites[site], self.recipe
        params = dict(split.model.named_parameters())
        wanted = [params[n] for n in names]
        state = {k: v.clone() for k, v in split.model.state_dict().items()}
        steps, batches = view_batches(d.train_x, d.train_y, r.batch_size, seed)
        weight = class_weights(d.train_y.tolist(), len(self.classes), r.class_weight_cap, None)
        total = [torch.zeros_like(p) for p in wanted]
        split.top.train()
        for inputs, labels in batches(0):
            loss = F.cross_entropy(split.top(inputs), labels, weight=weight, label_smoothing=r.label_smoothing)
            for acc, g in zip(total, torch.autograd.grad(loss, wanted)):
                acc += g
        split.model.load_state_dict(state)
        return [g / steps for g in total]

    def federate(self, seed: int, mode: str) -> Split:
        split = fresh_split(self.data.contract, self.arm.top, seed)
        frozen = mode.startswith("etf")
        if frozen:
            simplex_etf(split, seed, float(mode.split(":")[1]))
        keys = set(split.top_state_keys())
        names = [n for n, _ in split.model.named_parameters() if n in keys]
        cells = {s: len(self.data.sites[s].train_y) for s in self.sites}
        share = {s: c / sum(cells.values()) for s, c in cells.items()}
        state = {k: v.clone() for k, v in split.top_state().items()}
        variates: dict[str, list[torch.Tensor]] = {}
        for rnd in range(1, self.recipe.rounds + 1):
            correction: dict[str, list[torch.Tensor]] = {}
            if mode.startswith("scaffold"):
                fresh = {}
                for s in self.sites:
                    split.load_top_state(state)
                    fresh[s] = self.site_gradient(split, names, s, site_seed(seed, rnd, s) + 1)
                if mode == "scaffold":
                    variates = fresh
                if variates:
                    mean = [sum(share[s] * variates[s][j] for s in self.sites) for j in range(len(names))]
                    correction = {s: [m - own for m, own in zip(mean, variates[s])] for s in self.sites}
                variates = fresh  # scaffold-stale: this round's go to the next round
            summed = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in state.items()}
            for s in self.sites:
                d = self.data.sites[s]
                split.load_top_state(state)
                config = replace(self.recipe.train_config(self.recipe.local_epochs, site_seed(seed, rnd, s)),
                                 frozen_classifier=frozen)
                train_top(split, d.train_x, d.train_y, len(self.classes), config,
                          gradient_correction=correction.get(s))
                for k, v in split.top_state().items():
                    summed[k] += share[s] * v.double()
            state = {k: summed[k].to(v.dtype) if v.is_floating_point() else v for k, v in state.items()}
        split.load_top_state(state)
        return split

    def personalised(self, seed: int, start: Split | None, epochs: int) -> np.ndarray:
        """Each site's own version (the federated top fine-tuned on its train cells, or trained alone from
        the fresh start when `start` is None) answering its own internal test cells."""
        out = np.zeros((len(self.site_of), len(self.classes)))
        begin = {k: v.clone() for k, v in start.top_state().items()} if start is not None else None
        for s in self.sites:
            d = self.data.sites[s]
            split = fresh_split(self.data.contract, self.arm.top, seed)
            if begin is not None:
                split.load_top_state(begin)
            train_top(split, d.train_x, d.train_y, len(self.classes),
                      self.recipe.train_config(epochs, site_seed(seed, 99, s)))
            rows = self.site_of == s
            out[rows] = self.answers(split, "internal", rows)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--modes", default="flower-fedavg,fedavg,scaffold,scaffold-stale,etf:0.1,etf:0.3,etf:1")
    ap.add_argument("--personal", action="store_true",
                    help="also each site's own version: FedAvg fine-tuned on its cells, and the site alone")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    bench = Drift(args.cache)
    trainers = _TopTrainers(bench.arm, bench.data)
    rows: dict[str, list[dict]] = {}
    modes = ["centralised", *args.modes.split(",")]
    for seed in [int(s) for s in args.seeds.split(",")]:
        for mode in modes:
            if mode == "centralised":
                split = trainers.pooled(bench.sites, seed).split
            elif mode == "flower-fedavg":
                split = trainers.federated("fedavg", seed, {}).split
            else:
                split = bench.federate(seed, mode)
            result = bench.score(bench.answers(split, "internal"), bench.answers(split, "external"))
            rows.setdefault(mode, []).append(result)
            print(f"[{time.time() - t0:.0f} s] seed {seed} {mode}: internal {result['internal']:.3f} "
                  f"Barcelona {result['external']:.3f}", flush=True)
            if args.personal and mode == "fedavg":
                for tag, start, epochs in (("fedavg, then each site's own version: 2 epochs on its cells", split, 2),
                                           ("fedavg, then each site's own version: 10 epochs on its cells", split, 10),
                                           ("each site alone, 10 epochs (its own version)", None, 10)):
                    rows.setdefault(tag, []).append(bench.score(bench.personalised(seed, start, epochs), None))
    short = " / ".join(s.split("-")[0] for s in bench.sites)
    print(f"\n| row | internal | each site's own cells ({short}) | Barcelona | Barcelona recall "
          f"{' / '.join(c[:4] for c in bench.classes)} | seeds |")
    print("|---|---|---|---|---|---|")
    for mode, results in rows.items():
        def stat(key: str) -> str:
            if key not in results[0]:
                return "—"
            return f"{np.mean([r[key] for r in results]):.3f} ± {np.std([r[key] for r in results]):.3f}"

        recall = " / ".join(f"{v:.2f}" for v in np.mean([r["recall"] for r in results], axis=0)) if "recall" in results[0] else "—"
        own = " / ".join(f"{np.mean([r[s] for r in results]):.2f}" for s in bench.sites)
        print(f"| {mode} | {stat('internal')} | {own} | {stat('external')} | {recall} | {len(results)} |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
