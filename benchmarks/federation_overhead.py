"""Federation overhead: a real 5-round, 3-site federation vs centralised training of the same epochs.

    .venv/bin/python benchmarks/federation_overhead.py --out var/h6/overhead.json
    .venv/bin/python benchmarks/federation_overhead.py --isolation subprocess   # Flower's default launcher

Same data (protocol 1's training sites: every train image of tehran-lisc, jiangxi-tecom and bccd), same
recipe (pyproject's [tool.flwr.app.config]: model, input size, lr, batch size, 1 local epoch per round),
same number of passes over each image (5), same validation after each pass (each site's val split).
  - federated: `federation.deploy.run_federation` — SuperLink + 3 SuperNodes as processes on loopback,
    ClientApps launched by `federation.warm_exec` (or Flower's own launcher), FedAvg, every accepted round
    exported to ONNX, parity-checked and registered; wall time from the call to the last process stopped;
  - centralised: one process, the pooled train images, `federation.task.train_local` for local-epochs, 5 times
    from the same pretrained start, validation on the pooled val images after each epoch, one ONNX export
    + registration at the end (what the federation does per accepted round, once).
Reported: both wall times, the ratio, and the federation's time split (per-step phases from its event
log, registration time), with the machine's load average (other processes share the 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from federation.sites import DEFAULT_TRAINING_SITES, DataRoot, resolve_data_root  # noqa: E402


def federated(args, source: DataRoot, scratch: Path) -> dict:
    import federation.deploy as deploy

    original = deploy.LocalDeployment.__init__

    def with_isolation(self, *a, **k):  # noqa: ANN001
        k["isolation"] = args.isolation
        original(self, *a, **k)

    deploy.LocalDeployment.__init__ = with_isolation
    t0 = time.time()
    result = deploy.run_federation(
        source.root,
        list(DEFAULT_TRAINING_SITES),
        scratch / "registry-fed",
        {"num-server-rounds": args.rounds, "strategy": "fedavg", "seed": args.seed},  # the app's defaults otherwise
        scratch / "work",
        show_progress=False,
    )
    wall = time.time() - t0
    from federation import events as ev

    events = ev.read_events(result.run_dir / ev.EVENTS_FILE)
    phases = _phases(events)
    return {
        "ok": result.ok,
        "error": result.error,
        "wall_seconds": round(wall, 1),
        "registered": len(result.registered),
        "phases": phases,
        "site_train_seconds": {
            r["round"]: {s: e.get("train", {}).get("seconds") for s, e in r["sites"].items()} for r in result.rounds
        },
        "decisions": result.decisions,
    }


def _phases(events: list[dict]) -> dict:
    """Per round, from the ServerApp's event log: train step (round start → last train reply), evaluate
    step (→ last evaluate reply), registration (gate decision → version registered), and the time before
    round 1 (ServerApp start-up: model, parity images, nodes)."""
    rounds: dict[int, dict] = {}
    start = next((e["ts"] for e in events if e["kind"] == "run-started"), None)
    for e in events:
        r = e.get("round")
        if r is None:
            continue
        slot = rounds.setdefault(r, {})
        if e["kind"] == "round-started":
            slot["start"] = e["ts"]
        elif e["kind"] == "site-replied":
            slot[f"last_{e['phase']}"] = e["ts"]
        elif e["kind"] == "gate-decision":
            slot["gate"] = e["ts"]
        elif e["kind"] in ("version-registered", "registration-skipped"):
            slot["registered"] = e["ts"]
    out = {"before_round_1": round(rounds[1]["start"] - start, 1) if start and 1 in rounds else None, "rounds": []}
    for r in sorted(rounds):
        t = rounds[r]
        out["rounds"].append({
            "round": r,
            "train_step_s": round(t["last_train"] - t["start"], 1) if "last_train" in t else None,
            "evaluate_step_s": round(t["last_evaluate"] - t["last_train"], 1) if "last_evaluate" in t else None,
            "registration_s": round(t["registered"] - t["gate"], 1) if "registered" in t else 0.0,
        })
    return out


def centralised(args, source: DataRoot, scratch: Path) -> dict:
    import torch

    from federation.publish import Publisher, find_parity_images
    from federation.server_app import RunSettings, build_contract_from_settings
    from federation.deploy import app_defaults
    from federation.task import TrainConfig, create_model_from_contract, evaluate_samples, seed_everything, train_local

    t0 = time.time()
    defaults = app_defaults()
    settings = RunSettings.from_run_config(
        {**defaults, "seed": args.seed, "run-dir": str(scratch), "registry": str(scratch), "parity-images": str(source.root)}
    )
    contract = build_contract_from_settings(settings)
    seed_everything(settings.seed)
    model = create_model_from_contract(contract, pretrained=True)
    sites = list(DEFAULT_TRAINING_SITES)
    train = source.select(sites, ["train"], contract.class_names)
    val = source.select(sites, ["val"], contract.class_names)
    epochs = []
    for epoch in range(args.rounds):
        e0 = time.time()
        config = TrainConfig(epochs=settings.local_epochs, lr=settings.lr, batch_size=settings.batch_size,
                             seed=settings.seed + epoch)
        train_local(model, train, contract, config, top=settings.train_top)  # what the sites train, as they do
        e1 = time.time()
        metrics = evaluate_samples(model, val, contract, batch_size=settings.batch_size)
        epochs.append({"train_s": round(e1 - e0, 1), "val_s": round(time.time() - e1, 1),
                       "val_ba": round(float(metrics.balanced_accuracy), 4)})
    r0 = time.time()
    publisher = Publisher(registry_root=scratch / "registry-central", model_name="wbc-classifier", contract=contract,
                          model=model, parity_images=find_parity_images(source.root, contract),
                          work_dir=scratch / "export")
    outcome = publisher.publish({k: v.detach().clone() for k, v in model.state_dict().items()}, {"source": "centralised"})
    return {
        "wall_seconds": round(time.time() - t0, 1),
        "threads": torch.get_num_threads(),
        "train_images": len(train),
        "epochs": epochs,
        "registration_s": round(time.time() - r0, 1),
        "registered": outcome.registered,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--isolation", choices=("process", "subprocess"), default="process")
    parser.add_argument("--only", choices=("federated", "centralised"), default=None)
    parser.add_argument("--out", default="var/h6/overhead.json")
    args = parser.parse_args()
    source = DataRoot(resolve_data_root(args.data_root))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": vars(args), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="wbc-overhead-") as tmp:
        scratch = Path(tmp)
        if args.only != "centralised":
            report["load_before_federated"] = os.getloadavg()
            report["federated"] = federated(args, source, scratch)
            out.write_text(json.dumps(report, indent=2))
        if args.only != "federated":
            report["load_before_centralised"] = os.getloadavg()
            report["centralised"] = centralised(args, source, scratch)
        report["load_at_end"] = os.getloadavg()
    if "federated" in report and "centralised" in report:
        report["ratio"] = round(report["federated"]["wall_seconds"] / report["centralised"]["wall_seconds"], 2)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
