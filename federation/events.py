"""The run's event log: one JSON object per line in `<run-dir>/events.jsonl`.

The ServerApp writes it (it is the only process that sees every site's reply); `deploy.py` follows it
to draw progress while `flwr run --stream` runs, and the CLI or a person can read it afterwards. Each
line has `ts` (Unix seconds), `kind` (one of the names below) and the kind's own fields.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

EVENTS_FILE = "events.jsonl"

RUN_STARTED = "run-started"  # run_id, strategy, rounds, sites expected (min_nodes)
NODES_READY = "nodes-ready"  # nodes
ROUND_STARTED = "round-started"  # round, start_weights
SITE_REPLIED = "site-replied"  # round, phase (train|evaluate), site, node_id, ok, error, summary
ROUND_EVALUATED = "round-evaluated"  # round, pooled balanced accuracy, per-site balanced accuracy
GATE_DECISION = "gate-decision"  # round, accepted, reason
VERSION_REGISTERED = "version-registered"  # round, model_name, version, path
REGISTRATION_SKIPPED = "registration-skipped"  # round, reason (parity failed, export error)
RUN_FINISHED = "run-finished"  # rounds, accepted, registered versions, seconds
RUN_FAILED = "run-failed"  # error
STEP_PROBLEM = "step-problem"  # round, phase, problem (too few sites connected / answering)
RUN_RESUMED = "run-resumed"  # federation_run, completed_rounds, last accepted round, version
LIFECYCLE = "lifecycle"  # round, version, candidate, production (promoted or why not)


def json_safe(value: Any) -> Any:
    """NaN/inf become None so every line stays strict JSON (NaN is not JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # NumPy scalars
        return json_safe(value.item())
    return value


class EventLog:
    """Append-only writer; every event is flushed at once so a follower sees it while the run goes on."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / EVENTS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"ts": round(time.time(), 3), "kind": kind, **json_safe(fields)}
        line = json.dumps(event, sort_keys=False, allow_nan=False) + "\n"
        # One write per line with O_APPEND: a follower never reads half an event.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
        return event


class EventFollower:
    """Reads events appended since the last call (a line without its newline yet is left for later)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.offset = 0

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset += end + 1
        events = []
        for raw in data[: end + 1].splitlines():
            if raw.strip():
                try:
                    events.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue  # a foreign or damaged line must not stop the progress display
        return events


def read_events(path: str | Path) -> list[dict[str, Any]]:
    return EventFollower(path).poll()
