"""Faults in a real deployment: a SuperNode killed mid-round, the SuperLink (with its ServerApp) killed.

Both are slow (Flower notices a dead SuperNode only after its heartbeat lapses, ~60 s; a restart pays the
start-up again), so they run with `-m slow`. Processes are found by the FLWR_HOME each deployment gives
its Flower processes, and killed with SIGKILL: a crash, not a clean stop.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_deploy import CLASSES, TINY_RUN, flower_processes_under

from federation import events as ev
from federation.deploy import run_federation
from federation.sites import DEFAULT_TRAINING_SITES, DataRoot
from models.registry import Registry

pytestmark = pytest.mark.slow
SITES = list(DEFAULT_TRAINING_SITES)


def pids_under(folder: Path) -> list[int]:
    """Live processes whose FLWR_HOME is `folder` or below it."""
    marker = f"FLWR_HOME={folder}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if any(v.startswith(marker) for v in environ.split(b"\0")):
            found.append(int(entry))
    return found


def crash(folder: Path) -> int:
    pids = pids_under(folder)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def wait_for(work: Path, runner: threading.Thread, predicate, timeout: float = 300) -> dict | None:
    deadline = time.time() + timeout
    while time.time() < deadline and runner.is_alive():
        for path in (work / "runs").glob(f"*/{ev.EVENTS_FILE}"):
            for event in ev.read_events(path):
                if predicate(event):
                    return event
        time.sleep(0.5)
    return None


def start(root: Path, tmp_path: Path, run_config: dict, **kwargs) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def federate() -> None:
        outcome["result"] = run_federation(
            root, SITES, tmp_path / "registry", run_config, tmp_path / "work", show_progress=False, **kwargs
        )

    runner = threading.Thread(target=federate, daemon=True)
    runner.start()
    return runner, outcome


def test_a_supernode_killed_mid_round_and_the_round_completes_with_the_rest(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    root = tiny_root_factory(data_root, tmp_path / "data", SITES, CLASSES, train_per_class=4, val_per_class=2)
    work = tmp_path / "work"
    # A train step long enough (20 epochs) that the kill 2 s into round 1 lands while bccd still trains.
    config = {**TINY_RUN, "num-server-rounds": 2, "strategy": "fedavg", "min-nodes": 2, "round-timeout": 150.0,
              "local-epochs": 20}
    runner, outcome = start(root, tmp_path, config)
    try:
        started = wait_for(work, runner, lambda e: e["kind"] == ev.ROUND_STARTED and e["round"] == 1)
        assert started is not None, outcome
        time.sleep(2.0)
        assert crash(work / "flwr" / "nodes" / "bccd") >= 2  # the SuperNode and its ClientApp launcher
    finally:
        runner.join(timeout=900)
    result = outcome["result"]
    print("\nnode lost:", json.dumps(result.summary())[:1500])
    assert result.ok, f"{result.error} (logs: {result.logs})"
    assert any("bccd" in f for f in result.faults)
    first, second = result.rounds
    # The server knows a node's site only from its replies: killed before its first one, it is "node-<id>".
    lost = [f for f in first["failures"] if f["phase"] == "train"]
    assert len(lost) == 1 and lost[0]["site"] in ("bccd", f"node-{lost[0]['node_id']}"), lost
    assert "Node Unavailable" in lost[0]["error"] or "no reply" in lost[0]["error"]
    assert sorted(s for s, e in first["sites"].items() if e.get("train", {}).get("ok")) == ["jiangxi-tecom", "tehran-lisc"]
    assert first["gate"]["reason"] and isinstance(first["gate"]["accepted"], bool)  # decided with the two left
    assert "bccd" not in {s for s, e in second["sites"].items() if e.get("evaluate", {}).get("ok")}
    assert flower_processes_under(work) == []


def test_superlink_crash_after_a_round_resumes_without_counting_a_round_twice(
    data_root: DataRoot, tiny_root_factory, tmp_path: Path
) -> None:
    root = tiny_root_factory(data_root, tmp_path / "data", SITES, CLASSES, train_per_class=4, val_per_class=2)
    work = tmp_path / "work"
    # 10 local epochs: round 1 must recall both classes on the 2-per-class validation to be accepted.
    config = {**TINY_RUN, "num-server-rounds": 3, "strategy": "fedavg", "gate-tolerance": 1.0, "local-epochs": 10}
    runner, outcome = start(root, tmp_path, config, insecure=False, auth=True, max_restarts=1)
    try:
        closed = wait_for(work, runner, lambda e: e["kind"] == ev.ROUND_STARTED and e["round"] == 2)
        assert closed is not None, outcome
        assert crash(work / "flwr" / "superlink") >= 1  # SuperLink + ServerApp launcher + ServerApp
    finally:
        runner.join(timeout=900)
    result = outcome["result"]
    print("\nresumed:", json.dumps(result.summary())[:1500])
    assert result.ok, f"{result.error} (logs: {result.logs})"
    assert len(result.flower_runs) == 2 and any("resuming after round 1" in f for f in result.faults)

    # Every round recorded once; round 2 ran after the restart from round 1's accepted weights.
    assert [r["round"] for r in result.rounds] == [1, 2, 3]
    assert result.rounds[0]["gate"]["accepted"]  # tolerance 1.0: the mechanics, not the accuracy, are tested
    assert result.rounds[1]["start_weights"]["from_round"] == 1
    # The averaged-rounds window survived the restart: round 2 is judged as the mean of rounds 1 and 2.
    assert result.rounds[1]["averaged_rounds"] == [1, 2]
    assert result.rounds[1]["run_id"] != result.rounds[0]["run_id"]
    events = ev.read_events(result.run_dir / ev.EVENTS_FILE)
    resumed = [e for e in events if e["kind"] == ev.RUN_RESUMED]
    assert len(resumed) == 1 and resumed[0]["completed_rounds"] == 1 and resumed[0]["accepted_round"] == 1

    # The registry holds each accepted round once, all from one federation run.
    versions = Registry(tmp_path / "registry", "wbc-classifier").versions()
    rounds = [v.metadata["round"] for v in versions]
    assert len(rounds) == len(set(rounds)) == sum(1 for r in result.rounds if r["gate"]["accepted"])
    assert len({v.metadata["federation_run"] for v in versions}) == 1
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and len(summary["flower_runs"]) == 2
    assert flower_processes_under(work) == []
