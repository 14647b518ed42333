"""The model on the wire as three arrays instead of ~300: trainable parameters, float buffers, counters.

Flower 1.42 moves every Array of a message as a separate object (its own id, its own HTTP pull or push
between SuperLink, SuperNode and ClientApp). tf_efficientnet_lite0's state dict has 296 tensors; a train
or evaluate message therefore costs ~170 object transfers per site and hop, most of them tiny, and on a
busy two-core machine that — not the 13.7 MB — dominated each step. Both ends build the same model from
the contract, so the layout (names, shapes, dtypes, order) is known on both sides and only its digest
travels (`LAYOUT_KEY` in the config): the arrays are concatenated per group and cut back on arrival.

Groups keep what the strategies need apart: FedOpt's server optimiser moves `params-*` only and
averages `buffers-*` (`make_strategy(buffer_keys=...)`); DP clipping and noise act on float arrays and
leave integer counters alone (`federation.privacy`). Aggregation is coordinate-wise (FedAvg, median,
trimmed mean) or over the concatenation of everything (Krum), so it gives the same numbers packed as
unpacked. A message whose ArrayRecord is not packed (older server, tests) is read as a plain state dict.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

LAYOUT_KEY = "packed-layout"  # config entry: the digest of the layout both sides must share


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    dtype: str
    group: str  # e.g. "params-float32", "buffers-float32", "buffers-int64"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass(frozen=True)
class Layout:
    entries: tuple[Entry, ...]

    @classmethod
    def of(cls, state: Mapping[str, Any], param_names: Iterable[str]) -> Layout:
        params = set(param_names)
        entries = []
        for name, value in state.items():
            array = _numpy(value)
            kind = "params" if name in params else "buffers"
            entries.append(Entry(name, tuple(int(d) for d in array.shape), str(array.dtype), f"{kind}-{array.dtype}"))
        return cls(tuple(entries))

    @classmethod
    def of_model(cls, model: Any) -> Layout:
        return cls.of(model.state_dict(), (n for n, _ in model.named_parameters()))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(e.group for e in self.entries))

    @property
    def digest(self) -> str:
        text = "|".join(f"{e.name}:{e.shape}:{e.dtype}:{e.group}" for e in self.entries)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def pack(self, state: Mapping[str, Any]) -> ArrayRecord:
        out = ArrayRecord()
        for group in self.groups:
            parts = [_numpy(state[e.name]).reshape(-1) for e in self.entries if e.group == group]
            out[group] = Array(np.concatenate(parts) if parts else np.zeros(0))
        return out

    def unpack(self, record: ArrayRecord) -> dict[str, np.ndarray]:
        if not is_packed(record):
            return {k: a.numpy() for k, a in record.items()}
        if set(record.keys()) != set(self.groups):
            raise ValueError(f"packed arrays {sorted(record.keys())} do not match the layout's {list(self.groups)}")
        flat = {g: record[g].numpy() for g in self.groups}
        offset = dict.fromkeys(self.groups, 0)
        out: dict[str, np.ndarray] = {}
        for e in self.entries:
            start = offset[e.group]
            chunk = flat[e.group][start : start + e.size]
            if chunk.size != e.size:
                raise ValueError(f"packed group {e.group} is too short for {e.name}")
            out[e.name] = chunk.astype(e.dtype, copy=False).reshape(e.shape)
            offset[e.group] = start + e.size
        for group, used in offset.items():
            if used != flat[group].size:
                raise ValueError(f"packed group {group} has {flat[group].size} values, the layout uses {used}")
        return out

    def to_torch(self, record: ArrayRecord) -> dict[str, Any]:
        import torch

        return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in self.unpack(record).items()}


def is_packed(record: ArrayRecord) -> bool:
    return bool(record.keys()) and all(k.startswith(("params-", "buffers-")) for k in record.keys())


def buffer_groups(record: ArrayRecord) -> set[str]:
    return {k for k in record.keys() if k.startswith("buffers-")}


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
