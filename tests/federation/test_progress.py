"""The run's progress view: a live table on a terminal, one plain line per event when piped (CI logs)."""

from __future__ import annotations

import io

from rich.console import Console

from federation import events as ev
from federation.progress import ProgressView

EVENTS = [
    {"kind": ev.RUN_STARTED, "run_id": 7, "strategy": {"name": "fedavg"}, "min_nodes": 2},
    {"kind": ev.NODES_READY, "nodes": 2},
    {"kind": ev.ROUND_STARTED, "round": 1},
    {"kind": ev.SITE_REPLIED, "round": 1, "phase": "train", "site": "bccd", "ok": True,
     "summary": {"num-examples": 248, "train-loss": 0.5, "seconds": 3.25}},
    {"kind": ev.SITE_REPLIED, "round": 1, "phase": "train", "site": "tehran-lisc", "ok": False,
     "error": "node unavailable"},
    {"kind": ev.ROUND_EVALUATED, "round": 1, "balanced_accuracy": 0.8125},
    {"kind": ev.GATE_DECISION, "round": 1, "accepted": True, "reason": "first round"},
    {"kind": ev.VERSION_REGISTERED, "round": 1, "model_name": "wbc-classifier", "version": 3},
]  # fmt: skip


def _run(terminal: bool) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    with ProgressView(1, ["bccd", "tehran-lisc"], console=console) as view:
        view.update(EVENTS[:4])
        early = out.getvalue()
        view.update(EVENTS[4:])
        view.finish("finished")
    return early, out.getvalue()


def test_piped_output_prints_each_event_as_it_happens():
    early, text = _run(terminal=False)
    # what happened so far is already in the log before the run ends
    assert "round 1/1 started" in early and "bccd train: 248 cells, loss 0.5000, 3.2 s" in early
    lines = text.splitlines()
    assert "round 1: pooled val balanced accuracy 0.8125" in lines
    assert "round 1: accepted — first round" in lines
    assert "round 1: registered wbc-classifier v3" in lines
    assert any("tehran-lisc train: failed: node unavailable" in line for line in lines)
    assert lines[-1] == "Flower run status: finished"
    assert "\x1b[" not in text  # no terminal control codes in a log file


def test_terminal_gets_the_live_table():
    _, text = _run(terminal=True)
    assert "Round 1/1" in text and "\x1b[" in text
    assert "registered wbc-classifier v3" in text
