"""Markdown tables for docs/results.md from the benchmark commands' JSON files.

    .venv/bin/python benchmarks/results_tables.py var/benchmark/paper/paper.json [--eval external]
    .venv/bin/python benchmarks/results_tables.py var/benchmark/ablations-recipe/ablations.json

One line per (backbone, row): balanced accuracy and macro-F1 per evaluation set (mean ± sd over seeds),
then the calibration of the last evaluation set: ECE at T = 1, with the temperature fitted on the training
sites' validation (T_val), and with the shipped rule T = max(1, T_val) (models.calibration.calibrate).
Rows of every format the benchmark has written are read (see `_ece_shipped`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from federation.benchmark.report import _mean_sd, group_rows  # noqa: E402


def _fitted(row: dict) -> float:
    return float(row.get("val_temperature", row["temperature"]))


def _ece_shipped(row: dict, name: str) -> float:
    """ECE under the soften-only rule, T = max(1, T_val)."""
    e = row[name]
    if "ece_soften_only" in e:
        return e["ece_soften_only"]
    if "val_temperature" in row:  # rows of 27 Nov 23:53-00:20 calibrated with the soften-only rule only
        return e["ece_calibrated"]
    return e["ece"] if _fitted(row) < 1.0 else e["ece_calibrated"]


def _ece_fitted(row: dict, name: str) -> float | None:
    """ECE at the fitted T_val (None where a row did not compute it)."""
    if "val_temperature" in row and "ece_soften_only" not in row[name]:
        return row[name]["ece_calibrated"] if _fitted(row) >= 1.0 else None
    return row[name]["ece_calibrated"]


def table(rows: list[dict], eval_names: list[str]) -> str:
    last = eval_names[-1]
    head = ["backbone", "row"]
    for e in eval_names:
        head += [f"{e} bal. acc.", f"{e} macro-F1"]
    head += [f"{last} ECE: T=1 / T_val / max(1, T_val)", "T_val", "seeds", "CPU s/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (arm, kind, name), group in group_rows(rows).items():
        cells = [arm, name if kind != "single-site" else f"single-site: {name}"]
        for e in eval_names:
            cells.append(_mean_sd([g[e]["balanced_accuracy"] for g in group]))
            cells.append(_mean_sd([g[e]["macro_f1"] for g in group]))
        fitted = [x for x in (_ece_fitted(g, last) for g in group) if x is not None]
        cells.append(
            f"{np.mean([g[last]['ece'] for g in group]):.3f} / "
            f"{(f'{np.mean(fitted):.3f}' if fitted else '–')} / "
            f"{np.mean([_ece_shipped(g, last) for g in group]):.3f}"
        )
        cells.append(f"{np.mean([_fitted(g) for g in group]):.2f}")
        cells.append(str(len(group)))
        cpu = [g.get("cpu_seconds") for g in group if g.get("cpu_seconds") is not None]
        cells.append(f"{np.mean(cpu):.0f}" if cpu else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    args = ap.parse_args()
    payload = json.loads(args.json.read_text())
    rows = payload["rows"]
    names = [n for n in ("internal", "external", "test") if n in rows[0]]
    print(table(rows, names))


if __name__ == "__main__":
    main()
