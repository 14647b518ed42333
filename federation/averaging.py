"""The served model as the mean of the last rounds' aggregates (run-config `average-rounds`).

FedAvg's answer at a hospital that never trained moves from round to round and from run to run
(eosinophils traded against lymphocytes). The mean of the last few global models (Polyak / SWA
averaging done by the server; one exported graph like any other) is better at the held-out training
site (the federated leave-one-site-out criterion) and steadier and better calibrated at Barcelona, though
not more accurate there (0.01 lower in the benchmarks; docs/results.md, "Averaged rounds"). Training itself goes on from
each round's plain aggregate; only what the sites evaluate (the gate, the temperature) and what is
registered is the mean.

Floating-point arrays are averaged element-wise (parameters and BatchNorm statistics alike); integer
arrays (BatchNorm's step counters) are the latest round's. The window is kept in the run directory so a
resumed run serves the same mean it would have served without the restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from federation.resume import load_arrays, save_arrays

WINDOW_DIR = "average-window"


def mean_of(records: Sequence[ArrayRecord]) -> ArrayRecord:
    """Element-wise mean of same-layout records (float arrays; integer arrays: the last record's)."""
    if not records:
        raise ValueError("nothing to average")
    last = records[-1]
    if len(records) == 1:
        return last
    for record in records[:-1]:
        if list(record.keys()) != list(last.keys()):
            raise ValueError("the rounds' arrays do not share one layout")
    out = ArrayRecord()
    for key, array in last.items():
        latest = array.numpy()
        if latest.dtype.kind == "f":
            stacked = np.stack([r[key].numpy() for r in records])
            latest = stacked.mean(axis=0, dtype=np.float64).astype(latest.dtype)
        out[key] = Array(np.array(latest, order="C"))  # (ascontiguousarray would make a 0-d counter 1-d)
    return out


class RoundWindow:
    """The accepted rounds' plain aggregates that the next served mean takes in: the last `size` - 1 of
    them, plus the candidate round's own aggregate. A rejected round's aggregate never enters (training
    goes back to the last accepted one, see `federation.rounds`). Mirrored in `run_dir` for resume."""

    def __init__(self, size: int, run_dir: str | Path | None = None) -> None:
        if size < 1:
            raise ValueError(f"average-rounds must be >= 1, not {size}")
        self.size = size
        self.dir = Path(run_dir) / WINDOW_DIR if run_dir and size > 1 else None
        self.kept: list[tuple[int, ArrayRecord]] = []

    def candidate(self, aggregate: ArrayRecord) -> ArrayRecord:
        """What the sites evaluate and the registry gets if this round is accepted."""
        return mean_of([a for _, a in self._earlier()] + [aggregate])

    def candidate_rounds(self, server_round: int) -> list[int]:
        return [r for r, _ in self._earlier()] + [server_round]

    def keep(self, server_round: int, aggregate: ArrayRecord) -> None:
        """An accepted round's plain aggregate joins the window (the oldest beyond it leaves)."""
        if self.size == 1:
            return
        self.kept = ([(r, a) for r, a in self.kept if r < server_round] + [(server_round, aggregate)])[-(self.size - 1):]
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_arrays(self.dir / f"round-{server_round:03d}.npz", aggregate)
            # One more than the window on disk: a restart before this round's checkpoint drops this round
            # (`restore`) and still finds the one it pushed out.
            for path in sorted(self.dir.glob("round-*.npz"))[: -self.size]:
                path.unlink()

    def aggregate_of(self, server_round: int) -> ArrayRecord | None:
        return next((a for r, a in self.kept if r == server_round), None)

    def restore(self, up_to_round: int) -> None:
        """Reload the window a previous process left in `run_dir` (rounds after `up_to_round` dropped)."""
        if self.dir is None or not self.dir.is_dir():
            return
        found = sorted((int(p.stem[6:]), p) for p in self.dir.glob("round-*.npz") if p.stem[6:].isdigit())
        self.kept = [(r, load_arrays(p)) for r, p in found if r <= up_to_round][-(self.size - 1):]

    def _earlier(self) -> list[tuple[int, ArrayRecord]]:
        return self.kept[-(self.size - 1):] if self.size > 1 else []
