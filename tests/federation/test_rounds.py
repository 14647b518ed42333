"""RoundBook: pooled metrics from summed confusion matrices, the gate per round, rollback, records, events."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord

from federation import events as ev
from federation.rounds import RoundBook, round_record_path
from federation.strategies import SiteReply

CLASSES = ("eosinophil", "lymphocyte")


def weights(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32))})


def evaluation(node_id: int, site: str, confusion: list[list[int]], loss: float) -> SiteReply:
    m = np.asarray(confusion)
    return SiteReply(
        "evaluate",
        node_id,
        site,
        True,
        metrics={
            "num-examples": int(m.sum()),
            "loss": loss,
            "confusion": m.reshape(-1).tolist(),
            "balanced-accuracy": 0.0,
        },
        info={"site": site, "class-names": list(CLASSES)},
    )


def training(node_id: int, site: str, n: int) -> SiteReply:
    return SiteReply(
        "train",
        node_id,
        site,
        True,
        metrics={"num-examples": n, "train-loss": 0.4, "train-accuracy": 0.9, "steps": 2, "seconds": 1.5},
        info={"site": site, "class-names": list(CLASSES), "class-counts": [n - 1, 1]},
    )


def play_round(
    book: RoundBook, r: int, aggregate: ArrayRecord, confusions: dict[str, list[list[int]]]
) -> ArrayRecord:
    start = book.start_weights(r, aggregate)
    book.record_replies(r, "train", [training(i, s, 10) for i, s in enumerate(confusions)])
    book.record_aggregate(r, aggregate)
    book.record_replies(
        r, "evaluate", [evaluation(i, s, c, 0.5 + i) for i, (s, c) in enumerate(confusions.items())]
    )
    book(r, aggregate)
    return start


def test_rounds_pool_gate_roll_back_and_leave_records(tmp_path: Path) -> None:
    book = RoundBook(
        run_dir=tmp_path,
        events=ev.EventLog(tmp_path),
        class_names=CLASSES,
        initial_arrays=weights(0.0),
        gate_tolerance=0.05,
        min_sites=2,
        publish=None,
        lineage={"run_id": 7, "strategy": {"name": "fedavg"}},
    )
    assert book(0, weights(0.0)) is None  # Flower's call before round 1 is not a round

    # Round 1: pooled recall eosinophil 3/4, lymphocyte 3/4 → accepted.
    start1 = play_round(book, 1, weights(1.0), {"a": [[2, 0], [1, 1]], "b": [[1, 1], [0, 2]]})
    assert float(start1["w"].numpy()[0]) == 0.0
    # Round 2: lymphocyte never recalled anywhere → rejected.
    start2 = play_round(book, 2, weights(2.0), {"a": [[2, 0], [2, 0]], "b": [[2, 0], [2, 0]]})
    assert float(start2["w"].numpy()[0]) == 1.0
    # Round 3 trains from round 1's weights, not from the rejected aggregate.
    start3 = play_round(book, 3, weights(3.0), {"a": [[2, 0], [0, 2]], "b": [[2, 0], [0, 2]]})
    assert float(start3["w"].numpy()[0]) == 1.0

    r1 = json.loads(round_record_path(tmp_path, 1).read_text())
    assert r1["pooled"]["confusion"] == [[3, 1], [1, 3]]
    assert r1["pooled"]["balanced_accuracy"] == 0.75
    assert r1["pooled"]["loss"] == 1.0  # (4·0.5 + 4·1.5) / 8
    assert r1["sites"]["a"]["evaluate"]["recall"] == {"eosinophil": 1.0, "lymphocyte": 0.5}
    assert r1["sites"]["b"]["train"]["class_counts"] == {"eosinophil": 9, "lymphocyte": 1}
    assert r1["gate"]["accepted"] and r1["start_weights"]["from_round"] == 0
    assert r1["publish"] == {"status": "not-configured", "reason": "no registry configured"}

    r2 = json.loads(round_record_path(tmp_path, 2).read_text())
    assert not r2["gate"]["accepted"] and r2["gate"]["zero_recall_classes"] == ["lymphocyte"]
    assert r2["publish"] is None

    r3 = json.loads(round_record_path(tmp_path, 3).read_text())
    assert r3["start_weights"] == {
        "from_round": 1,
        "registered_version": None,
        "why": "round 2 not accepted: back to the last accepted weights",
    }
    assert r3["gate"]["accepted"] and r3["gate"]["reference_round"] == 1

    kinds = [e["kind"] for e in ev.read_events(tmp_path / ev.EVENTS_FILE)]
    assert kinds.count(ev.ROUND_STARTED) == 3 and kinds.count(ev.GATE_DECISION) == 3
    assert book.summary()["last_accepted_round"] == 3


def test_a_site_that_answers_for_other_classes_is_a_failure_not_a_metric(tmp_path: Path) -> None:
    book = RoundBook(
        run_dir=tmp_path,
        events=ev.EventLog(tmp_path),
        class_names=CLASSES,
        initial_arrays=weights(0.0),
        gate_tolerance=0.05,
        min_sites=1,
        publish=None,
        lineage={},
    )
    wrong = SiteReply(
        "evaluate",
        5,
        "x",
        True,
        metrics={"confusion": [1, 0, 0, 1], "num-examples": 2},
        info={"site": "x", "class-names": ["lymphocyte", "eosinophil"]},
    )
    book.start_weights(1, weights(1.0))
    book.record_replies(1, "evaluate", [wrong])
    assert book.records[1]["sites"]["x"]["evaluate"]["ok"] is False
    assert "expected ['eosinophil', 'lymphocyte']" in book.records[1]["failures"][0]["error"]
