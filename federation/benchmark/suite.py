"""The two benchmark commands end to end: arms → features → rows per seed → table, JSON, plots.

wbc benchmark paper       (run_paper)
wbc benchmark in-domain   (run_in_domain)
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from federation.benchmark import report
from federation.benchmark.protocols import (
    PAPER_STRATEGIES,
    Arm,
    arm_features,
    in_domain_layout,
    paper_layout,
    run_rows,
)
from federation.sites import DataRoot


def _environment(threads: int) -> dict[str, Any]:
    import flwr
    import timm

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "flwr": flwr.__version__ if hasattr(flwr, "__version__") else "1.42",
        "cpu_threads": threads,
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
    }


def run_paper(
    data: DataRoot,
    arms: Sequence[Arm],
    *,
    seeds: Sequence[int],
    strategies: Sequence[str] = PAPER_STRATEGIES,
    out: Path,
    cache: Path,
    seeds_for: dict[str, Sequence[int]] | None = None,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Protocol 1. `seeds_for` may give an arm fewer seeds (e.g. the from-scratch ResNet-34)."""
    torch.set_num_threads(threads)
    t0, c0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
    layout = paper_layout(data)
    rows: list[dict[str, Any]] = []
    arm_info = []
    for arm in arms:
        log(f"== {arm.name}: {arm.architecture} {arm.input_size}px, top={arm.top}, views={arm.views}")
        d = arm_features(arm, layout, cache, log=log, data=data)
        arm_info.append({**arm.describe(), "feature_seconds": round(d.seconds, 1)})
        arm_strategies = [s for s in strategies if arm.strategies is None or s in arm.strategies]
        for seed in (seeds_for or {}).get(arm.name, seeds):
            rows += run_rows(arm, d, seed, arm_strategies, single_site=arm.single_site, log=log)
    payload = {
        "protocol": "paper",
        "seeds": list(seeds),
        "strategies": list(strategies),
        "arms": arm_info,
        "rows": rows,
        "wall_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "load_average": {"start": load0, "end": os.getloadavg()[0]},
        "environment": _environment(threads),
        "class_names": list(layout.class_names),
        "counts": {
            "train": {s: len(v) for s, v in layout.train.items()},
            "val": {s: len(v) for s, v in layout.val.items()},
            "internal_test": len(layout.evaluation["internal"]),
            "external": len(layout.evaluation["external"]),
        },
    }
    _write(out, "paper", payload, ["internal", "external"], layout.class_names)
    return payload


def run_in_domain(
    data: DataRoot,
    arms: Sequence[Arm],
    *,
    seeds: Sequence[int],
    strategies: Sequence[str] = PAPER_STRATEGIES,
    out: Path,
    cache: Path,
    partition_seed: int = 0,
    threads: int = 1,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Protocol 2: the partition is drawn once (partition_seed) and written down; rows per training seed."""
    torch.set_num_threads(threads)
    t0, c0, load0 = time.time(), time.process_time(), os.getloadavg()[0]
    layout, partition = in_domain_layout(data, partition_seed)
    rows: list[dict[str, Any]] = []
    arm_info = []
    for arm in arms:
        log(f"== {arm.name}: {arm.architecture} {arm.input_size}px, top={arm.top}, views={arm.views}")
        d = arm_features(arm, layout, cache, log=log, data=data)
        arm_info.append({**arm.describe(), "feature_seconds": round(d.seconds, 1)})
        for seed in seeds:
            rows += run_rows(arm, d, seed, strategies, single_site=False, log=log)
    payload = {
        "protocol": "in-domain",
        "seeds": list(seeds),
        "strategies": list(strategies),
        "partition": partition,
        "arms": arm_info,
        "rows": rows,
        "wall_seconds": round(time.time() - t0, 1),
        "cpu_seconds": round(time.process_time() - c0, 1),
        "load_average": {"start": load0, "end": os.getloadavg()[0]},
        "environment": _environment(threads),
        "class_names": list(layout.class_names),
    }
    _write(out, "in-domain", payload, ["test"], layout.class_names)
    return payload


def _write(out: Path, name: str, payload: dict[str, Any], eval_names: list[str], class_names) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / f"{name}.json", payload)
    rows = payload["rows"]
    text = [f"# Benchmark: {name}", "", report.markdown_table(rows, eval_names), ""]
    text += [
        f"Per-class recall ({eval_names[-1]}, mean over seeds):",
        "",
        report.recall_table(rows, eval_names[-1], class_names),
        "",
    ]
    text.append(
        f"Wall-clock: {payload['wall_seconds']:.0f} s in all ({payload['cpu_seconds']:.0f} CPU-seconds; "
        f"1-min load average {payload['load_average']['start']:.1f} at start, "
        f"{payload['load_average']['end']:.1f} at end, on {payload['environment']['cpu_threads']} threads)."
    )
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    for arm in dict.fromkeys(r["arm"] for r in rows):
        arm_rows = [r for r in rows if r["arm"] == arm]
        slug = arm.replace(" ", "-").replace("/", "-")
        report.plot_curves(
            arm_rows, out / f"{name}-{slug}-curves.png", f"{name}: {arm} — per-site validation"
        )
        report.plot_confusions(
            arm_rows,
            eval_names[-1],
            class_names,
            out / f"{name}-{slug}-confusion.png",
            f"{name}: {arm} — {eval_names[-1]} confusion (rows: true)",
        )
