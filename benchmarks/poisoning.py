"""Poisoning and privacy on protocol 1: FedAvg vs robust strategies, and DP's accuracy cost.

    .venv/bin/python benchmarks/poisoning.py --out var/h6/poisoning.json            # attacks x strategies
    .venv/bin/python benchmarks/poisoning.py --dp 0.0 0.3 1.0 --out var/h6/dp.json  # DP cost, FedAvg

Protocol 1: train at tehran-lisc, jiangxi-tecom and bccd, test at barcelona-pbc (a hospital never seen).
The server side is the deployment's own: Flower strategies from `federation.strategies.make_strategy`
(with `federation.privacy.with_dp` for DP), `federation.rounds.RoundBook` (per-site records, pooled
validation, the acceptance gate) and `federation.resume.run_rounds`; every site is the deployment's
ClientApp (`federation.client_app.app`, Flower mods included) called in this process through a small
in-process Grid, so only the transport differs from `federation.deploy` (whose fixed per-step cost would
dominate a grid of runs on two cores). Registration is off (no ONNX export).

Attacks (one hostile site each, so that two honest sites remain a majority of three):
  - flip: jiangxi-tecom's labels are shifted cyclically (basophil→eosinophil→…→neutrophil→basophil);
  - scale: bccd sends global + 20 × (its update) instead of its update (a boosted "model replacement").
Reported per run: the external balanced accuracy of the final aggregate (what the strategy alone yields)
and of the last round the gate accepted (what would have reached the registry), and every gate decision.
Scaled down to fit this machine (see --per-class, --size, --rounds); the absolute numbers are therefore
low, the comparison between rows is the point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from uuid import uuid4

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402

from federation.events import EventLog  # noqa: E402
from federation.resume import run_rounds  # noqa: E402
from federation.rounds import ReportingGrid, RoundBook  # noqa: E402
from federation.sites import (  # noqa: E402
    DEFAULT_TRAINING_SITES,
    EXTERNAL_SITE,
    DataRoot,
    Sample,
    resolve_data_root,
    write_manifest,
)
from models.contract import SHARED_CLASSES  # noqa: E402

FLIP_SITE, SCALE_SITE, SCALE = "jiangxi-tecom", "bccd", 20.0
STRATEGIES = ("fedavg", "fedmedian", "krum", "multikrum", "trimmedmean")


# ---- an in-process Grid: each message is handed to the site's ClientApp in this process -----------------
class InProcessGrid(Grid):
    def __init__(self, apps: dict[int, object], contexts: dict[int, Context]):
        self.apps, self.contexts, self._replies = apps, contexts, {}

    def set_run(self, run) -> None:  # noqa: ANN001
        self._run = run

    @property
    def run(self):  # noqa: ANN201
        return getattr(self, "_run", None)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: ANN001, ANN201
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):  # noqa: ANN201
        return sorted(self.apps)

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid4().hex
            node = int(msg.metadata.dst_node_id)
            self._replies[msg.metadata.message_id] = self.apps[node](msg, self.contexts[node])
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return self.pull_messages(self.push_messages(messages))


def claim_server_identity() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        if getattr(TaskIdentity, attr) is None:
            setattr(TaskIdentity, attr, value)


# ---- attacks -------------------------------------------------------------------------------------------
def scaled(app, factor: float):
    """A hostile site: sends global + factor x (its honest update)."""

    def call(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
            return reply
        sent = msg.content["arrays"]
        record = reply.content["arrays"]
        out = ArrayRecord()
        for key, array in record.items():
            value = array.numpy()
            if np.issubdtype(value.dtype, np.floating):
                base = sent[key].numpy()
                value = (base + factor * (value - base)).astype(value.dtype)
            out[key] = Array(value if value.flags.c_contiguous else value.copy(order="C"))
        reply.content["arrays"] = out
        return reply

    return call


def site_root(source: DataRoot, site: str, dest: Path, per_class: int, flip: bool) -> Path:
    """A data root holding `per_class` train and all val images per class of one site (labels shifted if flip)."""
    classes = list(SHARED_CLASSES)
    shift = {c: classes[(i + 1) % len(classes)] for i, c in enumerate(classes)}
    picked = []
    for label in classes:
        for split, limit in (("train", per_class), ("val", None)):
            for s in source.select([site], [split], [label])[:limit]:
                new = shift[label] if flip and split == "train" else label  # validation stays honest
                link = dest / "sites" / site / new / f"{label}-{s.path.name}"
                link.parent.mkdir(parents=True, exist_ok=True)
                if not link.exists():
                    link.symlink_to(s.path)
                picked.append(Sample(link, site, new, split, s.group))
    write_manifest(dest, picked)
    return dest


# ---- one federated run ---------------------------------------------------------------------------------
def run(strategy: str, attack: str, args, source: DataRoot, external: list[Sample], dp_noise: float = 0.0) -> dict:
    import torch

    from federation.client_app import app as client_app
    from federation.server_app import RunSettings, build_contract_from_settings
    from federation.strategies import make_strategy
    from federation.task import create_model_from_contract, evaluate_samples, seed_everything

    torch.set_num_threads(args.threads)
    work = Path(args.work) / f"{attack}-{strategy}-dp{dp_noise:g}"
    settings = RunSettings(input_size=args.size, seed=args.seed, lr=args.lr, batch_size=32, local_epochs=1,
                           min_nodes=3, run_dir=str(work), registry=str(work), parity_images=str(work))
    contract = build_contract_from_settings(settings)
    seed_everything(args.seed)
    model = create_model_from_contract(contract, pretrained=True)
    initial = ArrayRecord(model.state_dict())
    buffers = set(model.state_dict()) - {n for n, _ in model.named_parameters()}

    apps, contexts = {}, {}
    for i, site in enumerate(DEFAULT_TRAINING_SITES):
        node = 100 + i
        flip = attack == "flip" and site == FLIP_SITE
        root = site_root(source, site, Path(args.work) / "data" / f"{site}{'-flipped' if flip else ''}",
                         args.per_class, flip)
        apps[node] = scaled(client_app, SCALE) if attack == "scale" and site == SCALE_SITE else client_app
        contexts[node] = Context(1, node, {"site": site, "data-root": str(root), "threads": args.threads},
                                 RecordDict(), {})
    book = RoundBook(run_dir=work, events=EventLog(work), class_names=contract.class_names, initial_arrays=initial,
                     gate_tolerance=settings.gate_tolerance, min_sites=3, publish=None,
                     lineage={"run_id": 0, "strategy": {"name": strategy}})
    strat = make_strategy(strategy, min_nodes=3, observer=book, buffer_keys=buffers, num_malicious=1,
                          multikrum_keep=2, trim_beta=0.34, uniform_weights=dp_noise > 0)
    if dp_noise > 0:
        from federation.privacy import DPConfig, with_dp

        dp = DPConfig(dp_noise, args.dp_clip, 3)
        strat = with_dp(strat, dp)
    train_config = ConfigRecord({"contract": contract.to_json(), "local-epochs": 1, "lr": args.lr,
                                 "batch-size": 32, "seed": args.seed})
    evaluate_config = ConfigRecord({"contract": contract.to_json(), "batch-size": 64})
    t0 = time.time()
    final = run_rounds(strat, ReportingGrid(InProcessGrid(apps, contexts), book, poll_interval=0.0), initial,
                       first_round=1, last_round=args.rounds, timeout=3600, train_config=train_config,
                       evaluate_config=evaluate_config, evaluate_fn=book)
    seconds = time.time() - t0

    def external_ba(arrays: ArrayRecord) -> float:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=True)
        return float(evaluate_samples(model, external, contract, batch_size=64).balanced_accuracy)

    rounds = [book.records[r] for r in sorted(book.records)]
    out = {
        "strategy": strategy,
        "attack": attack,
        "dp_noise": dp_noise,
        "seconds": round(seconds, 1),
        "external_ba_final_aggregate": external_ba(final),
        "external_ba_last_accepted": external_ba(book.accepted.arrays) if book.accepted.round else None,
        "last_accepted_round": book.accepted.round,
        "pooled_val_ba": [r.get("pooled", {}).get("balanced_accuracy") for r in rounds],
        "gate": [{"round": r["round"], "accepted": r["gate"]["accepted"], "reason": r["gate"]["reason"]} for r in rounds],
    }
    if dp_noise > 0:
        out["privacy"] = dp.lineage(releases=args.rounds)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="var/h6/poisoning.json")
    parser.add_argument("--work", default="var/h6/poisoning-work")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=40, help="train images per class and site (cap)")
    parser.add_argument("--external-per-class", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=["none", "flip", "scale"])
    parser.add_argument("--dp", nargs="+", type=float, default=None, help="DP noise multipliers (FedAvg, no attack)")
    parser.add_argument("--dp-clip", type=float, default=1.0)
    args = parser.parse_args()
    args.work = str(Path(args.work).resolve())  # node configs take absolute paths only
    logging.getLogger("flwr").setLevel(logging.WARNING)
    claim_server_identity()
    source = DataRoot(resolve_data_root(args.data_root))
    external = [s for c in SHARED_CLASSES for s in source.select([EXTERNAL_SITE], ["test"], [c])[: args.external_per_class]]
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = ([("fedavg", "none", z) for z in args.dp] if args.dp is not None
            else [(s, a, 0.0) for a in args.attacks for s in (["fedavg"] if a == "none" else args.strategies)])
    for strategy, attack, noise in plan:
        results.append(run(strategy, attack, args, source, external, noise))
        out.write_text(json.dumps({"args": vars(args), "load": os.getloadavg(), "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
