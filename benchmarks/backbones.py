"""CPU throughput of the zoo's backbones: training (forward + backward + SGD step) and inference, images/s.

    .venv/bin/python benchmarks/backbones.py                      # every backbone, its default sizes
    .venv/bin/python benchmarks/backbones.py --archs resnet34 --sizes 160 --threads 2 --json out.json
    .venv/bin/python benchmarks/backbones.py --ort                # also ONNX Runtime CPU inference

Prints a Markdown table. Weights do not change speed, so models are built with pretrained=False.
Each figure: one warm-up step, then up to --max-steps timed steps within --budget-s seconds (at least one);
the fastest counts, since other processes on the machine only ever slow a step down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.contract import SHARED_CLASSES  # noqa: E402
from models.zoo import BACKBONES, contract_for, create_model, list_backbones  # noqa: E402


def _timed(step, budget_s: float, max_steps: int) -> float:
    """Fastest wall seconds per step: one warm-up call, then calls until the budget (at least one).

    The fastest step, not the mean: other processes on a 2-core machine only ever slow a step down.
    """
    step()
    wall: list[float] = []
    start = time.perf_counter()
    while not wall or (time.perf_counter() - start < budget_s and len(wall) < max_steps):
        t0 = time.perf_counter()
        step()
        wall.append(time.perf_counter() - t0)
    return min(wall)


def train_throughput(model: torch.nn.Module, batch: int, size: int, budget_s: float, max_steps: int) -> float:
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, len(SHARED_CLASSES), (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return batch / _timed(step, budget_s, max_steps)


def infer_throughput(model: torch.nn.Module, batch: int, size: int, budget_s: float, max_steps: int) -> float:
    model.eval()
    x = torch.randn(batch, 3, size, size)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return batch / _timed(step, budget_s, max_steps)


def ort_throughput(
    model: torch.nn.Module, arch: str, batch: int, size: int, threads: int, budget_s: float, max_steps: int
) -> float:
    import onnxruntime as ort

    from models.export import export_onnx

    contract = contract_for(arch, SHARED_CLASSES, input_size=size)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, contract, Path(tmp) / "m.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    return batch / _timed(lambda: session.run(None, {"input": x}), budget_s, max_steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", nargs="+", default=list_backbones(), choices=list_backbones())
    parser.add_argument("--sizes", nargs="+", type=int, help="input sides (default: each backbone's bench sizes)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=2.0, help="timed seconds per figure after warm-up")
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--ort", action="store_true", help="also ONNX Runtime CPU inference (exports each model)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON too")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(
        f"# CPU backbones: torch {torch.__version__}, {args.threads} threads, batch {args.batch}, "
        f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} at start",
        flush=True,
    )
    header = "| backbone | input | params (M) | train img/s | infer img/s |" + (" ORT img/s |" if args.ort else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    started = time.perf_counter()
    for arch in args.archs:
        backbone = BACKBONES[arch]
        sizes = args.sizes or backbone.bench_sizes
        for size in sizes:
            if backbone.patch_size and size % backbone.patch_size:
                print(f"| {arch} | {size} | skipped: not a multiple of {backbone.patch_size} |")
                continue
            model = create_model(arch, len(SHARED_CLASSES), pretrained=False, img_size=size)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            train = train_throughput(model, args.batch, size, args.budget_s, args.max_steps)
            infer = infer_throughput(model, args.batch, size, args.budget_s, args.max_steps)
            row = {"arch": arch, "size": size, "params_m": params, "train_img_s": train, "infer_img_s": infer}
            line = f"| {arch} | {size} | {params:.1f} | {train:.1f} | {infer:.1f} |"
            if args.ort:
                row["ort_img_s"] = ort_throughput(
                    model, arch, args.batch, size, args.threads, args.budget_s, args.max_steps
                )
                line += f" {row['ort_img_s']:.1f} |"
            rows.append(row)
            print(line, flush=True)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n({time.perf_counter() - started:.0f} s; load average at the end {load})")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
