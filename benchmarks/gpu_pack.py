"""Pack what `benchmarks/gpu_finetune.py` needs onto a GPU machine that has no `../shared` and no wheels.

    .venv/bin/python benchmarks/gpu_pack.py --out .gpu

Writes, into a folder that must stay out of git (`.gpu/` is in `.git/info/exclude`):
  cells.npz    every image of the paper and in-domain layouts after the contract's deterministic `prepare`
               (cell located, centred, white-balanced), stretched to a fixed side and JPEG-encoded (q92),
               so the whole set travels in ~30 MB; labels and the layouts' index lists
  <arch>.pt    the offline ImageNet weights, already mapped into timm's names (fp16, classifier dropped)
The device then runs the same augmentation code (`federation.augment`) the CPU path runs.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.prepared import PreparedImages  # noqa: E402
from federation.benchmark.protocols import in_domain_layout, paper_layout  # noqa: E402
from federation.sites import DataRoot, resolve_data_root  # noqa: E402
from federation.task import build_contract  # noqa: E402
from models.zoo import create_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--data", default=None)
    parser.add_argument("--side", type=int, default=144, help="stored side of a prepared cell (px)")
    parser.add_argument("--cache", type=Path, default=Path("var/benchmark/prepared"))
    parser.add_argument("--archs", default="tf_efficientnet_lite0")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    data = DataRoot(resolve_data_root(args.data))
    paper = paper_layout(data)
    in_domain, partition = in_domain_layout(data, seed=0)
    # One sample list for both layouts: every path once.
    samples, where = [], {}
    for s in paper.samples + in_domain.samples:
        if s.path not in where:
            where[s.path] = len(samples)
            samples.append(s)
    prepared = PreparedImages.build(samples, build_contract(), args.cache)

    blobs, offsets = [], [0]
    for i in range(len(prepared)):
        img = prepared.image(i).resize((args.side, args.side), Image.Resampling.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92)
        blobs.append(np.frombuffer(buf.getvalue(), np.uint8))
        offsets.append(offsets[-1] + len(blobs[-1]))

    def remap(layout, indices):
        return [where[layout.samples[i].path] for i in indices]

    layouts = {}
    for name, layout in (("paper", paper), ("in-domain", in_domain)):
        layouts[name] = {
            "class_names": list(layout.class_names),
            "train": {k: remap(layout, v) for k, v in layout.train.items()},
            "val": {k: remap(layout, v) for k, v in layout.val.items()},
            "evaluation": {k: remap(layout, v) for k, v in layout.evaluation.items()},
        }
    meta = {
        "side": args.side,
        "labels": [s.label for s in samples],
        "sites": [s.site for s in samples],
        "layouts": layouts,
        "in_domain_partition": {k: v for k, v in partition.items() if k != "train_files"},
    }
    np.savez(
        args.out / "cells.npz",
        blob=np.concatenate(blobs),
        offsets=np.asarray(offsets, np.int64),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    print(f"cells.npz: {len(samples)} cells, {(args.out / 'cells.npz').stat().st_size / 1e6:.1f} MB")

    for arch in args.archs.split(","):
        model = create_model(arch, 5, pretrained=True, img_size=128 if "lite" in arch else 126)
        state = {
            k: v.half() if v.is_floating_point() else v
            for k, v in model.state_dict().items()
            if not k.startswith(("classifier.", "head."))
        }
        torch.save(state, args.out / f"{arch}.pt")
        print(f"{arch}.pt: {(args.out / f'{arch}.pt').stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
