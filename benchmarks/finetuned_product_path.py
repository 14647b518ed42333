"""Score a fully fine-tuned model from `benchmarks/gpu_finetune.py` the way the service would answer it.

    .venv/bin/python benchmarks/finetuned_product_path.py var/ft/in-domain-fed.pt --layout in-domain
    .venv/bin/python benchmarks/finetuned_product_path.py a.pt b.pt --arch tf_efficientnet_lite0,tf_efficientnet_lite2

`gpu_finetune.py` trains and scores on packed cells (the contract's `prepare`, stored at 144 px as JPEG q92)
because the GPU machine has no `../shared`. Here the saved weights go through the product's own path: the
contract (with its test-time views) is exported to ONNX by `models.export`, ONNX Runtime answers each cell
from its original file (`service.evaluation`, the same decoding and `prepare` as the service), the
temperature is fitted on the layout's validation cells as registration fits it, and the evaluation splits
are scored with it. This is the figure comparable to the CPU benchmark's rows scored `--views turns-zooms`.

Given several weights (an ensemble of separately trained federated models, each exported as its own graph), every
member is scored alone and the ensemble answers the mean of the members' probabilities (each graph at temperature
1, its views already averaged), with one temperature fitted on that mean over the validation cells; it also counts
the cells each member, every member and the ensemble get wrong (do the members fail on the same cells?). A member may be
a registered version's `weights.safetensors` (its contract's preprocessing is the one built here): the served
frozen-trunk model beside a fully trained one gives 0.929 inside / 0.816 at Barcelona with the opinions (seed 0;
the served model alone 0.919 / 0.838; docs/results.md, "Keeping what transfers while every layer trains").

`--opinions` also scores each split as the shipped service answers: the network at the fitted temperature, then the
relative-size and granule-density opinions (`models.size_prior`, `models.granule_prior`) fitted from the training
sites' cells at the deployment's weights, each evaluated site against its own reference (`service.evaluation`),
under both of the product's temperature rules (fitted; soften-only, never below 1). Measured across hospitals (Lite0
every layer trained, CCVR, views, 3 seeds; docs/results.md, "...with the size and granule opinions"): 0.947 / 0.612
inside / at Barcelona for the network alone, 0.950 / 0.744 with the opinions at T = 1. `--without SITE` scores a
model trained with that site left out (`gpu_finetune.py --paper-held-out`) on the site's every cell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.benchmark.protocols import Layout, in_domain_layout, paper_layout  # noqa: E402
from federation.sites import DataRoot, resolve_data_root  # noqa: E402
from federation.task import build_contract, create_model_from_contract  # noqa: E402
from federation.server_app import RunSettings  # noqa: E402
from federation.task import granule_statistics_of, load_image, size_statistics_of  # noqa: E402
from models.calibration import CalibrationSummary, softmax  # noqa: E402
from models.contract import ModelContract  # noqa: E402
from models.export import export_onnx  # noqa: E402
from models.granule_prior import fit_granule_prior  # noqa: E402
from models.preprocess import prepare_sized  # noqa: E402
from models.size_prior import anchor_of, fit_prior  # noqa: E402
from service.evaluation import NetworkAnswers, network_answers, with_opinions  # noqa: E402
from service.inference import Classifier, SessionConfig  # noqa: E402

from gpu_finetune import load_weights, scores  # noqa: E402  (this folder: the same score record as the packed rows)


def answers(classifier: Classifier, samples, label: str) -> NetworkAnswers:
    """The graph's probabilities (its view average at temperature 1), targets and each cell's measures."""
    t0 = time.monotonic()
    answered = network_answers(classifier, samples, batch_size=32)
    print(f"  {label}: {len(answered.targets)} cells in {time.monotonic() - t0:.0f} s", flush=True)
    return answered


def log_probs(answered: NetworkAnswers) -> tuple[np.ndarray, np.ndarray]:
    return np.log(np.clip(answered.probabilities, 1e-12, None)), answered.targets


def with_site_opinions(contract: ModelContract, layout, classes) -> ModelContract:
    """The contract with the size and granule opinions a federation would put in it: each training site's
    per-class statistics of its training cells' measures (relative to its labelled neutrophils), pooled at
    the deployment's weights (`RunSettings`)."""
    index = {c: k for k, c in enumerate(classes)}
    t0 = time.monotonic()
    sizes, granules = [], []
    for site, idx in layout.train.items():
        samples = [layout.samples[i] for i in idx]
        with ThreadPoolExecutor(max_workers=2) as pool:
            measures = list(pool.map(lambda sample: measure(sample, contract), samples))
        targets = [index[sample.label] for sample in samples]
        sizes.append(size_statistics_of([m.diameter for m in measures], targets, contract))
        granules.append(granule_statistics_of([m.granules for m in measures], targets, contract))
    settings, anchor = RunSettings(), anchor_of(classes)
    size = fit_prior([s for s in sizes if s is not None], settings.size_weight, anchor=anchor)
    granule = fit_granule_prior([g for g in granules if g is not None], settings.granule_weight, classes, anchor)
    print(f"opinions from {sum(len(i) for i in layout.train.values())} training cells in "
          f"{time.monotonic() - t0:.0f} s: size weight {settings.size_weight}, granule weight "
          f"{settings.granule_weight}", flush=True)
    return contract.with_updates(size_prior=None if size is None else size.model_dump(),
                                 granule_prior=None if granule is None else granule.model_dump())


def measure(sample, contract: ModelContract):
    return prepare_sized(load_image(sample.path), contract)[1]  # as a site's training data measures it


def score_all(record: dict, key: str, val: tuple, evaluation: dict, classes, opinions=None) -> None:
    """Fit the temperature on the validation answers, score every evaluation split with it into record[key].

    `opinions` (contract with the size and granule priors, split name → NetworkAnswers): also each split as
    the service answers with them: the network at the temperature, then the opinions (record[key + " +
    opinions"]); the temperature is the network's, fitted before the opinions as registration fits it, under
    either of the product's rules (`temperature-rule`): fitted, and soften-only (never below 1; key suffix
    ", soften-only"). The rule decides how loud the network is beside the opinions."""
    t = CalibrationSummary.from_logits(*val).best_temperature()
    record[key] = {"temperature": t}
    label = "" if key == "scores" else f"{key} "  # a single model prints its splits bare, as it always did
    for name, (logits, y) in evaluation.items():
        record[key][name] = r = scores(logits, y, classes, t)
        report(f"{label}{name}", r, t)
    if opinions is None:
        return
    contract, answered = opinions
    for rule, t_rule in (("", t), (", soften-only", max(1.0, t))):
        record[f"{key} + opinions{rule}"] = {"temperature": t_rule}
        for name, (logits, y) in evaluation.items():
            p = with_opinions(answered[name], contract, probabilities=softmax(logits, t_rule))
            record[f"{key} + opinions{rule}"][name] = r = scores(np.log(np.clip(p, 1e-12, None)), y, classes, 1.0)
            report(f"{label}{name} + opinions{rule}", r, t_rule)


def without_site(layout: Layout, held: str) -> Layout:
    """The paper layout with `held` left out of training: its every cell is the evaluation set "held-out", the
    other sites' test cells "internal" (leave one site out, Barcelona untouched)."""
    if held not in layout.train:
        raise SystemExit(f"--without {held}: not a training site ({', '.join(layout.train)})")
    every = layout.train[held] + layout.val[held] + [i for i in layout.evaluation["internal"]
                                                      if layout.samples[i].site == held]
    internal = [i for i in layout.evaluation["internal"] if layout.samples[i].site != held]
    return dataclasses.replace(layout, train={s: v for s, v in layout.train.items() if s != held},
                               val={s: v for s, v in layout.val.items() if s != held},
                               evaluation={"held-out": every, "internal": internal})


def report(label: str, r: dict, t: float) -> None:
    print(f"{label}: balanced accuracy {r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
          f"ECE {r['ece_calibrated']:.4f} (T {t:.2f})", flush=True)
    print("  recall " + ", ".join(f"{c} {v}" for c, v in r["recall"].items()), flush=True)


def shared_mistakes(members: list[dict], mean: dict, split: str, classes) -> dict:
    """Cells each member gets wrong, those all get wrong, and the ensemble's, per class (the top answer)."""
    y = members[0][split][1]
    wrong = [m[split][0].argmax(1) != y for m in members]
    rows = {"all": np.ones_like(y, dtype=bool)} | {c: y == k for k, c in enumerate(classes)}
    counts = {name: {"cells": int(r.sum()), "members": [int((w & r).sum()) for w in wrong],
                     "all_members": int((np.logical_and.reduce(wrong) & r).sum()),
                     "ensemble": int(((mean[split][0].argmax(1) != y) & r).sum())} for name, r in rows.items()}
    for name, c in counts.items():
        print(f"  {split} {name}: {c['cells']} cells, wrong: members {c['members']}, all of them {c['all_members']}, "
              f"ensemble {c['ensemble']}", flush=True)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, nargs="+",
                        help="state dicts saved by gpu_finetune.py (timm names) or a registered version's "
                             "weights.safetensors; several: an ensemble")
    parser.add_argument("--layout", choices=("in-domain", "paper"), default="in-domain")
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="one, or one per weights file (comma list)")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--views", default="turns-zooms", help="the contract's test views (none: the clean cell)")
    parser.add_argument("--opinions", action="store_true",
                        help="also score with the size and granule opinions, fitted from the training sites' "
                             "cells as a federation fits them (the service's answer with its site references)")
    parser.add_argument("--without", default=None, metavar="SITE",
                        help="paper layout: a training site left out of the federation (gpu_finetune.py "
                             "--paper-held-out): the others' val cells fit the temperature and their training "
                             "cells the opinions; every cell of SITE is scored as a new hospital's ('held-out'), "
                             "beside the others' test cells (Barcelona is not scored)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with the scores (default: beside the weights)")
    args = parser.parse_args()
    archs = args.arch.split(",")
    if len(archs) == 1:
        archs = archs * len(args.weights)
    if len(archs) != len(args.weights):
        parser.error(f"--arch names {len(archs)} backbones for {len(args.weights)} weights files")

    data = DataRoot(resolve_data_root(args.data))
    layout = in_domain_layout(data, seed=0)[0] if args.layout == "in-domain" else paper_layout(data)
    if args.without:
        layout = without_site(layout, args.without)
    classes = layout.class_names
    splits = {"val": [layout.samples[i] for v in layout.val.values() for i in v]}
    splits |= {name: [layout.samples[i] for i in idx] for name, idx in layout.evaluation.items()}
    named = [str(w) for w in args.weights]
    record = {"weights": named if len(named) > 1 else named[0], "archs": archs, "layout": args.layout,
              "views": args.views}
    members = []  # per member: split -> (log probabilities, targets)
    answered = []  # per member: split -> NetworkAnswers (the measures the opinions need)
    for weights, arch in zip(args.weights, archs):
        contract = build_contract(arch, args.side, class_names=classes, test_views=args.views)
        model = create_model_from_contract(contract, pretrained=False)
        model.load_state_dict({k: v.float() for k, v in load_weights(weights).items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model.eval(), contract, Path(tmp) / "model.onnx")
            classifier = Classifier(path, SessionConfig(intra_op_threads=torch.get_num_threads()))
            print(f"{weights} ({arch}):", flush=True)
            answered.append({name: answers(classifier, samples, name) for name, samples in splits.items()})
            members.append({name: log_probs(a) for name, a in answered[-1].items()})
    opinion_contract = with_site_opinions(contract, layout, classes) if args.opinions else None
    for k, (weights, logged) in enumerate(zip(args.weights, members)):
        key = "scores" if len(members) == 1 else f"member {k}: {weights}"
        score_all(record, key, logged["val"], {n: a for n, a in logged.items() if n != "val"}, classes,
                  None if opinion_contract is None else (opinion_contract, answered[k]))
    if len(members) > 1:
        mean = {name: (np.log(np.mean([np.exp(m[name][0]) for m in members], axis=0)), members[0][name][1])
                for name in splits}
        # the ensemble's own answers pick each site's reference, as a site served by the ensemble would measure it
        together = {name: dataclasses.replace(answered[0][name], probabilities=np.exp(mean[name][0]))
                    for name in splits}
        score_all(record, "ensemble", mean["val"], {n: a for n, a in mean.items() if n != "val"}, classes,
                  None if opinion_contract is None else (opinion_contract, together))
        record["mistakes"] = {name: shared_mistakes(members, mean, name, classes) for name in splits if name != "val"}
    if len(members) == 1:  # the single model's record keeps its earlier shape
        record |= record.pop("scores")
        for rule in ("", ", soften-only"):
            if f"scores + opinions{rule}" in record:
                record[f"opinions{rule}"] = record.pop(f"scores + opinions{rule}")
    suffix = (f".{args.views}{'.ensemble' if len(members) > 1 else ''}{'.opinions' if args.opinions else ''}"
              f"{'.without-' + args.without if args.without else ''}.json")
    out = args.out or args.weights[0].with_suffix(suffix)
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
