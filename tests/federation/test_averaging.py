"""Averaged rounds: the mean of the last accepted rounds' aggregates is what is judged and registered,
training goes on from the plain aggregates, a rejected round never enters, and a restart keeps the window."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from federation import events as ev
from federation.averaging import WINDOW_DIR, mean_of
from federation.rounds import Accepted, RoundBook, round_record_path
from tests.federation.test_rounds import CLASSES, evaluation, training

GOOD = {"a": [[2, 0], [0, 2]], "b": [[2, 0], [1, 1]]}  # both classes recalled: the gate accepts
BAD = {"a": [[2, 0], [2, 0]], "b": [[2, 0], [2, 0]]}  # lymphocytes never recalled: rejected


def arrays(value: float, steps: int = 0) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(3, value, np.float32)), "steps": Array(np.array(steps, np.int64))})


def value(record: ArrayRecord) -> float:
    return float(record["w"].numpy()[0])


def book_for(run_dir: Path, published: list[tuple[int, float, dict[str, Any]]]) -> RoundBook:
    def publish(server_round: int, served: ArrayRecord, metadata: dict[str, Any]) -> dict[str, Any]:
        published.append((server_round, value(served), metadata))
        return {"status": "registered", "version": len(published), "path": str(run_dir)}

    return RoundBook(
        run_dir=run_dir, events=ev.EventLog(run_dir), class_names=CLASSES, initial_arrays=arrays(0.0),
        gate_tolerance=1.0, min_sites=2, publish=publish, lineage={}, average_rounds=3,
    )


def play(book: RoundBook, r: int, aggregate: ArrayRecord, confusions: dict) -> tuple[float, float]:
    """One round as `federation.resume.run_rounds` drives it: (start weights, what the sites evaluated)."""
    start = book.start_weights(r, aggregate)
    book.record_replies(r, "train", [training(i, s, 10) for i, s in enumerate(confusions)])
    book.record_aggregate(r, aggregate)
    served = book.serve(r, aggregate)
    book.record_replies(r, "evaluate", [evaluation(i, s, c, 0.5) for i, (s, c) in enumerate(confusions.items())])
    book(r, served)
    return value(start), value(served)


def test_mean_of_averages_floats_and_keeps_the_latest_counters() -> None:
    out = mean_of([arrays(1.0, 5), arrays(2.0, 6), arrays(6.0, 7)])
    assert out["w"].numpy().tolist() == [3.0, 3.0, 3.0] and out["w"].numpy().dtype == np.float32
    assert int(out["steps"].numpy()) == 7
    with pytest.raises(ValueError, match="layout"):
        mean_of([ArrayRecord({"v": Array(np.zeros(3, np.float32))}), arrays(1.0)])


def test_the_mean_of_accepted_rounds_is_judged_and_registered_the_aggregates_are_trained_on(tmp_path: Path) -> None:
    published: list = []
    book = book_for(tmp_path, published)
    assert play(book, 1, arrays(3.0), GOOD) == (0.0, 3.0)  # nothing earlier: the aggregate itself
    assert play(book, 2, arrays(6.0), GOOD) == (3.0, 4.5)  # trains from round 1's aggregate, not a mean
    assert play(book, 3, arrays(99.0), BAD) == (6.0, 36.0)  # judged as mean(3, 6, 99): rejected
    assert play(book, 4, arrays(9.0), GOOD) == (6.0, 6.0)  # back to round 2's aggregate; 99 never enters
    assert play(book, 5, arrays(12.0), GOOD) == (9.0, 9.0)  # the window slides: mean(6, 9, 12)

    assert [(r, v) for r, v, _ in published] == [(1, 3.0), (2, 4.5), (4, 6.0), (5, 9.0)]
    assert [m["averaged_rounds"] for _, _, m in published] == [[1], [1, 2], [1, 2, 4], [2, 4, 5]]
    rejected = json.loads(round_record_path(tmp_path, 3).read_text())
    assert rejected["averaged_rounds"] == [1, 2, 3] and not rejected["gate"]["accepted"]
    assert value(book.accepted.arrays) == 9.0 and value(book.accepted.start) == 12.0
    # On disk: what the next mean needs, and one more for a restart before round 5's checkpoint.
    assert sorted(p.name for p in (tmp_path / WINDOW_DIR).iterdir()) == ["round-002.npz", "round-004.npz", "round-005.npz"]


def test_a_restarted_server_serves_the_same_mean_and_trains_on_the_same_aggregate(tmp_path: Path) -> None:
    first: list = []
    book = book_for(tmp_path, first)
    play(book, 1, arrays(3.0), GOOD)
    play(book, 2, arrays(6.0), GOOD)

    # A new process: the checkpoint holds round 2's registered mean; the window is read back from run_dir.
    again: list = []
    resumed = book_for(tmp_path, again)
    resumed.restore(Accepted(2, book.accepted.balanced_accuracy, book.accepted.arrays, version=2), upto_round=2)
    assert value(resumed.accepted.start) == 6.0
    assert play(resumed, 3, arrays(12.0), GOOD) == (6.0, 7.0)
    assert again[0][2]["averaged_rounds"] == [1, 2, 3]


def test_a_restart_between_a_rounds_window_and_its_checkpoint_forgets_only_that_round(tmp_path: Path) -> None:
    book = book_for(tmp_path, [])
    for r, v in enumerate((3.0, 6.0, 9.0, 12.0), start=1):
        play(book, r, arrays(v), GOOD)  # window of 3: rounds 3 and 4 kept, round 2 pushed out of memory
    # The checkpoint says round 3 was the last completed (round 4's was never written).
    resumed = book_for(tmp_path, [])
    resumed.restore(Accepted(3, None, arrays(6.0)), upto_round=3)
    assert [r for r, _ in resumed.window.kept] == [2, 3] and value(resumed.accepted.start) == 9.0


def test_one_round_averaged_is_the_plain_aggregate_and_leaves_nothing_on_disk(tmp_path: Path) -> None:
    book = RoundBook(run_dir=tmp_path, events=ev.EventLog(tmp_path), class_names=CLASSES,
                     initial_arrays=arrays(0.0), gate_tolerance=1.0, min_sites=2, publish=None, lineage={})
    aggregate = arrays(4.0)
    assert book.serve(1, aggregate) is aggregate
    play(book, 1, aggregate, GOOD)
    assert value(book.accepted.start) == 4.0 and not (tmp_path / WINDOW_DIR).exists()
    assert "averaged_rounds" not in json.loads(round_record_path(tmp_path, 1).read_text())
