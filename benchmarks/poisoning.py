"""Poisoning and privacy on protocol 1: FedAvg vs robust strategies, and DP's accuracy cost.

    .venv/bin/python benchmarks/poisoning.py --out var/h6/poisoning.json             # attacks x strategies
    .venv/bin/python benchmarks/poisoning.py --dp 0.01 0.1 1 --out var/h6/dp.json    # DP cost, FedAvg
    .venv/bin/python benchmarks/poisoning.py --mode full ...                         # fine-tune the whole model

Protocol 1: train at tehran-lisc, jiangxi-tecom and bccd (their train splits), validate on their val splits,
test at barcelona-pbc (five shared classes, every split, never trained on). The server side is the
deployment's own: Flower strategies from `federation.strategies.make_strategy` (+ `federation.privacy.with_dp`),
`federation.rounds.RoundBook` (per-site records, pooled validation, the acceptance gate) and
`federation.resume.run_rounds`; only the transport is an in-process Grid.

Two modes for the sites:
  - `features` (default): the benchmark's frozen-trunk ClientApp (`federation.benchmark.handlers`, issue 3's
    protocol code): every site trains the model's head on cached trunk features of its own images, with the
    benchmark recipe (5 rounds, 2 local epochs). Fast enough for a grid of runs on two shared cores; the
    attacks and aggregation act on the head's weights, which is what moves;
  - `full`: the deployment's ClientApp (`federation.client_app.app`, mods included) fine-tuning the whole
    model on scaled-down data (`--per-class`, `--size`); slow here, kept for a spot check.

Attacks (one hostile site each, so that two honest sites remain a majority of three):
  - flip: jiangxi-tecom's training labels are shifted cyclically (basophil→eosinophil→…→neutrophil→basophil);
  - scale: bccd sends global + 20 × (its update) instead of its update (a boosted "model replacement").
Reported per run: the external balanced accuracy of the final aggregate (what the strategy alone yields)
and of the last round the gate accepted (what would reach the registry), and every gate decision.
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


def run_features(strategy: str, attack: str, args, arm_data, dp_noise: float = 0.0) -> dict:
    """One federated run over cached frozen-trunk features (see the module docstring)."""
    from federation.benchmark import handlers
    from federation.benchmark.handlers import SiteFeatures
    from federation.top_training import top_logits
    from federation.benchmark.local_grid import LocalGrid
    from federation.benchmark.runs import Recipe, fresh_split
    from federation.privacy import clip_when_asked
    from federation.strategies import make_strategy
    from models.evaluate import compute_metrics
    from models.preprocess import softmax

    recipe = Recipe()
    contract, top = arm_data.contract, args.top
    work = Path(args.work) / f"features-{attack}-{strategy}-dp{dp_noise:g}-seed{args.seed}"
    split = fresh_split(contract, top, args.seed)
    initial = ArrayRecord(split.top_state())
    buffers = set(split.top_state_keys()) - {n for n, _ in split.model.named_parameters()}
    apps, configs = {}, {}
    for i, (site, data) in enumerate(sorted(arm_data.sites.items())):
        if attack == "flip" and site == FLIP_SITE:
            data = SiteFeatures(site, data.train_x, (data.train_y + 1) % contract.num_classes, data.val_x, data.val_y)
        key = f"poison-{attack}-{strategy}-{site}"
        handlers.SITE_DATA[key] = data
        node = 1000 + i
        configs[node] = {"site": site, "bench-key": key}
        app = lambda m, c: clip_when_asked(m, c, handlers.app)  # noqa: E731 - the deployment's DP mod
        apps[node] = scaled(app, SCALE) if attack == "scale" and site == SCALE_SITE else app
    handlers.site_split(contract, top)
    book = RoundBook(run_dir=work, events=EventLog(work), class_names=contract.class_names, initial_arrays=initial,
                     gate_tolerance=0.02, min_sites=3, publish=None, lineage={"run_id": 0, "strategy": {"name": strategy}})
    strat = make_strategy(strategy, min_nodes=3, observer=book, buffer_keys=buffers, proximal_mu=recipe.proximal_mu,
                          num_malicious=1, multikrum_keep=2, trim_beta=0.34, uniform_weights=dp_noise > 0)
    dp = None
    if dp_noise > 0:
        from federation.privacy import DPConfig, with_dp

        dp = DPConfig(dp_noise, args.dp_clip, 3)
        strat = with_dp(strat, dp)
    train_config = ConfigRecord({"contract": contract.to_json(), "top": top, "local-epochs": recipe.local_epochs,
                                 "lr": recipe.lr, "batch-size": recipe.batch_size, "seed": args.seed})
    evaluate_config = ConfigRecord({"contract": contract.to_json(), "top": top, "batch-size": recipe.batch_size})
    t0 = time.time()
    try:
        final = run_rounds(strat, ReportingGrid(LocalGrid(apps, configs, {}), book, poll_interval=0.0), initial,
                           first_round=1, last_round=recipe.rounds, timeout=3600, train_config=train_config,
                           evaluate_config=evaluate_config, evaluate_fn=book)
    finally:
        for cfg in configs.values():
            handlers.SITE_DATA.pop(cfg["bench-key"], None)
    seconds = time.time() - t0
    x_ext, y_ext = arm_data.evaluation["external"]

    def external_ba(arrays: ArrayRecord) -> float:
        import torch

        split.load_top_state({k: torch.as_tensor(v) for k, v in arrays.to_torch_state_dict().items()})
        return float(compute_metrics(contract.class_names, y_ext, softmax(top_logits(split, x_ext))).balanced_accuracy)

    rounds = [book.records[r] for r in sorted(book.records)]
    out = {
        "mode": "features",
        "strategy": strategy,
        "attack": attack,
        "dp_noise": dp_noise,
        "seconds": round(seconds, 1),
        "external_n": int(len(y_ext)),
        "external_ba_final_aggregate": external_ba(final),
        "external_ba_last_accepted": external_ba(book.accepted.arrays) if book.accepted.round else None,
        "last_accepted_round": book.accepted.round,
        "pooled_val_ba": [r.get("pooled", {}).get("balanced_accuracy") for r in rounds],
        "gate": [{"round": r["round"], "accepted": r["gate"]["accepted"], "reason": r["gate"]["reason"]} for r in rounds],
    }
    if dp is not None:
        out["privacy"] = dp.lineage(releases=recipe.rounds)
    print(json.dumps(out), flush=True)
    return out


def feature_data(args, source: DataRoot):
    from federation.benchmark.protocols import Arm, arm_features, paper_layout

    arm = Arm(name=f"{args.arch}-{args.top}-{args.feature_size}", architecture=args.arch, input_size=args.feature_size,
              top=args.top, views=args.views)
    return arm_features(arm, paper_layout(source), ROOT / "var" / "benchmark", log=lambda m: print(m, flush=True))


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
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--attacks", nargs="+", default=["none", "flip", "scale"])
    parser.add_argument("--dp", nargs="+", type=float, default=None, help="DP noise multipliers (FedAvg, no attack)")
    parser.add_argument("--dp-clip", type=float, default=1.0)
    parser.add_argument("--mode", choices=("features", "full"), default="features")
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--feature-size", type=int, default=128)
    parser.add_argument("--top", default="head", help="what the feature mode trains (federation.trunk)")
    parser.add_argument("--views", type=int, default=0, help="augmented views per training image (feature mode)")
    args = parser.parse_args()
    args.work = str(Path(args.work).resolve())  # node configs take absolute paths only
    logging.getLogger("flwr").setLevel(logging.WARNING)
    claim_server_identity()
    source = DataRoot(resolve_data_root(args.data_root))
    external = [s for c in SHARED_CLASSES for s in source.select([EXTERNAL_SITE], ["test"], [c])[: args.external_per_class]]
    arm_data = feature_data(args, source) if args.mode == "features" else None
    results = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = ([("fedavg", "none", z) for z in args.dp] if args.dp is not None
            else [(s, a, 0.0) for a in args.attacks for s in args.strategies])
    for seed in args.seeds:
        args.seed = seed
        for strategy, attack, noise in plan:
            if arm_data is not None:
                row = run_features(strategy, attack, args, arm_data, noise)
            else:
                row = run(strategy, attack, args, source, external, noise)
            results.append({**row, "seed": seed})
            out.write_text(json.dumps({"args": vars(args), "load": os.getloadavg(), "results": results}, indent=2))
    summarise(results, out.with_suffix(".md"))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def summarise(results: list[dict], path: Path) -> None:
    """Mean ± sd over seeds of the external balanced accuracy, per attack and strategy (markdown)."""
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["attack"], r["strategy"], r["dp_noise"]), []).append(r)

    def ms(values: list[float | None]) -> str:
        vals = [v for v in values if v is not None]
        if not vals:
            return "—"
        return f"{np.mean(vals):.3f} ± {np.std(vals):.3f}" if len(vals) > 1 else f"{vals[0]:.3f}"

    lines = ["| attack | strategy | DP noise | external BA, final aggregate | external BA, last accepted round |"
             " rounds accepted | ε (δ=1e-5) |", "|---|---|---|---|---|---|---|"]
    for (attack, strategy, noise), rows in groups.items():
        accepted = sum(sum(g["accepted"] for g in r["gate"]) for r in rows)
        total = sum(len(r["gate"]) for r in rows)
        eps = rows[0].get("privacy", {}).get("epsilon") if noise else None
        lines.append(
            f"| {attack} | {strategy} | {noise:g} | {ms([r['external_ba_final_aggregate'] for r in rows])} | "
            f"{ms([r['external_ba_last_accepted'] for r in rows])} | {accepted}/{total} | "
            f"{'—' if eps is None else f'{eps:.3g}'} |"
        )
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
