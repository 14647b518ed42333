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

Faults: a round aggregates only when at least `min_train_nodes` sites returned a trained model (otherwise
it has no candidate and the gate rejects it); sampling waits at most `node_wait` seconds for the minimum
number of connected sites (Flower's own sampler waits forever) and skips the step when they are not
there, so a federation that lost hospitals records rejected rounds instead of hanging.

Robust aggregation (Flower's own): `krum`, `multikrum` (`num_malicious`, `multikrum_keep`) and
`trimmedmean` (FedTrimmedAvg, `trim_beta`) beside `fedmedian`. Differential privacy: `with_dp` wraps any
of them in Flower's `DifferentialPrivacyClientSideFixedClipping` (noise on the server, clipping on the
site by `fixedclipping_mod`, see `federation.privacy`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    MultiKrum,
    Strategy,
)

# Keys inside the RecordDicts exchanged with the ClientApp.
ARRAYS_KEY = "arrays"  # Flower's default `arrayrecord_key`
CONFIG_KEY = "config"  # Flower's default `configrecord_key`
METRICS_KEY = "metrics"
SITE_KEY = "site"  # ConfigRecord in every reply: site name (+ class counts after training)
WEIGHT_KEY = "num-examples"

UNIT_WEIGHT_KEY = "unit-weight"  # injected server-side when every site must weigh the same (DP)

FEDOPT_NAMES = ("fedadam", "fedyogi", "fedadagrad")
ROBUST_NAMES = ("fedmedian", "krum", "multikrum", "trimmedmean")
STRATEGY_NAMES = ("fedavg", "fedmedian", "fedprox", *FEDOPT_NAMES, "krum", "multikrum", "trimmedmean")


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

    def record_step_problem(self, server_round: int, phase: str, problem: str) -> None: ...


class SiteTracking:
    """Mixin placed before a Flower strategy class; see the module docstring."""

    observer: RoundObserver | None = None
    averaged_keys: frozenset[str] = frozenset()
    node_wait: float = 3600.0  # seconds to wait for `min_available_nodes` before skipping a step
    uniform_weights: bool = False  # every site weighs the same (differential privacy needs it)
    _sent_dtypes: dict[str, np.dtype]
    _aggregated: dict[int, bool]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.observer is not None:
            arrays = self.observer.start_weights(server_round, arrays)
        self._sent_dtypes = {k: a.numpy().dtype for k, a in arrays.items()}
        self._sent_arrays = {k: a.numpy() for k, a in arrays.items()}
        if not self._enough_nodes(server_round, "train", grid):
            return []
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        # Nothing was aggregated: the arrays are the last accepted ones again, not worth evaluating.
        if server_round > 0 and not getattr(self, "_aggregated", {}).get(server_round, False):
            return []
        if not self._enough_nodes(server_round, "evaluate", grid):
            return []
        return super().configure_evaluate(server_round, arrays, config, grid)  # type: ignore[misc]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Aggregate in site order, not arrival order: float sums then do not depend on which hospital
        # answered first, so the same seed gives the same global model.
        replies = sorted(replies, key=_site_order)
        self._report(server_round, "train", replies)
        valid = [m for m in replies if not m.has_error()]
        minimum = int(getattr(self, "min_train_nodes", 1))
        arrays: ArrayRecord | None = None
        metrics: MetricRecord | None = None
        if len(valid) < minimum:
            if replies:
                self._problem(
                    server_round, "train", f"only {len(valid)} site(s) returned a trained model, {minimum} required"
                )
        else:
            self._weigh(valid)
            plain = _weighted_average(valid, self.averaged_keys, self._weight_key()) if self.averaged_keys else {}
            untouched = self._untouched(valid)  # before Flower aggregates (FedMedian consumes the arrays)
            arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
            if arrays is not None:
                arrays = self._keep_untouched(self._restore(arrays, plain), untouched)
        self._aggregated = {**getattr(self, "_aggregated", {}), server_round: arrays is not None}
        if self.observer is not None:
            self.observer.record_aggregate(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._report(server_round, "evaluate", replies)
        valid = [m for m in replies if not m.has_error()]
        if not valid:
            return None
        self._weigh(valid)
        return super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]

    def _enough_nodes(self, server_round: int, phase: str, grid: Grid) -> bool:
        """Wait up to `node_wait` s for the minimum number of sites; False (and recorded) if they never come."""
        minimum = int(getattr(self, "min_available_nodes", 1))
        deadline = time.time() + self.node_wait
        while True:
            online = len(list(grid.get_node_ids()))
            if online >= minimum:
                return True
            if time.time() >= deadline:
                self._problem(
                        server_round,
                        phase,
                        f"only {online} site(s) connected within {self.node_wait:g} s, {minimum} required",
                    )
                return False
            time.sleep(1.0)

    def _problem(self, server_round: int, phase: str, problem: str) -> None:
        record = getattr(self.observer, "record_step_problem", None)  # optional for other observers
        if record is not None:
            record(server_round, phase, problem)

    def _weight_key(self) -> str:
        return UNIT_WEIGHT_KEY if self.uniform_weights else WEIGHT_KEY

    def _weigh(self, replies: list[Message]) -> None:
        """Uniform weights: every reply gets `unit-weight` = 1 (the recorded `num-examples` stay as sent)."""
        if not self.uniform_weights:
            return
        for msg in replies:
            for record in msg.content.metric_records.values():
                record[UNIT_WEIGHT_KEY] = 1

    def _report(self, server_round: int, phase: str, replies: list[Message]) -> None:
        if self.observer is None:
            return
        parsed = [SiteReply.from_message(m, self.observer.node_sites) for m in replies]
        self.observer.record_replies(server_round, phase, parsed)

    def _untouched(self, replies: list[Message]) -> dict[str, np.ndarray]:
        """Per float array sent: where every site sent back exactly the value it was sent (a frozen trunk)."""
        sent = getattr(self, "_sent_arrays", {})
        records = [next(iter(m.content.array_records.values())) for m in replies]
        masks = {}
        for key, before in sent.items():
            if before.dtype.kind != "f" or not all(key in r.keys() for r in records):
                continue
            mask = np.ones(before.shape, dtype=bool)
            for record in records:
                value = record[key].numpy()
                if value.shape != before.shape:
                    break
                mask &= value == before
            else:
                if mask.any():
                    masks[key] = mask
        return masks

    def _keep_untouched(self, arrays: ArrayRecord, untouched: dict[str, np.ndarray]) -> ArrayRecord:
        """Values no site changed stay exactly as they were sent: a weighted mean of identical float32
        copies can land one ulp away, which changed the frozen trunk's digest every round and with it every
        site's cache key (federation.site_cache)."""
        sent = getattr(self, "_sent_arrays", {})
        out = ArrayRecord()
        for key, array in arrays.items():
            value = array.numpy()
            if key in untouched and value.shape == sent[key].shape:
                value = np.where(untouched[key], sent[key], value).astype(value.dtype, copy=False)
            out[key] = Array(np.array(value, order="C"))
        return out

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


class TrackedKrum(SiteTracking, Krum):
    pass


class TrackedMultiKrum(SiteTracking, MultiKrum):
    pass


class TrackedFedTrimmedAvg(SiteTracking, FedTrimmedAvg):
    pass


_CLASSES: dict[str, type[SiteTracking]] = {
    "fedavg": TrackedFedAvg,
    "fedmedian": TrackedFedMedian,
    "fedprox": TrackedFedProx,
    "fedadam": TrackedFedAdam,
    "fedyogi": TrackedFedYogi,
    "fedadagrad": TrackedFedAdagrad,
    "krum": TrackedKrum,
    "multikrum": TrackedMultiKrum,
    "trimmedmean": TrackedFedTrimmedAvg,
}


def strategy_params(
    name: str,
    *,
    proximal_mu: float,
    server_lr: float,
    num_malicious: int = 1,
    multikrum_keep: int = 2,
    trim_beta: float = 0.34,
) -> dict[str, float]:
    """The parameters that matter for `name` (what lineage records beside the name)."""
    name = _check_name(name)
    if name == "fedprox":
        return {"proximal_mu": proximal_mu}
    if name in FEDOPT_NAMES:
        return {"server_lr": server_lr}
    if name == "krum":
        return {"num_malicious": num_malicious}
    if name == "multikrum":
        return {"num_malicious": num_malicious, "multikrum_keep": multikrum_keep}
    if name == "trimmedmean":
        return {"trim_beta": trim_beta}
    return {}


def make_strategy(
    name: str,
    *,
    min_nodes: int,
    proximal_mu: float = 0.0,
    server_lr: float = 0.01,
    client_lr: float = 0.001,
    num_malicious: int = 1,
    multikrum_keep: int = 2,
    trim_beta: float = 0.34,
    node_wait: float = 3600.0,
    uniform_weights: bool = False,
    observer: RoundObserver | None = None,
    buffer_keys: Iterable[str] = (),
) -> Strategy:
    """A Flower strategy by name that trains and evaluates on every connected site (at least `min_nodes`).

    `buffer_keys`: state-dict entries that are not trained parameters (BatchNorm statistics); FedOpt
    averages them instead of applying its server optimiser. `num_malicious` (Krum, Multi-Krum): sites
    assumed hostile; `multikrum_keep`: updates Multi-Krum averages; `trim_beta` (trimmed mean): fraction
    cut from each tail per coordinate; with n sites it trims int(beta·n) on each side, so with three sites
    beta must be at least 1/3 to trim anything. `node_wait`: seconds to wait for `min_nodes` connected
    sites before a step is skipped. `uniform_weights`: every site weighs the same (for differential privacy).
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
        "weighted_by_key": UNIT_WEIGHT_KEY if uniform_weights else WEIGHT_KEY,
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
    if name in ("krum", "multikrum"):
        if not 0 <= num_malicious < min_nodes:
            raise ValueError(f"num-malicious must be in [0, min-nodes={min_nodes}), got {num_malicious}")
        common["num_malicious_nodes"] = num_malicious
    if name == "multikrum":
        if not 1 <= multikrum_keep <= min_nodes:
            raise ValueError(f"multikrum-keep must be in [1, min-nodes={min_nodes}], got {multikrum_keep}")
        common["num_nodes_to_select"] = multikrum_keep
    if name == "trimmedmean":
        if not 0 <= trim_beta < 0.5:
            raise ValueError(f"trim-beta must be in [0, 0.5), got {trim_beta}")
        if int(trim_beta * min_nodes) < 1:
            raise ValueError(
                f"trim-beta {trim_beta:g} trims nothing with {min_nodes} sites (int(beta*n) = 0): "
                f"use at least {1 / min_nodes:.3f}"
            )
        common["beta"] = trim_beta
    if node_wait <= 0:
        raise ValueError(f"node wait must be > 0 s, got {node_wait}")
    strategy = _CLASSES[name](**common)
    strategy.observer = observer
    strategy.node_wait = float(node_wait)
    strategy.uniform_weights = bool(uniform_weights)
    if name in FEDOPT_NAMES:
        strategy.averaged_keys = frozenset(buffer_keys)
    return strategy  # type: ignore[return-value]


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in _CLASSES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGY_NAMES)}")
    return key
