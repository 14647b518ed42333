"""Optional differential privacy for a run, with Flower's own pieces.

Central DP with client-side clipping (Flower's `DifferentialPrivacyClientSideFixedClipping` on the server,
`fixedclipping_mod` in the ClientApp): each site clips its model update (trained weights minus the
weights it was sent) to L2 norm `dp-clip`; the server averages the clipped updates with equal weights and
adds Gaussian noise of std `dp-noise` × `dp-clip` / number of sites. The guarantee is site-level (one
hospital's whole contribution), accounted with Flower's RDP accountant (`dp-accounting` package) without
sampling amplification, every round counted as a release (rejected rounds too: their noisy aggregate was
sent to the sites for validation).

Two details of this model make Flower's pieces need a hand:
  - the state dict holds integer BatchNorm counters (`num_batches_tracked`, 0-d); Flower clips and adds
    noise in place, which NumPy refuses for integers (and cannot do for 0-d arrays). Counters are not
    weights: `clip_when_asked` keeps them out of the clipped update and `SiteDP` out of the noise;
  - weights must be uniform for the noise scale to hold, so `make_strategy(uniform_weights=True)`.
The privacy parameters and the spent (epsilon, delta) go into every registered version's lineage.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, Strategy
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, add_gaussian_noise_inplace, compute_stdv

MECHANISM = "central DP, client-side fixed clipping (Flower fixedclipping_mod + DifferentialPrivacyClientSideFixedClipping)"


@dataclass(frozen=True)
class DPConfig:
    noise_multiplier: float
    clipping_norm: float
    sites: int  # number of sites whose updates are averaged (the noise std divides by it)
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"dp-noise must be > 0 to enable DP, got {self.noise_multiplier}")
        if not self.clipping_norm > 0:
            raise ValueError(f"dp-clip must be > 0, got {self.clipping_norm}")
        if self.sites < 1:
            raise ValueError(f"DP needs at least one site, got {self.sites}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp-delta must be in (0, 1), got {self.delta}")

    @property
    def noise_std(self) -> float:
        return compute_stdv(self.noise_multiplier, self.clipping_norm, self.sites)

    def lineage(self, releases: int) -> dict[str, Any]:
        """What a registered version records: parameters and the privacy spent after `releases` rounds."""
        return {
            "mechanism": MECHANISM,
            "unit": "site (a hospital's whole update per round)",
            **asdict(self),
            "noise_std": self.noise_std,
            "uniform_weights": True,
            "releases": releases,
            **privacy_spent(self, releases),
        }


def privacy_spent(config: DPConfig, releases: int) -> dict[str, Any]:
    """(epsilon, delta) after `releases` Gaussian releases, RDP accounting, no amplification."""
    if releases < 1:
        return {"epsilon": 0.0, "accountant": None}
    try:
        from flwr.supercore.privacy_accounting import (
            GaussianPrivacyEvent,
            NeighboringRelation,
            PrivacyConfig,
            SamplingMethod,
        )
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

        accountant = RdpAccountant(
            PrivacyConfig(
                target_delta=config.delta,
                population_size=config.sites,
                neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                sampling_method=SamplingMethod.NO_AMPLIFICATION,
            )
        )
        accountant.compose(
            GaussianPrivacyEvent(config.noise_multiplier, config.sites, config.sites), count=releases
        )
        spent = accountant.get_privacy_spent()
    except ImportError as exc:
        return {"epsilon": None, "accountant": f"unavailable: {exc}"}
    epsilon = float(spent.epsilon)
    return {
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "accountant": "Flower RdpAccountant (RDP, add-or-remove-one site, no amplification)",
    }


class SiteDP(DifferentialPrivacyClientSideFixedClipping):
    """Flower's wrapper; noise only on floating-point arrays (counters are not model weights)."""

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, self.num_sampled_clients)
        out = ArrayRecord()
        for key, array in aggregated_arrays.items():
            value = array.numpy()
            if np.issubdtype(value.dtype, np.floating):
                value = np.array(value, copy=True)
                add_gaussian_noise_inplace([value], std)
            out[key] = Array(value if value.flags.c_contiguous else value.copy(order="C"))
        return out

    def aggregate_train(self, server_round: int, replies: Any) -> tuple[ArrayRecord | None, Any]:
        # The noise scale assumes every site's clipped update is in the average: with a site missing the
        # round has no private aggregate (Flower skips it too); the replies are still recorded per site.
        replies = list(replies)
        ok = [m for m in replies if not m.has_error()]
        if len(ok) < self.num_sampled_clients:
            inner: Any = self.strategy
            inner._report(server_round, "train", replies)
            inner._aggregated = {**getattr(inner, "_aggregated", {}), server_round: False}
            inner._problem(
                server_round,
                "train",
                f"DP: {len(ok)} of {self.num_sampled_clients} sites returned an update; the noise is "
                "calibrated for all of them, so this round has no aggregate",
            )
            if inner.observer is not None:
                inner.observer.record_aggregate(server_round, None)
            return None, None
        return super().aggregate_train(server_round, replies)


def with_dp(strategy: Strategy, config: DPConfig) -> Strategy:
    return SiteDP(strategy, config.noise_multiplier, config.clipping_norm, config.sites)


# ---- ClientApp side ------------------------------------------------------------------------------------
def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `fixedclipping_mod` for train messages that carry a clipping norm; others pass through.

    Integer arrays (BatchNorm counters) are not model weights: they are held out of the clipping (Flower's
    norm would count them, and cannot scale 0-d arrays in place) and put back in the reply unchanged.
    """
    if msg.metadata.message_type != MessageType.TRAIN or not _asks_for_clipping(msg):
        return call_next(msg, context)
    key = next(iter(msg.content.array_records))
    sent = msg.content[key]
    held_in = {k: a for k, a in sent.items() if not np.issubdtype(a.numpy().dtype, np.floating)}
    held_out: dict[str, Array] = {}
    order = list(sent.keys())
    msg.content[key] = _without(sent, held_in)

    def inner(m: Message, ctx: Context) -> Message:
        m.content[key] = ArrayRecord({k: held_in[k] if k in held_in else sent[k] for k in order})  # the whole state again
        reply = call_next(m, ctx)
        if reply.has_error() or len(reply.content.array_records) != 1:
            return reply
        reply_key, record = next(iter(reply.content.array_records.items()))
        held_out.update({k: a for k, a in record.items() if k in held_in})
        reply.content[reply_key] = _without(record, held_out)
        return reply

    out = fixedclipping_mod(msg, context, inner)
    if out.has_error() or not held_out:
        return out
    reply_key, record = next(iter(out.content.array_records.items()))
    out.content[reply_key] = ArrayRecord({k: held_out[k] if k in held_out else record[k] for k in order})
    return out


def _asks_for_clipping(msg: Message) -> bool:
    return any(KEY_CLIPPING_NORM in record for record in msg.content.config_records.values())


def _without(record: ArrayRecord, keys: dict[str, Array]) -> ArrayRecord:
    return ArrayRecord({k: a for k, a in record.items() if k not in keys})
