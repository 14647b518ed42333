"""Benchmark output: a markdown table like the paper's, the JSON of every row, and PNG plots."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROW_ORDER = ("single-site", "centralised", "federated")


def _mean_sd(values: Sequence[float]) -> str:
    v = [x for x in values if x is not None and not math.isnan(x)]
    if not v:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{np.mean(v):.3f} ± {np.std(v, ddof=1):.3f}"


def group_rows(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """(arm, kind, row) → the rows of every seed, in first-seen order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["arm"], r["kind"], r["row"])].append(r)
    return dict(groups)


def markdown_table(rows: Sequence[dict[str, Any]], eval_names: Sequence[str]) -> str:
    """One line per (arm, row): balanced accuracy and macro-F1 per evaluation set (mean ± sd over seeds),
    calibration on the last evaluation set, wall-clock seconds per seed."""
    last = eval_names[-1]
    head = ["backbone", "row"]
    for e in eval_names:
        head += [f"{e} bal. acc.", f"{e} macro-F1"]
    head += [f"{last} ECE (T=1 → fitted T)", "seeds", "s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, kind, name), group in group_rows(rows).items():
        cells = [arm, name if kind != "single-site" else f"single-site: {name}"]
        for e in eval_names:
            cells.append(_mean_sd([g[e]["balanced_accuracy"] for g in group]))
            cells.append(_mean_sd([g[e]["macro_f1"] for g in group]))
        ece = np.mean([g[last]["ece"] for g in group])
        ece_t = np.mean([g[last]["ece_calibrated"] for g in group])
        cells.append(f"{ece:.3f} → {ece_t:.3f}")
        cells.append(str(len(group)))
        cells.append(f"{np.mean([g['seconds'] for g in group]):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(rows: Sequence[dict[str, Any]], eval_name: str, class_names: Sequence[str]) -> str:
    head = ["backbone", "row", *class_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, _kind, name), group in group_rows(rows).items():
        cells = [arm, name]
        for c in class_names:
            vals = [g[eval_name]["recall"].get(c) for g in group]
            vals = [v for v in vals if v is not None]
            cells.append(f"{np.mean(vals):.2f}" if vals else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=True) + "\n")


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Per-round validation balanced accuracy of each site, one panel per federated row (first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed = [g[0] for (_a, kind, _n), g in group_rows(rows).items() if kind == "federated" and g[0]["curves"]]
    if not fed:
        return None
    fig, axes = plt.subplots(1, len(fed), figsize=(3.2 * len(fed), 2.8), sharey=True, squeeze=False)
    for ax, row in zip(axes[0], fed):
        for site, curve in sorted(row["curves"].items()):
            ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=site)
        ax.set_title(f"{row['row']}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("site val balanced accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusions(
    rows: Sequence[dict[str, Any]], eval_name: str, class_names: Sequence[str], path: Path, title: str
) -> Path | None:
    """Row-normalised confusion matrices (summed over seeds) of the centralised and federated rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(k, g) for k, g in group_rows(rows).items() if k[1] != "single-site"]
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(2.9 * len(groups), 3.1), squeeze=False)
    short = [c[:4] for c in class_names]
    for ax, ((_arm, _kind, name), group) in zip(axes[0], groups):
        cm = np.sum([np.asarray(g[eval_name]["confusion"], dtype=float) for g in group], axis=0)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(class_names)):
            for j in range(len(class_names)):
                ax.text(
                    j,
                    i,
                    f"{norm[i, j]:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
        ax.set_xticks(range(len(short)), short, fontsize=7, rotation=90)
        ax.set_yticks(range(len(short)), short, fontsize=7)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel("true")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
