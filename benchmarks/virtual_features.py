"""Does the federated classifier's last layer lose what the centralised one learns? Retrain it on the server.

    .venv/bin/python benchmarks/virtual_features.py --seeds 0,1,2
    .venv/bin/python benchmarks/virtual_features.py --seeds 0,1,2 --rounds 20 --no-loso
    .venv/bin/python benchmarks/virtual_features.py --protocol in-domain --seeds 0,1,2 [--rounds 20]
    .venv/bin/python benchmarks/virtual_features.py --protocol in-domain --top two-stages --rounds 20 --views turns-zooms
    .venv/bin/python benchmarks/virtual_features.py --protocol in-domain --arch tf_efficientnet_lite2 --top two-stages --rounds 20
    .venv/bin/python benchmarks/virtual_features.py --arch tf_efficientnet_lite2 --seeds 0,1,2 --no-loso
    .venv/bin/python benchmarks/virtual_features.py --protocol in-domain --top two-stages --rounds 20 --logit-adjustment 1
    .venv/bin/python benchmarks/virtual_features.py --seeds 0,1,2 --logit-adjustment 1

FedAvg's sites see very different class mixes (`bccd` has 3 basophils, `jiangxi-tecom` 1, `tehran-lisc`
most of them), so each site's last layer drifts toward its own classes and the average is a compromise:
inside the training sites FedAvg stays at 0.905 where the centralised model reaches 0.948. CCVR ("No
Fear of Heterogeneity", Luo et al., NeurIPS 2021) recalibrates the classifier after training: every site
sends, per class, the count, mean and scatter of its cells' penultimate features under the global model
(statistics, no cell); the server pools them into one Gaussian per class, samples virtual features and
retrains the classifier (the last linear layer) on them (`federation/recalibration.py`). Rows:

- served: the mean of the last 5 rounds' global models (what the registry holds);
- virtual, balanced (CCVR): its classifier retrained on 2,000 virtual cells per class;
- virtual, centralised loss: virtual cells in the pooled class proportions, weighed by the sites' own
  loss rule (inverse frequency capped at 3x) applied to the pooled counts: the centralised loss;
- real pooled, centralised loss: the same on the pooled real penultimate features (what the virtual
  rows approximate; not federated);
- centralised (pooled sites; not federated): the ceiling the federated rows are measured against.

Scored as `benchmarks/fedavg_variants.py` scores every variant (shipped arm, test-time views, NLL-grid
temperature on the sites' val cells, size opinion at w = 2), with its federated leave-one-site-out
criterion (never sees Barcelona). Uses the shipped arm's cached features (var/benchmark).
"""

from __future__ import annotations

import argparse
import copy
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

from benchmarks.fedavg_variants import (Scores, averaged, prepare, print_table, probabilities, product_probabilities,
                                         score_held_out, score_served, temperature)
from benchmarks.tta import fixed_view_features
from federation.benchmark.handlers import SiteFeatures
from federation.top_training import top_logits
from federation.benchmark.presets import LITE0, LITE0_LONG
from federation.benchmark.protocols import arm_features, in_domain_layout
from federation.benchmark.report import _mean_sd
from federation.benchmark.runs import RowModel, fresh_split, train_federated, train_pooled
from federation.losses import class_weights
from federation.prepared import PreparedImages
from federation.recalibration import ClassStatistics, pooled_gaussians, retrain_classifier, sample_virtual
from federation.sites import DataRoot, resolve_data_root
from federation.trunk import TOPS
from models.calibration import expected_calibration_error
from models.evaluate import compute_metrics
from models.test_views import VIEW_SETS


def penultimate(model: RowModel, x: np.ndarray) -> np.ndarray:
    """The classifier's input for these trunk features (after the top's stage, BN and pooling)."""
    out: list[np.ndarray] = []
    classifier = model.split.model.get_classifier()
    hook = classifier.register_forward_hook(lambda m, i, o: out.append(i[0].detach().numpy().copy()))
    try:
        top_logits(model.split, x)
    finally:
        hook.remove()
    return np.concatenate(out)


def site_features(model: RowModel, site: SiteFeatures) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate features of every stored view of the site's train cells, and their labels."""
    n, v = site.train_x.shape[:2]
    x = np.asarray(site.train_x).reshape(n * v, *site.train_x.shape[2:])
    return penultimate(model, x), np.repeat(site.train_y, v)


def recalibrated(model: RowModel, sites: dict[str, SiteFeatures], n_classes: int, seed: int) -> dict[str, RowModel]:
    """Balanced: as many virtual cells per class (CCVR). Centralised loss: virtual cells in the pooled
    class proportions, weighed as the sites' own loss weighs them (inverse frequency capped at 3x) but by
    the pooled counts, i.e. the centralised model's loss on the virtual cells."""
    feats = {name: site_features(model, s) for name, s in sites.items()}
    gauss = pooled_gaussians([ClassStatistics.of(f, y, n_classes) for f, y in feats.values()])
    counts = np.zeros(n_classes)
    for c, (_, _, k) in gauss.items():
        counts[c] = k
    capped = class_weights([], n_classes, counts=counts).numpy()

    def retrained(x: np.ndarray, y: np.ndarray, weight: np.ndarray | None) -> RowModel:
        out = copy.deepcopy(model)
        retrain_classifier(out.split.model.get_classifier(), x, y, weight=weight, seed=seed)
        return out

    proportional = {c: max(2, int(round(10000 * counts[c] / counts.sum()))) for c in gauss}
    rx = np.concatenate([f for f, _ in feats.values()])
    ry = np.concatenate([y for _, y in feats.values()])
    return {
        "virtual, balanced (CCVR)": retrained(*sample_virtual(gauss, {c: 2000 for c in gauss}, seed), None),
        "virtual, centralised loss": retrained(*sample_virtual(gauss, proportional, seed), capped),
        "real pooled, centralised loss": retrained(rx, ry, capped),
    }


def variants(model: RowModel, sites: dict[str, SiteFeatures], n_classes: int, seed: int) -> dict[str, RowModel]:
    served = averaged(model, model.round_states[-5:])
    return {"served (mean of the last 5 rounds)": served} | recalibrated(served, sites, n_classes, seed)


def sites_recipe(recipe, logit_adjustment: float):
    """The federated rows' recipe: with logit adjustment (the run config's `logit-adjustment`), each site's
    loss on logits + tau·log(its own class prior) instead of class weights."""
    return replace(recipe, logit_adjustment=logit_adjustment, class_balanced=False) if logit_adjustment else recipe


def test_view_features(arm, layout, d, views: str, cache: Path) -> list[np.ndarray]:
    """The test split's trunk outputs for each of the contract's test-time views (`models.test_views`), the
    views the exported graph averages when a contract carries them."""
    samples = [layout.samples[i] for i in layout.evaluation["test"]]
    prepared = PreparedImages.build(samples, d.contract, cache / "prepared")
    trunk = fresh_split(d.contract, arm.top, seed=0)  # the frozen pretrained trunk: seed-free
    return list(fixed_view_features(trunk, samples, prepared, d.contract, VIEW_SETS[views], cache / "features").values())


def in_domain(args, seeds: list[int]) -> None:
    """Protocol 2 (one domain, Dirichlet(0.5) label skew over 4 sites, 8 classes): the skew CCVR was made
    for, without the domain shift. Scored as `wbc benchmark in-domain` scores (test split, clean view,
    temperature fitted on the sites' val cells), beside the centralised model on the same cells."""
    layout, _ = in_domain_layout(DataRoot(resolve_data_root(None)), 0)
    arm = LITE0_LONG if args.rounds == 20 else LITE0
    if args.rounds and args.rounds != 20:
        arm = replace(arm, recipe=replace(arm.recipe, rounds=args.rounds))
    if args.arch:
        arm = replace(arm, name=arm.name.replace("EfficientNet-Lite0", args.arch), architecture=args.arch)
    if args.input_size:
        arm = replace(arm, name=f"{arm.name}, {args.input_size} px", input_size=args.input_size)
    if args.top:
        arm = replace(arm, name=f"{arm.name}, top {args.top}", top=args.top)
    local = sites_recipe(arm.recipe, args.logit_adjustment)
    t0 = time.time()
    d = arm_features(arm, layout, args.cache)
    n = d.contract.num_classes
    classes = list(d.contract.class_names)
    val = [(s.val_x, s.val_y) for s in d.sites.values()]
    tx, ty = d.evaluation["test"]
    views = test_view_features(arm, layout, d, args.views, args.cache) if args.views else []
    print(f"[{time.time() - t0:.0f} s] in-domain features ready ({arm.name}"
          f"{f', {len(views)} test views' if views else ''})", flush=True)
    scores: dict[str, list[float]] = {}
    for seed in seeds:
        rows = {"centralised": train_pooled(d.contract, arm.top, np.concatenate([s.train_x for s in d.sites.values()]),
                                            np.concatenate([s.train_y for s in d.sites.values()]), val, arm.recipe, seed)}
        for strategy in (args.strategies or "fedavg,fedmedian").split(","):
            model = train_federated(strategy, d.contract, arm.top, d.sites, local, seed, keep_rounds=True)
            label = f"{strategy}, local logit adjustment {args.logit_adjustment:g}" if args.logit_adjustment else strategy
            rows[label] = model
            for name, m in recalibrated(model, d.sites, n, seed).items():
                rows[f"{label} + {name}"] = m
        for name, m in rows.items():
            t = temperature([m], val)
            p = probabilities([m], [tx], t)
            scores.setdefault(name, []).append(compute_metrics(classes, ty, p).balanced_accuracy)
            scores.setdefault(name + " ECE", []).append(expected_calibration_error(p, ty))
            line = f"test {scores[name][-1]:.3f}"
            if views:  # as the exported graph answers: the views' mean softmax, then the clean view's T
                p = product_probabilities([m], views, t)
                scores.setdefault(name + " views", []).append(compute_metrics(classes, ty, p).balanced_accuracy)
                scores.setdefault(name + " views ECE", []).append(expected_calibration_error(p, ty))
                line += f", with the test views {scores[name + ' views'][-1]:.3f}"
            print(f"[{time.time() - t0:.0f} s] seed {seed} {name}: {line}", flush=True)
    header = f"| in-domain ({arm.name}) | test bal. acc. | test ECE (fitted T) |"
    if views:
        header += f" with the {args.views} test views | ECE |"
    print("\n" + header + "\n" + "|---" * header.count(" | ") + "|---|")
    for name in (k for k in scores if not k.endswith((" ECE", " views"))):
        cells = [_mean_sd(scores[name]), _mean_sd(scores[name + " ECE"])]
        if views:
            cells += [_mean_sd(scores[name + " views"]), _mean_sd(scores[name + " views ECE"])]
        print(f"| {name} | {' | '.join(cells)} |")
    print(f"[{time.time() - t0:.0f} s]")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--cache", type=Path, default=ROOT / "var" / "benchmark")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-loso", action="store_true", help="skip the federated leave-one-site-out criterion")
    ap.add_argument("--rounds", type=int, default=0, help="train this many rounds instead of the shipped recipe's 5")
    ap.add_argument("--protocol", default="paper", choices=("paper", "in-domain"))
    ap.add_argument("--input-size", type=int, default=0,
                    help="the network's input, pixels a side (default: the shipped 128); new cached features")
    ap.add_argument("--views", default="", choices=("", *VIEW_SETS),
                    help="in-domain: also score every row with these test-time views (the shipped: turns-zooms)")
    ap.add_argument("--strategies", default="", help="in-domain: the federated rows (default: fedavg,fedmedian)")
    ap.add_argument("--logit-adjustment", type=float, default=0.0, metavar="TAU",
                    help="the sites train with the loss on logits + TAU·log(their own class prior) "
                         "instead of class weights (Menon et al.'s logit adjustment with each site's own prior, in the "
                         "spirit of FedLC; the centralised row unchanged)")
    ap.add_argument("--arch", default="", choices=("", "tf_efficientnet_lite1", "tf_efficientnet_lite2"),
                    help="a larger EfficientNet-Lite (offline weights) instead of Lite0; new cached features")
    ap.add_argument("--top", default="", choices=("", *TOPS),
                    help="what the sites train (federation.trunk; default: the shipped 'stage'); new cached features")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    only = {"in-domain": {"--views": args.views, "--strategies": args.strategies}, "paper": {"--no-loso": args.no_loso}}
    for protocol, options in only.items():  # an option the other protocol would silently ignore is an error
        misplaced = [flag for flag, value in options.items() if value and args.protocol != protocol]
        if misplaced:
            ap.error(f"{', '.join(misplaced)} applies to --protocol {protocol} only")
    if args.protocol == "in-domain":
        return in_domain(args, seeds)
    t0 = time.time()
    b = prepare(args.cache, "turns-zooms", args.rounds, input_size=args.input_size, top=args.top, arch=args.arch)
    d, layout, n = b.data, b.layout, len(b.classes)
    local = sites_recipe(b.arm.recipe, args.logit_adjustment)
    print(f"[{time.time() - t0:.0f} s] features, views and sizes ready", flush=True)

    scores: Scores = {}
    if not args.no_loso:
        for seed in seeds:
            for held in layout.train:
                rest = {s: d.sites[s] for s in layout.train if s != held}
                model = train_federated("fedavg", d.contract, b.arm.top, rest, local, seed, keep_rounds=True)
                for name, m in variants(model, rest, n, seed).items():
                    score_held_out(b, [m], held, name, scores)
            print(f"[{time.time() - t0:.0f} s] LOSO seed {seed}: " + ", ".join(
                f"{k[0]} {np.mean(v[-3:]):.3f}" for k, v in scores.items() if k[1] == "loso"), flush=True)

    for seed in seeds:
        model = train_federated("fedavg", d.contract, b.arm.top, d.sites, local, seed, keep_rounds=True)
        pooled = train_pooled(d.contract, b.arm.top, np.concatenate([s.train_x for s in d.sites.values()]),
                              np.concatenate([s.train_y for s in d.sites.values()]),
                              [(s.val_x, s.val_y) for s in d.sites.values()], b.arm.recipe, seed)
        for name, m in (variants(model, d.sites, n, seed) | {"centralised (pooled sites; not federated)": pooled}).items():
            score_served(b, [m], name, scores)
            print(f"[{time.time() - t0:.0f} s] seed {seed} {name}: internal {scores[name, 'internal'][-1]:.3f}, "
                  f"Barcelona {scores[name, 'external'][-1]:.3f}", flush=True)

    la = f", local logit adjustment {args.logit_adjustment:g}" if args.logit_adjustment else ""
    print_table(f"FedAvg ({b.arm.name}{la}, views, size w = 2)", scores)
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
