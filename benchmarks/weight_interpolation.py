"""Weight-space interpolation between the starting weights and a fully fine-tuned federated model (WiSE-FT).

    .venv/bin/python benchmarks/weight_interpolation.py var/pf-s0/paper-fed.pt --alphas 0.25,0.5,0.75
    .venv/bin/python benchmarks/finetuned_ccvr.py var/pf-s0/paper-fed-wise0.5.pt --layout paper
    .venv/bin/python benchmarks/finetuned_product_path.py var/pf-s0/paper-fed-wise0.5-ccvr.pt --layout paper --opinions

Every layer trained across hospitals lifts the training sites (0.950 inside with the opinions) but loses Barcelona
(0.744; the frozen trunk 0.81), the pattern Wortsman et al. (WiSE-FT, CVPR 2022) and Kumar et al. (ICLR 2022)
describe for fine-tuning under distribution shift: the fine-tuned weights fit the training domains, the pretrained
ones carry what transfers. Both federated models here start from the same point (ImageNet trunk, zero classifier,
`gpu_finetune.new_model`), so the straight line between them is a family of models the server can make alone:
θ(α) = (1 − α)·θ₀ + α·θ_fine-tuned, every tensor (batch-norm statistics included), no extra message to the sites.
The classifier at α is α times the fine-tuned one (θ₀'s is zero); CCVR (`finetuned_ccvr.py`) can refit it from the
sites' statistics under the interpolated features.

Measured (seed 0, α = 0.25 / 0.5 / 0.75 and 1, CCVR, the product's path with the opinions; docs/results.md, "Keeping
what transfers while every layer trains"): no α reaches 0.80 at Barcelona, and at T = 1 every α is below the fully
trained end point inside and at Barcelona (α = 0.5: 0.919 / 0.758 against 0.949 / 0.765). Kept as a probe.

Writes `<weights stem>-wise<α>.pt` beside the weights, in `gpu_finetune.py`'s format (fp16, timm names).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def starting_weights(pack: Path, arch: str, fine_tuned: dict) -> dict:
    """What `gpu_finetune.new_model` starts every run from: the pack's ImageNet trunk and a zero classifier."""
    start = torch.load(pack / f"{arch}.pt", map_location="cpu")
    missing = set(fine_tuned) - set(start)
    assert missing <= {"classifier.weight", "classifier.bias"}, missing
    return {k: (start[k].float() if k in start else torch.zeros_like(v, dtype=torch.float32))
            for k, v in fine_tuned.items()}


def interpolate(start: dict, fine_tuned: dict, alpha: float) -> dict:
    """(1 − α)·start + α·fine_tuned for floating tensors; counters (num_batches_tracked) kept from the fine-tuned."""
    out = {}
    for k, v in fine_tuned.items():
        if v.is_floating_point():
            out[k] = ((1.0 - alpha) * start[k] + alpha * v.float()).half()
        else:
            out[k] = v.clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("weights", type=Path, help="a state dict saved by gpu_finetune.py (timm names)")
    parser.add_argument("--pack", type=Path, default=Path(".gpu"), help="gpu_pack.py's folder (the starting weights)")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--alphas", default="0.25,0.5,0.75", help="comma list: 0 the start, 1 the fine-tuned model")
    args = parser.parse_args()

    fine_tuned = torch.load(args.weights, map_location="cpu")
    start = starting_weights(args.pack, args.arch, fine_tuned)
    for alpha in (float(a) for a in args.alphas.split(",")):
        if not 0.0 <= alpha <= 1.0:
            parser.error(f"alpha {alpha} is outside [0, 1]")
        out = args.weights.with_name(f"{args.weights.stem}-wise{alpha:g}.pt")
        torch.save(interpolate(start, fine_tuned, alpha), out)
        print(f"wrote {out} (alpha {alpha:g})", flush=True)


if __name__ == "__main__":
    main()
