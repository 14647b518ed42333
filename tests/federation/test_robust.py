"""Robust aggregation (Flower's Krum, Multi-Krum, trimmed mean), round minimums and DP, with real Flower messages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedTrimmedAvg,
    Krum,
    MultiKrum,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM
from test_strategies import NodesOnly, book, error_reply, reply, state

from federation.privacy import DPConfig, clip_when_asked, privacy_spent, with_dp
from federation.strategies import make_strategy, strategy_params

pytestmark = pytest.mark.usefixtures("server_process")


@pytest.fixture
def server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def honest_and_scaled() -> list[Message]:
    """Three honest sites near w=1 and one that scaled its update by 50 (w = 0 + 50·1)."""
    return [
        reply(11, "a", state(1.0, 1.0, 2), 10),
        reply(12, "b", state(1.2, 1.0, 2), 10),
        reply(13, "c", state(0.9, 1.0, 2), 10),
        reply(14, "evil", state(50.0, 1.0, 2), 10),
    ]


def aggregate(name: str, tmp_path: Path, replies: list[Message], **kwargs) -> ArrayRecord:
    initial = state(0.0, 1.0, 0)
    strategy = make_strategy(name, min_nodes=len(replies), observer=book(tmp_path, initial), **kwargs)
    list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([r.metadata.src_node_id for r in replies])))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return arrays


def test_robust_names_give_flowers_own_classes_with_their_parameters() -> None:
    krum = make_strategy("krum", min_nodes=3, num_malicious=1)
    assert isinstance(krum, Krum) and krum.num_malicious_nodes == 1 and krum.num_nodes_to_select == 1
    multi = make_strategy("multikrum", min_nodes=4, num_malicious=1, multikrum_keep=3)
    assert isinstance(multi, MultiKrum) and multi.num_nodes_to_select == 3
    trimmed = make_strategy("trimmedmean", min_nodes=3, trim_beta=0.34)
    assert isinstance(trimmed, FedTrimmedAvg) and trimmed.beta == 0.34
    assert strategy_params("multikrum", proximal_mu=0, server_lr=0, num_malicious=1, multikrum_keep=3) == {
        "num_malicious": 1,
        "multikrum_keep": 3,
    }
    with pytest.raises(ValueError, match="trims nothing with 3 sites"):
        make_strategy("trimmedmean", min_nodes=3, trim_beta=0.2)
    with pytest.raises(ValueError, match="num-malicious"):
        make_strategy("krum", min_nodes=3, num_malicious=3)
    with pytest.raises(ValueError, match="multikrum-keep"):
        make_strategy("multikrum", min_nodes=3, multikrum_keep=4)


def test_a_scaled_update_drags_fedavg_but_not_the_robust_strategies(tmp_path: Path) -> None:
    weight = {
        name: float(aggregate(name, tmp_path / name, honest_and_scaled(), **kw)["conv.weight"].numpy().mean())
        for name, kw in [
            ("fedavg", {}),
            ("fedmedian", {}),
            ("krum", {"num_malicious": 1}),
            ("multikrum", {"num_malicious": 1, "multikrum_keep": 2}),
            ("trimmedmean", {"trim_beta": 0.25}),
        ]
    }
    assert weight["fedavg"] > 10  # (1 + 1.2 + 0.9 + 50) / 4
    for name in ("fedmedian", "krum", "multikrum", "trimmedmean"):
        assert 0.85 <= weight[name] <= 1.25, (name, weight[name])


def test_integer_counters_survive_robust_aggregation(tmp_path: Path) -> None:
    for name in ("krum", "trimmedmean"):
        arrays = aggregate(name, tmp_path / name, honest_and_scaled(), trim_beta=0.25)
        count = arrays["bn.num_batches_tracked"].numpy()
        assert count.dtype == np.int64 and int(count) == 2


def test_too_few_trained_models_means_no_aggregate_and_a_recorded_reason(tmp_path: Path) -> None:
    initial = state(0.0, 1.0, 0)
    observer = book(tmp_path, initial)
    strategy = make_strategy("fedavg", min_nodes=2, observer=observer)
    list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 13])))
    arrays, _ = strategy.aggregate_train(1, [reply(11, "a", state(1.0, 1.0, 1), 4), error_reply(13)])
    assert arrays is None
    assert observer.records[1]["problems"] == [
        {"phase": "train", "problem": "only 1 site(s) returned a trained model, 2 required"}
    ]
    # Nothing to evaluate: the step is skipped instead of evaluating the old weights again.
    assert list(strategy.configure_evaluate(1, initial, ConfigRecord(), NodesOnly([11, 13]))) == []


def test_missing_sites_skip_the_step_after_the_wait_instead_of_hanging(tmp_path: Path) -> None:
    initial = state(0.0, 1.0, 0)
    observer = book(tmp_path, initial)
    strategy = make_strategy("fedavg", min_nodes=3, node_wait=0.2, observer=observer)
    assert list(strategy.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12]))) == []
    assert observer.records[1]["problems"][0]["problem"].startswith("only 2 site(s) connected within 0.2 s")
    # With the sites back, the same strategy samples all of them.
    assert len(list(strategy.configure_train(2, initial, ConfigRecord(), NodesOnly([11, 12, 13])))) == 3


# ---- differential privacy ------------------------------------------------------------------------------
def test_dp_wrapper_is_flowers_and_noises_floats_only_with_equal_weights(tmp_path: Path) -> None:
    initial = state(0.0, 1.0, 0)
    inner = make_strategy("fedavg", min_nodes=2, uniform_weights=True, observer=book(tmp_path, initial))
    dp = with_dp(inner, DPConfig(noise_multiplier=0.5, clipping_norm=1.0, sites=2))
    assert isinstance(dp, DifferentialPrivacyClientSideFixedClipping)
    messages = list(dp.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 12])))
    assert messages[0].content["config"][KEY_CLIPPING_NORM] == 1.0
    # Unequal example counts, equal weights: the mean is (1 + 3) / 2 plus noise, not (1·1 + 3·9) / 10.
    arrays, _ = dp.aggregate_train(1, [reply(11, "a", state(1.0, 1.0, 4), 1), reply(12, "b", state(3.0, 1.0, 4), 9)])
    weight = arrays["conv.weight"].numpy()
    assert weight.dtype == np.float32 and abs(float(weight.mean()) - 2.0) < 1.5 and np.std(weight) > 0
    assert arrays["bn.num_batches_tracked"].numpy().dtype == np.int64
    assert int(arrays["bn.num_batches_tracked"].numpy()) == 4


def test_dp_round_with_a_missing_site_has_no_aggregate(tmp_path: Path) -> None:
    initial = state(0.0, 1.0, 0)
    observer = book(tmp_path, initial)
    inner = make_strategy("fedavg", min_nodes=1, uniform_weights=True, observer=observer)
    dp = with_dp(inner, DPConfig(noise_multiplier=0.5, clipping_norm=1.0, sites=2))
    list(dp.configure_train(1, initial, ConfigRecord(), NodesOnly([11, 13])))
    arrays, _ = dp.aggregate_train(1, [reply(11, "a", state(1.0, 1.0, 1), 4), error_reply(13)])
    assert arrays is None
    assert "DP: 1 of 2 sites" in observer.records[1]["problems"][0]["problem"]
    assert observer.records[1]["sites"]["a"]["train"]["ok"]


def test_clipping_mod_clips_the_site_update_and_handles_integer_buffers() -> None:
    sent = state(0.0, 1.0, 0)
    msg = Message(
        RecordDict({"arrays": sent, "config": ConfigRecord({KEY_CLIPPING_NORM: 0.5, "server-round": 1})}),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})

    def train(m: Message, ctx: Context) -> Message:
        trained = ArrayRecord(
            {
                "conv.weight": Array(np.full((2, 2), 3.0, np.float32)),  # update norm 6
                "bn.running_var": Array(np.full(2, 1.0, np.float32)),
                "bn.num_batches_tracked": Array(np.array(5, np.int64)),
            }
        )
        return Message(RecordDict({"arrays": trained}), reply_to=m)

    out = clip_when_asked(msg, context, train)
    assert not out.has_error(), out.error
    arrays = out.content["arrays"]
    assert list(arrays.keys()) == list(sent.keys())
    update = np.concatenate([(arrays[k].numpy() - sent[k].numpy()).ravel() for k in ("conv.weight", "bn.running_var")])
    assert np.linalg.norm(update) == pytest.approx(0.5, rel=1e-5)  # clipped from 6
    count = arrays["bn.num_batches_tracked"].numpy()
    assert count.dtype == np.int64 and count.shape == () and int(count) == 5  # a counter, not clipped
    # Evaluate messages (no clipping norm) pass through untouched.
    plain = Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=1, message_type=MessageType.EVALUATE)
    assert clip_when_asked(plain, context, lambda m, c: Message(RecordDict(), reply_to=m)).content is not None


def test_privacy_spent_grows_with_rounds_and_falls_with_noise() -> None:
    weak, strong = DPConfig(0.8, 1.0, 3), DPConfig(2.0, 1.0, 3)
    one, five = privacy_spent(weak, 1)["epsilon"], privacy_spent(weak, 5)["epsilon"]
    assert 0 < one < five
    assert privacy_spent(strong, 5)["epsilon"] < five
    lineage = strong.lineage(releases=5)
    assert lineage["noise_std"] == pytest.approx(2.0 * 1.0 / 3)
    assert lineage["unit"].startswith("site") and lineage["releases"] == 5 and lineage["delta"] == 1e-5
