"""Score a fully fine-tuned model from `benchmarks/gpu_finetune.py` the way the service would answer it.

    .venv/bin/python benchmarks/finetuned_product_path.py var/ft/in-domain-fed.pt --layout in-domain

`gpu_finetune.py` trains and scores on packed cells (the contract's `prepare`, stored at 144 px as JPEG q92)
because the GPU machine has no `../shared`. Here the saved weights go through the product's own path: the
contract (with its test-time views) is exported to ONNX by `models.export`, ONNX Runtime answers each cell
from its original file (`service.evaluation`, the same decoding and `prepare` as the service), the
temperature is fitted on the layout's validation cells as registration fits it, and the evaluation splits
are scored with it. This is the figure comparable to the CPU benchmark's rows scored `--views turns-zooms`.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="a state dict saved by gpu_finetune.py (timm names)")
    parser.add_argument("--layout", choices=("in-domain", "paper"), default="in-domain")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--views", default="turns-zooms", help="the contract's test views (none: the clean cell)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--out", type=Path, default=None, help="JSON with the scores (default: beside the weights)")
    args = parser.parse_args()

    data = DataRoot(resolve_data_root(args.data))
    layout = in_domain_layout(data, seed=0)[0] if args.layout == "in-domain" else paper_layout(data)
    classes = layout.class_names
    contract = build_contract(args.arch, args.side, class_names=classes, test_views=args.views)
    model = create_model_from_contract(contract, pretrained=False)
    model.load_state_dict({k: v.float() for k, v in torch.load(args.weights, map_location="cpu").items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model.eval(), contract, Path(tmp) / "model.onnx")
        classifier = Classifier(path, SessionConfig(intra_op_threads=torch.get_num_threads()))
        val_logits, val_y = answers(classifier, [layout.samples[i] for v in layout.val.values() for i in v], "val")
        t = CalibrationSummary.from_logits(val_logits, val_y).best_temperature()
        record = {"weights": str(args.weights), "layout": args.layout, "views": args.views, "temperature": t}
        for name, idx in layout.evaluation.items():
            logits, y = answers(classifier, [layout.samples[i] for i in idx], name)
            record[name] = r = scores(logits, y, classes, t)
            print(f"{name}: balanced accuracy {r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}, "
                  f"ECE {r['ece_calibrated']:.4f} (T {t:.2f})", flush=True)
            print("  recall " + ", ".join(f"{c} {r}" for c, r in record[name]["recall"].items()), flush=True)
    out = args.out or args.weights.with_suffix(f".{args.views}.json")
    out.write_text(json.dumps(record, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
