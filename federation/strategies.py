"""Flower's own aggregation strategies, selectable by name, extended to keep every site's raw results.

    strategy = make_strategy("fedprox", min_nodes=3, proximal_mu=0.01, observer=book)

Each class is Flower's (`flwr.serverapp.strategy`) with `SiteTracking` in front of it in the MRO. The mixin
does three things and leaves aggregation itself to Flower:
  - hands every train/evaluate reply, per site, to an observer before Flower aggregates (FedMedian
    consumes the reply arrays, so this must come first);
  - lets the observer choose the weights a round starts from (after a rejected round: the last accepted
    global weights, see `federation.rounds`);
  - FedOpt family only: server-side Adam/Yogi/Adagrad moves trainable parameters; BatchNorm running
    statistics and counters are buffers, not gradients, so they take the plain weighted average (an
    adaptive step of size ~server-lr on a running variance can make it negative).
Every aggregate is cast back to the dtypes that were sent, so float32 stays float32 and counters stay ints.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdagrad, FedAdam, FedAvg, FedMedian, FedProx, FedYogi, Strategy

# Keys inside the RecordDicts exchanged with the ClientApp.
ARRAYS_KEY = "arrays"  # Flower's default `arrayrecord_key`
CONFIG_KEY = "config"  # Flower's default `configrecord_key`
METRICS_KEY = "metrics"
SITE_KEY = "site"  # ConfigRecord in every reply: site name (+ class counts after training)
WEIGHT_KEY = "num-examples"

FEDOPT_NAMES = ("fedadam", "fedyogi", "fedadagrad")
STRATEGY_NAMES = ("fedavg", "fedmedian", "fedprox", *FEDOPT_NAMES)


@dataclass(frozen=True)
class SiteReply:
    """One site's answer to one train or evaluate message, as plain Python values."""

    phase: str  # "train" | "evaluate"
    node_id: int
    site: str | None  # None when a node failed before ever naming its site
    ok: bool
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_message(cls, msg: Message, known_sites: dict[int, str] | None = None) -> SiteReply:
        known_sites = known_sites if known_sites is not None else {}
        node_id = int(msg.metadata.src_node_id)
        phase = "train" if msg.metadata.message_type == MessageType.TRAIN else "evaluate"
        if msg.has_error():
            return cls(phase, node_id, known_sites.get(node_id), False, error=str(msg.error.reason))
        content = msg.content
        metrics = dict(content[METRICS_KEY]) if METRICS_KEY in content.metric_records else {}
        info = dict(content[SITE_KEY]) if SITE_KEY in content.config_records else {}
        site = info.get("site")
        if isinstance(site, str):
            known_sites[node_id] = site
        else:
            site = known_sites.get(node_id)
        return cls(phase, node_id, site, True, metrics=metrics, info=info)


class RoundObserver(Protocol):
    """What the strategy reports to (implemented by `federation.rounds.RoundBook`)."""

    node_sites: dict[int, str]

    def start_weights(self, server_round: int, proposed: ArrayRecord) -> ArrayRecord: ...

    def record_replies(self, server_round: int, phase: str, replies: list[SiteReply]) -> None: ...

    def record_aggregate(self, server_round: int, arrays: ArrayRecord | None) -> None: ...


class SiteTracking:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    observer: RoundObserver | None = None
    averaged_keys: frozenset[str] = frozenset()
    _sent_dtypes: dict[str, np.dtype]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.observer is not None:
            arrays = self.observer.start_weights(server_round, arrays)
        self._sent_dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Aggregate in site order, not arrival order: float sums then do not depend on which hospital
        # answered first, so the same seed gives the same global model.
        replies = sorted(replies, key=_site_order)
        self._report(server_round, "train", replies)
        valid = [m for m in replies if not m.has_error()]
        plain = (
            _weighted_average(valid, self.averaged_keys, WEIGHT_KEY) if self.averaged_keys and valid else {}
        )
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None:
            arrays = self._restore(arrays, plain)
        if self.observer is not None:
            self.observer.record_aggregate(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._report(server_round, "evaluate", replies)
        return super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]

    def _report(self, server_round: int, phase: str, replies: list[Message]) -> None:
        if self.observer is None:
            return
        parsed = [SiteReply.from_message(m, self.observer.node_sites) for m in replies]
        self.observer.record_replies(server_round, phase, parsed)

    def _restore(self, arrays: ArrayRecord, plain: dict[str, np.ndarray]) -> ArrayRecord:
        sent = getattr(self, "_sent_dtypes", {})
        out = ArrayRecord()
        for key, array in arrays.items():
            value = np.asarray(plain[key] if key in plain else array.numpy())  # 0-d stays 0-d
            dtype = sent.get(key, value.dtype)
            if np.issubdtype(dtype, np.integer) and not np.issubdtype(value.dtype, np.integer):
                value = np.rint(value)
            value = np.asarray(value.astype(dtype, copy=False))
            out[key] = Array(value if value.flags.c_contiguous else value.copy(order="C"))
        return out


def _site_order(msg: Message) -> tuple[str, int]:
    site = ""
    if not msg.has_error() and SITE_KEY in msg.content.config_records:
        site = str(msg.content[SITE_KEY].get("site", ""))
    return site, int(msg.metadata.src_node_id)


def _weighted_average(replies: list[Message], keys: frozenset[str], weight_key: str) -> dict[str, np.ndarray]:
    """Weighted mean of only `keys` over the replies' single ArrayRecord (FedAvg's rule, fewer tensors)."""
    weights = [float(next(iter(m.content.metric_records.values()))[weight_key]) for m in replies]
    total = sum(weights) or 1.0
    out: dict[str, np.ndarray] = {}
    for msg, weight in zip(replies, weights):
        record = next(iter(msg.content.array_records.values()))
        for key in keys & set(record.keys()):
            value = record[key].numpy().astype(np.float64) * (weight / total)
            out[key] = out[key] + value if key in out else value
    return out


class TrackedFedAvg(SiteTracking, FedAvg):
    pass


class TrackedFedMedian(SiteTracking, FedMedian):
    pass


class TrackedFedProx(SiteTracking, FedProx):
    pass


class TrackedFedAdam(SiteTracking, FedAdam):
    pass


class TrackedFedYogi(SiteTracking, FedYogi):
    pass


class TrackedFedAdagrad(SiteTracking, FedAdagrad):
    pass


_CLASSES: dict[str, type[SiteTracking]] = {
    "fedavg": TrackedFedAvg,
    "fedmedian": TrackedFedMedian,
    "fedprox": TrackedFedProx,
    "fedadam": TrackedFedAdam,
    "fedyogi": TrackedFedYogi,
    "fedadagrad": TrackedFedAdagrad,
}


def strategy_params(name: str, *, proximal_mu: float, server_lr: float) -> dict[str, float]:
    """The parameters that matter for `name` (what lineage records beside the name)."""
    name = _check_name(name)
    if name == "fedprox":
        return {"proximal_mu": proximal_mu}
    if name in FEDOPT_NAMES:
        return {"server_lr": server_lr}
    return {}


def make_strategy(
    name: str,
    *,
    min_nodes: int,
    proximal_mu: float = 0.0,
    server_lr: float = 0.01,
    client_lr: float = 0.001,
    observer: RoundObserver | None = None,
    buffer_keys: Iterable[str] = (),
) -> Strategy:
    """A Flower strategy by name that trains and evaluates on every connected site (at least `min_nodes`).

    `buffer_keys`: state-dict entries that are not trained parameters (BatchNorm statistics); FedOpt
    averages them instead of applying its server optimiser.
    """
    name = _check_name(name)
    if min_nodes < 1:
        raise ValueError(f"min-nodes must be at least 1, got {min_nodes}")
    common: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
        "weighted_by_key": WEIGHT_KEY,
        "arrayrecord_key": ARRAYS_KEY,
        "configrecord_key": CONFIG_KEY,
    }
    if name == "fedprox":
        if proximal_mu < 0:
            raise ValueError(f"proximal-mu must be >= 0, got {proximal_mu}")
        common["proximal_mu"] = proximal_mu
    if name in FEDOPT_NAMES:
        if server_lr <= 0:
            raise ValueError(f"server-lr must be > 0 for {name}, got {server_lr}")
        common.update(eta=server_lr, eta_l=client_lr)
    strategy = _CLASSES[name](**common)
    strategy.observer = observer
    if name in FEDOPT_NAMES:
        strategy.averaged_keys = frozenset(buffer_keys)
    return strategy  # type: ignore[return-value]


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in _CLASSES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return key
