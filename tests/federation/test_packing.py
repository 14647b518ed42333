"""Packed model arrays: three arrays on the wire, the same state dict back, the same aggregate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from test_strategies import NodesOnly, book, reply

from federation.packing import Layout, buffer_groups, is_packed
from federation.strategies import make_strategy
from federation.task import build_contract, create_model_from_contract


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return create_model_from_contract(build_contract(input_size=64), pretrained=False)


def test_a_real_model_packs_into_three_arrays_and_back_exactly(model: torch.nn.Module) -> None:
    layout = Layout.of_model(model)
    state = model.state_dict()
    packed = layout.pack(state)
    assert sorted(packed.keys()) == ["buffers-float32", "buffers-int64", "params-float32"] and is_packed(packed)
    assert len(state) > 200 and buffer_groups(packed) == {"buffers-float32", "buffers-int64"}
    back = layout.to_torch(packed)
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape and torch.equal(back[key], value)
    # A plain state dict is read as it is (older messages, tests).
    plain = layout.unpack(ArrayRecord(state))
    assert np.array_equal(plain["conv_stem.weight"], state["conv_stem.weight"].numpy())


def test_a_wrong_layout_is_refused(model: torch.nn.Module) -> None:
    layout = Layout.of_model(model)
    other = Layout.of_model(create_model_from_contract(build_contract(input_size=64, class_names=("a", "b")),
                                                       pretrained=False))
    assert layout.digest != other.digest
    with pytest.raises(ValueError, match="too short|values"):
        other.unpack(layout.pack(model.state_dict()))


def test_fedavg_on_packed_arrays_equals_fedavg_per_tensor(model: torch.nn.Module, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    layout = Layout.of_model(model)
    rng = np.random.default_rng(0)
    states = [{k: (v.numpy() + rng.normal(size=tuple(v.shape)).astype(v.numpy().dtype) if v.is_floating_point() else v.numpy() + i)
               for k, v in model.state_dict().items()} for i in range(2)]
    results = []
    for pack in (False, True):
        records = [layout.pack(s) if pack else ArrayRecord({k: torch.from_numpy(np.array(v)) for k, v in s.items()})
                   for s in states]
        initial = records[0]
        strategy = make_strategy("fedavg", min_nodes=2, observer=book(tmp_path / str(pack), initial))
        list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12])))
        arrays, _ = strategy.aggregate_train(1, [reply(11, "a", records[0], 3), reply(12, "b", records[1], 1)])
        results.append(layout.unpack(arrays))
    for key in results[0]:
        assert results[0][key].dtype == results[1][key].dtype
        assert np.allclose(results[0][key], results[1][key], atol=1e-6), key
