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
the cells each member, every member and the ensemble get wrong (do the members fail on the same cells?).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.benchmark.protocols import in_domain_layout, paper_layout  # noqa: E402
from federation.sites import DataRoot, resolve_data_root  # noqa: E402
from federation.task import build_contract, create_model_from_contract  # noqa: E402
from models.calibration import CalibrationSummary  # noqa: E402
from models.export import export_onnx  # noqa: E402
from service.evaluation import evaluate_classifier  # noqa: E402
from service.inference import Classifier, SessionConfig  # noqa: E402

from gpu_finetune import scores  # noqa: E402  (this folder: the same score record as the packed rows)


def answers(classifier: Classifier, samples, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Log of the graph's probabilities (its view average at temperature 1) and the targets."""
    t0 = time.monotonic()
    _, probs, targets = evaluate_classifier(classifier, samples, batch_size=32)
    print(f"  {label}: {len(targets)} cells in {time.monotonic() - t0:.0f} s", flush=True)
    return np.log(np.clip(probs, 1e-12, None)), targets


def score_all(record: dict, key: str, val: tuple, evaluation: dict, classes) -> None:
    """Fit the temperature on the validation answers, score every evaluation split with it into record[key]."""
    t = CalibrationSummary.from_logits(*val).best_temperature()
    record[key] = {"temperature": t}
    label = "" if key == "scores" else f"{key} "  # a single model prints its splits bare, as it always did
    for name, (logits, y) in evaluation.items():
        record[key][name] = r = scores(logits, y, classes, t)
        print(f"{label}{name}: balanced accuracy {r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
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
                        help="state dicts saved by gpu_finetune.py (timm names); several: an ensemble")
    parser.add_argument("--layout", choices=("in-domain", "paper"), default="in-domain")
    parser.add_argument("--arch", default="tf_efficientnet_lite0", help="one, or one per weights file (comma list)")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--views", default="turns-zooms", help="the contract's test views (none: the clean cell)")
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
    classes = layout.class_names
    splits = {"val": [layout.samples[i] for v in layout.val.values() for i in v]}
    splits |= {name: [layout.samples[i] for i in idx] for name, idx in layout.evaluation.items()}
    named = [str(w) for w in args.weights]
    record = {"weights": named if len(named) > 1 else named[0], "archs": archs, "layout": args.layout,
              "views": args.views}
    members = []  # per member: split -> (log probabilities, targets)
    for weights, arch in zip(args.weights, archs):
        contract = build_contract(arch, args.side, class_names=classes, test_views=args.views)
        model = create_model_from_contract(contract, pretrained=False)
        model.load_state_dict({k: v.float() for k, v in torch.load(weights, map_location="cpu").items()})
        with tempfile.TemporaryDirectory() as tmp:
            path = export_onnx(model.eval(), contract, Path(tmp) / "model.onnx")
            classifier = Classifier(path, SessionConfig(intra_op_threads=torch.get_num_threads()))
            print(f"{weights} ({arch}):", flush=True)
            members.append({name: answers(classifier, samples, name) for name, samples in splits.items()})
    for k, (weights, answered) in enumerate(zip(args.weights, members)):
        key = "scores" if len(members) == 1 else f"member {k}: {weights}"
        score_all(record, key, answered["val"], {n: a for n, a in answered.items() if n != "val"}, classes)
    if len(members) > 1:
        mean = {name: (np.log(np.mean([np.exp(m[name][0]) for m in members], axis=0)), members[0][name][1])
                for name in splits}
        score_all(record, "ensemble", mean["val"], {n: a for n, a in mean.items() if n != "val"}, classes)
        record["mistakes"] = {name: shared_mistakes(members, mean, name, classes) for name in splits if name != "val"}
    if len(members) == 1:  # the single model's record keeps its earlier shape
        record |= record.pop("scores")
    out = args.out or args.weights[0].with_suffix(f".{args.views}{'.ensemble' if len(members) > 1 else ''}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
