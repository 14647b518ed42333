"""Per-round curves of `benchmarks/gpu_finetune.py`'s federated rows: pooled validation (what chooses the
round) and test (recorded, never used to choose; across hospitals the training sites' internal test cells), one
colour per run; a star where the run's folder also holds `benchmarks/finetuned_ccvr.py`'s record (the chosen
round's last layer recalibrated on the server); a diamond at the last round for a run's mean of its last global
models (`--in-domain-average-last`).

    .venv/bin/python benchmarks/finetune_curves.py var/ft-a/rows.jsonl var/ft-b/rows.jsonl --out curves.png

`--test-only` draws the test curve alone, for plots of many runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def label_of(row: dict, arch: str, side: int) -> str:
    parts = [arch.removeprefix("tf_efficientnet_") + ("" if side == 128 else f" {side} px"), row["row"].split("/")[1],
             f"{row['rounds']} x {row['local_epochs']}", f"seed {row['seed']}"]
    if row.get("logit_adjustment"):
        parts.append(f"logit adjustment {row['logit_adjustment']:g}")
    if row.get("round_decay"):
        parts.append("lr cosine over rounds")
    return ", ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", type=Path, nargs="+", help="rows.jsonl files")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--test-only", action="store_true",
                        help="draw the test curve alone (many runs in one plot stay readable)")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5) if args.test_only else (8, 4.5))
    layouts = set()
    for k, path in enumerate(args.rows):
        summary = path.parent / "summary.json"  # the run's arguments: the backbone and input side among them
        run_args = json.loads(summary.read_text())["args"] if summary.exists() else {}
        arch, side = run_args.get("arch", "tf_efficientnet_lite0"), run_args.get("side", 128)
        colour = f"C{k}"
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if row.get("average_last"):  # the mean of the last global models, scored once after the last round
                ax.plot(row["rounds"], row["test"]["balanced_accuracy"], "D", color=colour, markeredgecolor="black",
                        label=f"  mean of the last {row['average_last']} global models")
                continue
            if row.get("kind") != "federated" or not row.get("test_curve"):
                continue
            split = row.get("test_curve_split", "test")
            layouts.add(row["layout"])
            rounds = range(1, len(row["val_curve"]) + 1)
            if args.test_only:
                ax.plot(rounds, row["test_curve"], color=colour, label=f"{label_of(row, arch, side)}: {split}")
            else:
                ax.plot(rounds, row["val_curve"], color=colour, label=f"{label_of(row, arch, side)}: pooled val")
                ax.plot(rounds, row["test_curve"], color=colour, linestyle="--", label=f"  {split} (not used to choose)")
            ax.plot(row["best_val_round"], row[split]["balanced_accuracy"], "o", color=colour)
            ccvr = path.parent / ("in-domain-fed-ccvr.json" if row["layout"] == "in-domain" else "paper-fed-ccvr.json")
            if ccvr.exists():
                test = json.loads(ccvr.read_text())["rows"]["virtual, balanced (CCVR)"][split]
                ax.plot(row["best_val_round"], test["balanced_accuracy"], "*", color=colour, markersize=12,
                        markeredgecolor="black", label="  its last layer recalibrated (CCVR)")
    across = layouts == {"paper"}
    ax.axhline(0.95 if across else 0.98, color="grey", linewidth=0.8, linestyle=":")  # the goal
    ax.set_xlabel("round")
    ax.set_ylabel("balanced accuracy (clean cell)")
    ax.set_ylim(0.6, 1.0)
    ax.grid(alpha=0.3)
    if args.test_only:  # many runs: the legend beside the plot, not over the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=8, loc="lower right")
    ax.set_title(("Across hospitals, the 3 training sites" if across else "In-domain PBC, 4 skewed sites")
                 + ", every layer trained (dot: the round validation chose)", fontsize=10)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
