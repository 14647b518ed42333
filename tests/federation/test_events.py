from __future__ import annotations

import json
from pathlib import Path

from federation.events import EVENTS_FILE, EventFollower, EventLog, json_safe, read_events


def test_follower_reads_only_whole_new_lines(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    follower = EventFollower(tmp_path / EVENTS_FILE)
    assert follower.poll() == []  # no file yet
    log.emit("round-started", round=1)
    log.emit("site-replied", round=1, site="bccd", ok=True)
    assert [e["kind"] for e in follower.poll()] == ["round-started", "site-replied"]
    with (tmp_path / EVENTS_FILE).open("a") as fh:
        fh.write('{"kind": "gate-dec')  # a writer half-way through a line
    assert follower.poll() == []
    with (tmp_path / EVENTS_FILE).open("a") as fh:
        fh.write('ision", "round": 1}\n')
    assert follower.poll() == [{"kind": "gate-decision", "round": 1}]


def test_events_are_strict_json_even_with_nan(tmp_path: Path) -> None:
    EventLog(tmp_path).emit(
        "round-evaluated", balanced_accuracy=float("nan"), sites={"a": float("inf")}, path=tmp_path
    )
    line = (tmp_path / EVENTS_FILE).read_text()
    event = json.loads(line)  # would fail on NaN
    assert (
        event["balanced_accuracy"] is None
        and event["sites"] == {"a": None}
        and event["path"] == str(tmp_path)
    )
    assert read_events(tmp_path / EVENTS_FILE)[0]["kind"] == "round-evaluated"
    assert json_safe((1.0, float("nan"))) == [1.0, None]
