"""Strategy selection by name, and what SiteTracking adds to Flower's own aggregation."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedYogi

from federation.events import EventLog
from federation.rounds import RoundBook
from federation.strategies import STRATEGY_NAMES, SiteReply, make_strategy, strategy_params

CLASSES = ("eosinophil", "lymphocyte")


@pytest.mark.parametrize(
    ("name", "flower_class"),
    [
        ("fedavg", FedAvg),
        ("fedmedian", FedMedian),
        ("fedprox", FedProx),
        ("fedadam", FedAdam),
        ("fedyogi", FedYogi),
        ("FedAdagrad", FedAdagrad),
    ],
)
def test_each_name_gives_flowers_own_strategy(name: str, flower_class: type) -> None:
    strategy = make_strategy(name, min_nodes=3, proximal_mu=0.05, server_lr=0.003)
    assert isinstance(strategy, flower_class)
    assert strategy.min_available_nodes == strategy.min_train_nodes == strategy.min_evaluate_nodes == 3
    assert strategy.fraction_train == strategy.fraction_evaluate == 1.0


def test_parameters_reach_the_flower_classes() -> None:
    assert make_strategy("fedprox", min_nodes=2, proximal_mu=0.05).proximal_mu == 0.05
    assert make_strategy("fedadam", min_nodes=2, server_lr=0.003).eta == 0.003
    assert strategy_params("fedprox", proximal_mu=0.05, server_lr=0.003) == {"proximal_mu": 0.05}
    assert strategy_params("fedyogi", proximal_mu=0.05, server_lr=0.003) == {"server_lr": 0.003}
    assert strategy_params("fedmedian", proximal_mu=0.05, server_lr=0.003) == {}
    assert set(STRATEGY_NAMES) == {
        "fedavg", "fedmedian", "fedprox", "fedadam", "fedyogi", "fedadagrad", "krum", "multikrum", "trimmedmean"
    }


def test_bad_names_and_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown strategy 'fedsgd'.*fedavg"):
        make_strategy("fedsgd", min_nodes=3)
    with pytest.raises(ValueError, match="server-lr"):
        make_strategy("fedadam", min_nodes=3, server_lr=0.0)
    with pytest.raises(ValueError, match="proximal-mu"):
        make_strategy("fedprox", min_nodes=3, proximal_mu=-1.0)
    with pytest.raises(ValueError, match="min-nodes"):
        make_strategy("fedavg", min_nodes=0)


# ---- aggregation with real Flower messages --------------------------------------------------------
class NodesOnly(Grid):
    """The least a strategy needs from a Grid to sample nodes; nothing is sent anywhere."""

    def __init__(self, node_ids: Iterable[int]):
        self.node_ids = list(node_ids)

    def set_run(self, run):  # pragma: no cover - not used
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


def state(w: float, var: float, count: int) -> ArrayRecord:
    return ArrayRecord(
        {
            "conv.weight": Array(np.full((2, 2), w, np.float32)),
            "bn.running_var": Array(np.full(2, var, np.float32)),
            "bn.num_batches_tracked": Array(np.array(count, np.int64)),
        }
    )


def reply(node_id: int, site: str, arrays: ArrayRecord, n: int, phase: str = MessageType.TRAIN) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"q{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=phase,
    )
    content = RecordDict(
        {
            "arrays": arrays,
            "metrics": MetricRecord(
                {"num-examples": n, "train-loss": 0.5, "train-accuracy": 0.8, "steps": 1, "seconds": 1.0}
            ),
            "site": ConfigRecord(
                {"site": site, "class-names": list(CLASSES), "class-counts": [n // 2, n - n // 2]}
            ),
        }
    )
    return Message(metadata=metadata, content=content)


def error_reply(node_id: int) -> Message:
    from flwr.app import Error

    metadata = Metadata(
        run_id=1,
        message_id=f"e{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"q{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(metadata=metadata, error=Error(code=0, reason="ClientApp crashed: out of memory"))


@pytest.fixture
def server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outgoing Messages read the run and node from the process's task identity, set by flwr-serverapp."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def book(tmp_path: Path, initial: ArrayRecord) -> RoundBook:
    return RoundBook(
        run_dir=tmp_path,
        events=EventLog(tmp_path),
        class_names=CLASSES,
        initial_arrays=initial,
        gate_tolerance=0.02,
        min_sites=2,
        publish=None,
        lineage={"run_id": 1, "strategy": {"name": "test"}},
    )


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "trimmedmean"])
def test_values_no_site_changed_come_back_bit_for_bit(tmp_path: Path, server_process: None, name: str) -> None:
    """A frozen trunk is sent back unchanged by every site; its weighted mean must be it exactly (one ulp
    off changes its digest and every site's cache key, federation.site_cache), while a trained value is
    the weighted mean as before."""
    rng = np.random.default_rng(0)
    frozen = rng.normal(size=(64, 64)).astype(np.float32)

    def arrays(trained: float) -> ArrayRecord:
        return ArrayRecord({"trunk": Array(frozen.copy()), "head": Array(np.full(3, trained, np.float32))})

    initial = arrays(0.0)
    strategy = make_strategy(name, min_nodes=3, observer=book(tmp_path, initial))
    list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12, 13])))
    replies = [reply(11, "a", arrays(1.0), 213), reply(12, "b", arrays(2.0), 248), reply(13, "c", arrays(4.0), 918)]
    naive = sum(frozen * np.float32(n / 1379) for n in (213, 248, 918))  # what rounding does to a mean
    assert not np.array_equal(naive, frozen)
    out, _ = strategy.aggregate_train(1, replies)
    assert np.array_equal(out["trunk"].numpy(), frozen) and out["trunk"].numpy().dtype == np.float32
    head = out["head"].numpy()
    expected = 2.0 if name == "trimmedmean" else (213 * 1.0 + 248 * 2.0 + 918 * 4.0) / 1379
    assert np.allclose(head, expected, atol=1e-5), head


def test_fedadam_steps_parameters_but_averages_buffers_and_keeps_dtypes(
    tmp_path: Path, server_process: None
) -> None:
    initial = state(0.0, 1.0, 0)
    observer = book(tmp_path, initial)
    strategy = make_strategy(
        "fedadam",
        min_nodes=2,
        server_lr=0.1,
        observer=observer,
        buffer_keys={"bn.running_var", "bn.num_batches_tracked"},
    )
    list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12])))
    arrays, _ = strategy.aggregate_train(
        1, [reply(11, "a", state(1.0, 1.0, 4), 1), reply(12, "b", state(3.0, 3.0, 4), 3)]
    )

    var = arrays["bn.running_var"].numpy()
    assert var.dtype == np.float32 and np.allclose(var, 2.5)  # (1·1 + 3·3) / 4, not an Adam step
    count = arrays["bn.num_batches_tracked"].numpy()
    assert count.dtype == np.int64 and int(count) == 4
    weight = arrays["conv.weight"].numpy()
    assert weight.dtype == np.float32
    assert not np.allclose(weight, 2.5)  # the server optimiser moved it, FedAvg would give 2.5
    assert np.all(weight > 0)


def test_replies_are_recorded_per_site_before_fedmedian_consumes_them(
    tmp_path: Path, server_process: None
) -> None:
    initial = state(0.0, 1.0, 0)
    observer = book(tmp_path, initial)
    strategy = make_strategy("fedmedian", min_nodes=2, observer=observer)
    list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12, 13])))
    replies = [reply(11, "a", state(1.0, 1.0, 1), 4), reply(12, "b", state(5.0, 1.0, 1), 2), error_reply(13)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert np.allclose(arrays["conv.weight"].numpy(), 3.0)  # median of two = their mean

    record = observer.records[1]
    assert record["sites"]["a"]["train"]["num_examples"] == 4
    assert record["sites"]["b"]["train"]["class_counts"] == {"eosinophil": 1, "lymphocyte": 1}
    assert record["failures"] == [
        {"site": "node-13", "node_id": 13, "phase": "train", "error": "ClientApp crashed: out of memory"}
    ]
    assert observer.node_sites == {11: "a", 12: "b"}


def test_an_error_reply_keeps_the_site_name_learnt_earlier() -> None:
    known = {13: "bccd"}
    parsed = SiteReply.from_message(error_reply(13), known)
    assert (parsed.site, parsed.ok, parsed.phase) == ("bccd", False, "train")
