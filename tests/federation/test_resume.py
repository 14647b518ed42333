"""Checkpoint files and the resume rules (the restart itself is exercised in test_faults.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_strategies import state

from federation.resume import Checkpoint, ResumeError, load_arrays, save_arrays, start_or_resume


def test_arrays_round_trip_with_names_order_dtypes_and_0d_counters(tmp_path: Path) -> None:
    arrays = state(0.25, 2.0, 7)
    digest = save_arrays(tmp_path / "w.npz", arrays)
    back = load_arrays(tmp_path / "w.npz")
    assert list(back.keys()) == list(arrays.keys()) and len(digest) == 64
    for key in arrays.keys():
        a, b = arrays[key].numpy(), back[key].numpy()
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_a_fresh_run_dir_starts_and_an_used_one_needs_resume(tmp_path: Path) -> None:
    first = start_or_resume(tmp_path, 5, resume=False, flower_run=11)
    assert first.completed_rounds == 0 and first.flower_runs == [11]
    with pytest.raises(ResumeError, match="pass resume=true"):
        start_or_resume(tmp_path, 5, resume=False, flower_run=12)
    with pytest.raises(ResumeError, match="nothing to resume"):
        start_or_resume(tmp_path / "other", 5, resume=True, flower_run=12)
    again = start_or_resume(tmp_path, 5, resume=True, flower_run=12)
    assert again.federation_run == first.federation_run and again.flower_runs == [11, 12] and again.resumed == 1


def test_resumed_weights_must_match_the_recorded_checksum(tmp_path: Path) -> None:
    checkpoint = start_or_resume(tmp_path, 3, resume=False, flower_run=1)
    checkpoint.save_weights(tmp_path, state(1.0, 1.0, 3))
    checkpoint.accepted_round = checkpoint.completed_rounds = 2
    checkpoint.save(tmp_path)
    loaded = Checkpoint.load(tmp_path)
    assert loaded is not None and loaded.accepted_round == 2
    assert float(loaded.load_weights(tmp_path)["conv.weight"].numpy().mean()) == 1.0
    save_arrays(Checkpoint.folder(tmp_path) / "accepted.npz", state(9.0, 1.0, 3))  # swapped behind its back
    with pytest.raises(ResumeError, match="does not match"):
        loaded.load_weights(tmp_path)
