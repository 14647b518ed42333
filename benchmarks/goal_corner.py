"""Internal against external balanced accuracy, one point per scored model and answer rule, with the goals drawn:
is any one model inside both (issue 3: internal ≥ 0.95 and Barcelona ≥ 0.80)?

    .venv/bin/python benchmarks/goal_corner.py var/pf-s{0,1,2}/paper-fed-ccvr.turns-zooms.opinions.json \
        --out docs/img/results/goal-corner.png

Reads `benchmarks/finetuned_product_path.py` records (paper layout): the network alone and, where scored with
`--opinions`, each temperature rule with the opinions; a record's rows share a colour per rule across the files, so
the seeds of one configuration (the weights' name: paper-fed[-RECIPE][-ccvr]) form a cloud. Optional `--point LABEL=INTERNAL,EXTERNAL` adds a reference (e.g. the
shipped model's deployed figures).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RULES = {"": "network alone", "opinions": "+ opinions, T fitted", "opinions, soften-only": "+ opinions, T ≥ 1"}


def kind_of(path: Path) -> str:
    """What a record scored, from its weights' name: paper-fed[-RECIPE][-ccvr].<views>...json."""
    stem = path.name.split(".")[0].removeprefix("paper-fed").strip("-")
    parts = stem.removesuffix("ccvr").strip("-")
    return ", ".join(p for p in (parts, "CCVR" if stem.endswith("ccvr") else "as trained") if p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", type=Path, nargs="+", help="finetuned_product_path.py JSON records")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--point", action="append", default=[], metavar="LABEL=INTERNAL,EXTERNAL")
    parser.add_argument("--internal-goal", type=float, default=0.95)
    parser.add_argument("--external-goal", type=float, default=0.80)
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    groups: dict[str, list[tuple[float, float]]] = {}
    for path in args.records:
        record = json.loads(path.read_text())
        if "external" not in record:
            raise SystemExit(f"{path}: no external split (a paper-layout record is needed)")
        kind = kind_of(path)
        for key, rule in RULES.items():
            rows = record if key == "" else record.get(key)
            if rows is not None:
                groups.setdefault(f"{kind}, {rule}", []).append(
                    (rows["internal"]["balanced_accuracy"], rows["external"]["balanced_accuracy"]))
    for label, points in groups.items():
        xs, ys = zip(*points)
        ax.scatter(xs, ys, label=f"{label} (n={len(points)})", alpha=0.8)
    for item in args.point:
        label, _, values = item.partition("=")
        x, y = (float(v) for v in values.split(","))
        ax.scatter([x], [y], marker="*", s=180, color="black", zorder=3)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.axvline(args.internal_goal, color="grey", linestyle="--", linewidth=1)
    ax.axhline(args.external_goal, color="grey", linestyle="--", linewidth=1)
    ax.fill_between([args.internal_goal, 1.0], args.external_goal, 1.0, color="green", alpha=0.08, label="both goals")
    ax.set_xlim(min(0.88, ax.get_xlim()[0]), 1.0)
    ax.set_xlabel("internal balanced accuracy (the training sites' test cells)")
    ax.set_ylabel("external balanced accuracy (Barcelona)")
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
