"""BatchNorm statistics re-estimated on a new hospital's unlabelled cells (AdaBN): does Barcelona gain?

    .venv/bin/python benchmarks/adabn.py --seeds 0,1,2 --adapt-cells 100,500
    .venv/bin/python benchmarks/adabn.py --seeds 0,1,2 --adapt-cells 500 --size   # with the shipped size opinion
    .venv/bin/python benchmarks/adabn.py --seeds 0,1,2 --adapt-cells 500 --size --rows "FedAvg,FedAvg mean of rounds"

The shipped recipe's arm (EfficientNet-Lite0, frozen trunk + trained last stage, texture augmentation),
FedAvg and centralised rows trained exactly as `benchmarks/ablations.py` trains them. Barcelona never
trains anything: `--adapt-cells` N of its *train* split (seeded draw, labels unused) give the BatchNorm
statistics (`models.batchnorm.adapt_batchnorm`), and the model is scored on its *test* split, which the
statistics never saw. Rows per model: as trained; the trained stage's statistics re-estimated by the three
training sites on their train cells' clean views and averaged (what a federation could do after a round);
Barcelona's statistics for the trained stage only (what `wbc adapt --unlabelled` ships); for the frozen
trunk and the stage. Internal (the training sites' test splits) and Barcelona, each on the clean view
and with the shipped test-time views (turns-zooms). The adapted trunk's features are computed, not cached.
"""

from __future__ import annotations

import argparse
import copy
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
from federation.features import render_view
from federation.top_training import top_logits
from federation.prepared import PreparedImages
from federation.benchmark.protocols import _TopTrainers
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import fresh_split
from models.batchnorm import adapt_batchnorm
from models.calibration import softmax
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS, View, apply_view

VIEWS = VIEW_SETS["turns-zooms"]


def _mean_of_rounds(trainers, seed: int):
    """FedAvg as shipped since `average-rounds = 5`: the mean of the five rounds' global models."""
    from benchmarks.fedavg_variants import averaged
    from federation.benchmark.runs import train_federated

    from models.calibration import CalibrationSummary, pool

    d, arm = trainers.data, trainers.arm
    model = train_federated("fedavg", d.contract, arm.top, d.sites, arm.recipe, seed, keep_rounds=True)
    mean = averaged(model, model.round_states[-5:])
    # Its own temperature, as the server fits it: the sites' val summaries of the mean, pooled.
    mean.val_calibration = pool(CalibrationSummary.from_logits(mean.logits(s.val_x), s.val_y) for s in d.sites.values())
    return mean


ROWS = {
    "FedAvg": lambda t, seed: t.federated("fedavg", seed, {}),
    "FedAvg mean of rounds": _mean_of_rounds,
    "FedProx mu=1": lambda t, seed: t.federated("fedprox", seed, {"proximal_mu": 1.0}),
    "FedMedian": lambda t, seed: t.federated("fedmedian", seed, {}),
    "FedAdam": lambda t, seed: t.federated("fedadam", seed, {}),
    "centralised": lambda t, seed: t.pooled(t.site_names, seed),
    **{f"{site} alone": (lambda site: lambda t, seed: t.pooled([site], seed))(site)
       for site in ("tehran-lisc", "jiangxi-tecom", "bccd")},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--adapt-cells", default="500", help="comma list: Barcelona train cells per adaptation")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", default="FedAvg,centralised", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--per-site", action="store_true", help="also: each training site scored with its own statistics")
    ap.add_argument("--entropy", type=int, default=0, help="also: N epochs of entropy minimisation (TENT) after AdaBN")
    ap.add_argument("--size", action="store_true",
                    help="also Barcelona with the shipped size opinion (models.size_prior, weight 2, anchored on "
                         "neutrophils: Barcelona's reference = the cells each variant's top calls neutrophils over "
                         "all its images, clean view; the row's fitted temperature first, as the product applies it)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    arm, layout, data, trunk = shipped_arm(args.cache)
    contract, classes = data.contract, data.contract.class_names
    external = [layout.samples[i] for i in layout.evaluation["external"]]
    pool = [s for s in external if s.split == "train"]
    test = [s for s in external if s.split == "test"]
    y_test = np.array([classes.index(s.label) for s in test])
    prep_test = PreparedImages.build(test, contract, args.cache / "prepared")
    plain_test = fixed_view_features(trunk, test, prep_test, contract, VIEWS, args.cache / "features")
    print(f"[{time.time() - t0:.0f} s] {len(test)} Barcelona test cells; adaptation pool {len(pool)} train cells")

    adapted = {}  # n -> (adapt-cell features from the plain trunk, from the adapted trunk, adapted test views)
    for n in (int(v) for v in args.adapt_cells.split(",")):
        rng = np.random.default_rng(0)
        cells = [pool[i] for i in sorted(rng.choice(len(pool), min(n, len(pool)), replace=False))]
        prep = PreparedImages.build(cells, contract, args.cache / "prepared")
        inputs = [torch.from_numpy(batch) for batch in _batches(prep, contract, range(len(cells)))]
        plain_cells = torch.cat([trunk.trunk_features(x) for x in inputs])
        site_trunk = fresh_split(contract, arm.top, seed=0)
        adapt_batchnorm(site_trunk.model, inputs)  # the trunk's statistics; the top's are redone per model
        site_cells = torch.cat([site_trunk.trunk_features(x) for x in inputs])
        site_test = {view: _features(site_trunk, prep_test, contract, view) for view in VIEWS}
        adapted[n] = (plain_cells, site_cells, site_test)
        print(f"[{time.time() - t0:.0f} s] trunk adapted on {len(cells)} cells", flush=True)

    internal = [layout.samples[i] for i in layout.evaluation["internal"]]
    y_internal = np.array([classes.index(s.label) for s in internal])
    prep_internal = PreparedImages.build(internal, contract, args.cache / "prepared")
    plain_internal = fixed_view_features(trunk, internal, prep_internal, contract, VIEWS, args.cache / "features")
    rows = args.rows.split(",")
    internal_site = np.array([s.site for s in internal])
    if args.size:
        size = _size_setup(layout, data, trunk, contract, args.cache, test)
    trainers = _TopTrainers(arm, data)
    sites = {name: site.train_x[:, 0] for name, site in data.sites.items()}  # clean views of the train cells

    def variants(model):
        """name -> (top, internal test features or None, Barcelona test features)."""
        out = {"as trained": (model.split, plain_internal, plain_test)}
        out["sites' clean"] = (sites_clean(model.split, sites), plain_internal, plain_test)
        if args.per_site:
            out["each training site its own"] = (per_site(model.split, sites, internal_site), None, None)
        for n, (plain_cells, site_cells, site_test) in adapted.items():
            top = copy.deepcopy(model.split)
            adapt_batchnorm(top.top, _chunks(plain_cells))
            out[f"Barcelona {n}: top"] = (top, None, plain_test)
            both = copy.deepcopy(model.split)
            adapt_batchnorm(both.top, _chunks(site_cells))
            out[f"Barcelona {n}: trunk + top"] = (both, None, site_test)
            if args.entropy:
                tent = copy.deepcopy(top)
                entropy_minimisation(tent, _chunks(plain_cells), epochs=args.entropy)
                out[f"Barcelona {n}: top + entropy"] = (tent, None, plain_test)
        return out

    scores: dict[tuple, list[float]] = {}
    print("| row | seed | statistics | internal clean | internal views | Barcelona clean | Barcelona views |")
    print("|---|---|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        for row in rows:
            model = ROWS[row](trainers, seed)
            for variant, (split, feats_internal, feats_external) in variants(model).items():
                line = []
                if isinstance(split, dict):  # one top per training site, each scoring its own test cells
                    probs = {v: np.zeros((len(internal), len(classes))) for v in VIEWS}
                    for site, (top, rows) in split.items():
                        for v in VIEWS:
                            probs[v][rows] = softmax(top_logits(top, plain_internal[v][rows]))
                    for col, p in (("clean", probs[View()]), ("views", np.mean(list(probs.values()), axis=0))):
                        ba = compute_metrics(classes, y_internal, p).balanced_accuracy
                        scores.setdefault((row, variant, "internal", col), []).append(ba)
                        line.append(f"{ba:.3f}")
                    print(f"| {row} | {seed} | {variant} | " + " | ".join(line) + " | — | — |", flush=True)
                    continue
                for where, feats, y in (("internal", feats_internal, y_internal), ("Barcelona", feats_external, y_test)):
                    if feats is None:
                        line += ["—", "—"]
                        continue
                    probs = {v: softmax(top_logits(split, feats[v])) for v in VIEWS}
                    for col, p in (("clean", probs[View()]), ("views", np.mean(list(probs.values()), axis=0))):
                        ba = compute_metrics(classes, y, p).balanced_accuracy
                        scores.setdefault((row, variant, where, col), []).append(ba)
                        line.append(f"{ba:.3f}")
                        if args.size and where == "Barcelona" and "trunk" not in variant:
                            t = model.val_calibration.best_temperature() if model.val_calibration else 1.0
                            sized = size.combine(split, p, t)
                            ba = compute_metrics(classes, y, sized).balanced_accuracy
                            scores.setdefault((row, variant, "Barcelona + size", col), []).append(ba)
                            line.append(f"+size {ba:.3f}")
                print(f"| {row} | {seed} | {variant} | " + " | ".join(line) + " |", flush=True)
    print("\nmeans ± sd over seeds (balanced accuracy; internal = the training sites' test splits, Barcelona = its test split)")
    wheres = ("internal", "Barcelona") + (("Barcelona + size",) if args.size else ())
    print("| row | statistics | " + " | ".join(f"{w} {c}" for w in wheres for c in ("clean", "views")) + " |")
    print("|---|---|" + "---|" * (2 * len(wheres)))
    for row in rows:
        for variant in dict.fromkeys(k[1] for k in scores if k[0] == row):
            cells = [_mean_sd(scores[row, variant, w, c]) if (row, variant, w, c) in scores else "—"
                     for w in wheres for c in ("clean", "views")]
            print(f"| {row} | {variant} | " + " | ".join(cells) + " |")
    print(f"[{time.time() - t0:.0f} s]")


class _Size:
    """The size opinion as the product applies it, for one set of Barcelona test cells."""

    def __init__(self, prior, r_test_of_reference, d_every, x_every, classes):
        self.prior, self.r_of, self.d_every, self.x_every, self.classes = prior, r_test_of_reference, d_every, x_every, classes

    def combine(self, split, p: np.ndarray, t: float) -> np.ndarray:
        from models.size_prior import ANCHOR_CLASS, anchored_reference, apply_size_prior

        reference = anchored_reference(self.d_every, softmax(top_logits(split, self.x_every)), self.classes, ANCHOR_CLASS)
        return apply_size_prior(softmax(np.log(np.clip(p, 1e-12, None)), t), self.r_of(reference), self.prior)


def _size_setup(layout, data, trunk, contract, cache: Path, test) -> _Size:
    from benchmarks.site_reference import located_diameters
    from federation.sites import DataRoot, resolve_data_root
    from models.size_prior import ANCHOR_CLASS, SizeStatistics, fit_prior

    classes = list(contract.class_names)
    d = located_diameters(layout.samples, cache)
    y = layout.y
    stats = [SizeStatistics.of(d[idx], y[idx], len(classes), anchor=classes.index(ANCHOR_CLASS))
             for idx in (np.array(layout.train[s]) for s in layout.train)]
    prior = fit_prior(stats, weight=2.0, anchor=ANCHOR_CLASS)
    every = DataRoot(resolve_data_root(None)).select(["barcelona-pbc"], ["train", "val", "test"])
    d_every = located_diameters(every, cache)
    x_every = next(iter(fixed_view_features(trunk, every, PreparedImages.build(every, contract, cache / "prepared"),
                                            contract, VIEW_SETS["none"], cache / "features").values()))
    d_test = located_diameters(test, cache)
    return _Size(prior, lambda reference: np.log(d_test / reference), d_every, x_every, classes)


def sites_clean(split, sites: dict[str, np.ndarray]):
    """The top's BatchNorm statistics as a federation would recompute them after training: each site
    re-estimates them on its own train cells' clean views, the server averages them weighted by cells."""
    stats = []
    for x in sites.values():
        local = copy.deepcopy(split)
        adapt_batchnorm(local.top, _chunks(torch.from_numpy(np.asarray(x, dtype=np.float32)), seed=1))
        stats.append(({k: v for k, v in local.model.state_dict().items() if k.endswith(("running_mean", "running_var"))}, len(x)))
    out = copy.deepcopy(split)
    total = sum(n for _, n in stats)
    out.model.load_state_dict({k: sum(s[k] * (n / total) for s, n in stats) for k in stats[0][0]}, strict=False)
    return out


def per_site(split, sites: dict[str, np.ndarray], internal_site: np.ndarray) -> dict:
    """Each training site's copy with the stage's statistics of its own clean train cells."""
    out = {}
    for name, x in sites.items():
        local = copy.deepcopy(split)
        adapt_batchnorm(local.top, _chunks(torch.from_numpy(np.asarray(x, dtype=np.float32)), seed=1))
        out[name] = (local, np.flatnonzero(internal_site == name))
    return out


def entropy_minimisation(split, batches: list[torch.Tensor], epochs: int, lr: float = 1e-3) -> None:
    """TENT (Wang et al. 2021): the stage's BatchNorm scales and shifts trained to make the new site's
    predictions confident, BatchNorm on batch statistics; then its statistics re-estimated."""
    from models.batchnorm import batchnorm_layers

    stage = _stage_modules(split)
    layers = [bn for bn in batchnorm_layers(split.top) if any(bn is m for m in stage)]
    params = [p for bn in layers for p in (bn.weight, bn.bias)]
    for p in params:
        p.requires_grad_(True)
    optimiser = torch.optim.Adam(params, lr=lr)
    split.top.eval()
    for bn in layers:
        bn.train()
    for _ in range(epochs):
        for x in batches:
            p = torch.softmax(split.top(x), dim=1)
            loss = -(p * torch.log(p + 1e-8)).sum(1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    split.top.eval()
    adapt_batchnorm(split.top, batches)


def _stage_modules(split) -> list[torch.nn.Module]:
    m = split.model
    return [*m.blocks[-1].modules(), *m.bn2.modules()]


def _chunks(x: torch.Tensor, size: int = 64, seed: int = 0) -> list[torch.Tensor]:
    """Shuffled, equal batches (the last short one dropped: BatchNorm's average weighs batches equally)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = x.float()[order]
    full = max(1, len(x) // size)
    return [x[i * size : (i + 1) * size] for i in range(full)]


def _batches(prepared: PreparedImages, contract, indices, size: int = 64):
    indices = list(indices)
    for start in range(0, len(indices), size):
        yield np.stack([render_view(prepared, i, 0, contract, None, 0) for i in indices[start : start + size]])


def _features(split, prepared: PreparedImages, contract, view: View) -> np.ndarray:
    parts = [split.trunk_features(apply_view(torch.from_numpy(b), view)) for b in _batches(prepared, contract, range(len(prepared)))]
    return torch.cat(parts).numpy()


if __name__ == "__main__":
    main()
