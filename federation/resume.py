"""Checkpoint after every round; resume a federation after its SuperLink or ServerApp was restarted.

    <run-dir>/state/checkpoint.json      what has been decided (see `Checkpoint`)
    <run-dir>/state/accepted.npz         the last accepted global weights (what the next round starts from)

Order of writes in a round (see `RoundBook.__call__`): the round record (publish pending) → the weights →
checkpoint.json → registration → the round record again → checkpoint.json. Every file is replaced
atomically, so a crash at any point leaves either the previous round or this one on disk, never half.
A resumed ServerApp (run config `resume = true` with the same `run-dir`) starts at the first round the
checkpoint does not count as completed, from the last accepted weights; a round whose registration was
cut off is finished first (the registry is searched for a version of that federation run and round, so
the same round is never registered twice). Flower's own run (its run id) is new after a restart; the
federation run id (`federation_run`) stays and goes into every registered version's lineage.

The round loop is here too (`run_rounds`): Flower's `Strategy.start` always counts from round 1, a
resumed run must continue the count. It calls the same strategy methods in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

STATE_DIR = "state"
CHECKPOINT_FILE = "checkpoint.json"
WEIGHTS_FILE = "accepted.npz"


class ResumeError(RuntimeError):
    """The run directory cannot be resumed (or must not be reused); the message says why."""


@dataclass
class Checkpoint:
    federation_run: str  # stable across restarts (Flower's run id is not)
    total_rounds: int
    completed_rounds: int = 0  # rounds 1..N are decided and recorded
    accepted_round: int = 0  # 0: the initial weights
    accepted_balanced_accuracy: float | None = None
    accepted_version: int | None = None
    weights_sha256: str | None = None
    pending_publish: int | None = None  # accepted round whose registration has not been confirmed
    flower_runs: list[int] = field(default_factory=list)
    resumed: int = 0  # how many times this run was resumed

    # ---- files ----
    @staticmethod
    def folder(run_dir: str | Path) -> Path:
        return Path(run_dir) / STATE_DIR

    @classmethod
    def load(cls, run_dir: str | Path) -> Checkpoint | None:
        path = cls.folder(run_dir) / CHECKPOINT_FILE
        if not path.is_file():
            return None
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ResumeError(f"{path}: unreadable checkpoint ({exc})") from exc

    def save(self, run_dir: str | Path) -> None:
        folder = self.folder(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(folder / CHECKPOINT_FILE, (json.dumps(asdict(self), indent=2) + "\n").encode())

    def save_weights(self, run_dir: str | Path, arrays: ArrayRecord) -> None:
        folder = self.folder(run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.weights_sha256 = save_arrays(folder / WEIGHTS_FILE, arrays)

    def load_weights(self, run_dir: str | Path) -> ArrayRecord:
        path = self.folder(run_dir) / WEIGHTS_FILE
        if not path.is_file():
            raise ResumeError(f"{path}: the accepted weights of round {self.accepted_round} are missing")
        digest = _sha256(path)
        if digest != self.weights_sha256:
            raise ResumeError(
                f"{path}: sha256 {digest[:12]}… does not match the checkpoint's {str(self.weights_sha256)[:12]}…"
            )
        return load_arrays(path)


def start_or_resume(run_dir: str | Path, total_rounds: int, resume: bool, flower_run: int) -> Checkpoint:
    """The checkpoint to continue from (`resume`), or a fresh one (refused if the run dir holds a run)."""
    existing = Checkpoint.load(run_dir)
    if existing is None:
        if resume:
            raise ResumeError(f"{run_dir}: nothing to resume (no {STATE_DIR}/{CHECKPOINT_FILE})")
        state = Checkpoint(federation_run=uuid.uuid4().hex[:12], total_rounds=total_rounds)
    elif not resume:
        raise ResumeError(
            f"{run_dir} already holds federation run {existing.federation_run} "
            f"({existing.completed_rounds}/{existing.total_rounds} rounds): pass resume=true or use a new run-dir"
        )
    else:
        state = existing
        state.resumed += 1
        state.total_rounds = total_rounds
    state.flower_runs.append(int(flower_run))
    state.save(run_dir)
    return state


# ---- the round loop ------------------------------------------------------------------------------------
def run_rounds(
    strategy: Strategy,
    grid: Grid,
    arrays: ArrayRecord,
    *,
    first_round: int,
    last_round: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None],
    serve: Callable[[int, ArrayRecord], ArrayRecord] | None = None,
) -> ArrayRecord:
    """Rounds `first_round`..`last_round` with Flower's strategy methods, in `Strategy.start`'s order.

    `serve(round, aggregate)`: what the sites evaluate and `evaluate_fn` judges instead of the aggregate
    itself (the mean over the last rounds, `federation.averaging`); the next round is configured from the
    aggregate (the observer's `start_weights` decides where it really starts)."""
    for server_round in range(first_round, last_round + 1):
        replies = grid.send_and_receive(
            strategy.configure_train(server_round, arrays, train_config, grid), timeout=timeout
        )
        aggregated, _ = strategy.aggregate_train(server_round, replies)
        evaluated = arrays
        if aggregated is not None:
            arrays = aggregated
            evaluated = serve(server_round, aggregated) if serve is not None else aggregated
        replies = grid.send_and_receive(
            strategy.configure_evaluate(server_round, evaluated, evaluate_config, grid), timeout=timeout
        )
        strategy.aggregate_evaluate(server_round, replies)
        evaluate_fn(server_round, evaluated)
    return arrays


# ---- arrays on disk ------------------------------------------------------------------------------------
def save_arrays(path: Path, arrays: ArrayRecord) -> str:
    """An ArrayRecord as .npz (names and order kept), written atomically; returns its sha256."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(fh, **{f"{i:05d}|{k}": a.numpy() for i, (k, a) in enumerate(arrays.items())})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return _sha256(path)


def load_arrays(path: Path) -> ArrayRecord:
    with np.load(path, allow_pickle=False) as data:
        names = sorted(data.files)
        out = ArrayRecord()
        for name in names:
            out[name.split("|", 1)[1]] = Array(_c_order(data[name]))
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def find_registered(registry: Any, federation_run: str, server_round: int) -> Any | None:
    """The registry version made from this federation run's round, if one was registered before a crash."""
    for info in registry.versions():
        if info.metadata.get("federation_run") == federation_run and info.metadata.get("round") == server_round:
            return info
    return None


def _c_order(value: np.ndarray) -> np.ndarray:
    # not np.ascontiguousarray: it turns 0-d arrays (BatchNorm counters) into 1-d ones
    return value if value.flags.c_contiguous else value.copy(order="C")
