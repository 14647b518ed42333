"""What the test-time views cost the service: one model exported three ways, timed side by side.

    .venv/bin/python benchmarks/test_views_cost.py [--size 128] [--rounds 5]

The shipped network (EfficientNet-Lite0, 5 classes, 128 px) exported with `test_views` none / flips /
dihedral (models.test_views: the average is inside the graph), each opened with the service's own
session options (service.inference.SessionConfig: 1 intra-op thread), then timed alternately in one
process (batch 1 and batch 32, real preprocessed cells), so the ratios are fair on a noisy machine.
Also prints the cost of preprocessing one cell (decode + cell locator + resize), which the views do not
multiply: the end-to-end ratio is smaller than the graph's.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from PIL import Image

from federation.sites import DEFAULT_TRAINING_SITES, DataRoot, resolve_data_root
from federation.task import build_contract, create_model_from_contract
from models.export import export_onnx
from models.preprocess import preprocess
from models.test_views import VIEW_SETS
from service.inference import Classifier, SessionConfig

VIEWS = ("none", "flips", "dihedral", "turns-zooms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5, help="alternating timing rounds")
    args = ap.parse_args()
    root = DataRoot(resolve_data_root(None))
    paths = [s.path for site in DEFAULT_TRAINING_SITES for s in root.select([site], ["test"])[:11]][:32]
    contract = build_contract(input_size=args.size)
    t0 = time.perf_counter()
    batch = np.stack([preprocess(Image.open(p), contract) for p in paths])
    prep_ms = (time.perf_counter() - t0) * 1000 / len(paths)
    model = create_model_from_contract(contract).eval()
    with tempfile.TemporaryDirectory() as tmp:
        classifiers = {
            v: Classifier(export_onnx(model, contract.with_updates(test_views=v), Path(tmp) / f"{v}.onnx"), SessionConfig())
            for v in VIEWS
        }  # fmt: skip
        timings: dict[tuple[str, int], list[float]] = {(v, n): [] for v in VIEWS for n in (1, 32)}
        for c in classifiers.values():
            c.warm(32)
        for _ in range(args.rounds):
            for v, c in classifiers.items():
                for n in (1, 32):
                    t = time.perf_counter()
                    for i in range(0, len(batch), n):
                        c.logits(batch[i : i + n])
                    timings[v, n].append((time.perf_counter() - t) * 1000 / len(batch))
    print(f"preprocessing (decode, cell locator, resize): {prep_ms:.1f} ms per cell")
    print("| test views | graph passes | ms per cell, batch 1 | ms per cell, batch 32 | ratio to none (batch 32) |")
    print("|---|---|---|---|---|")
    base = float(np.median(timings["none", 32]))
    for v in VIEWS:
        b1, b32 = float(np.median(timings[v, 1])), float(np.median(timings[v, 32]))
        passes = len(VIEW_SETS[v])
        print(f"| {v} | {passes} | {b1:.1f} | {b32:.1f} | {b32 / base:.1f}x |")


if __name__ == "__main__":
    main()
