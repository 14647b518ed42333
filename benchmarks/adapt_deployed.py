"""`wbc adapt` on a deployed version: Barcelona confirms k cells per class, adapts, and both versions are
scored on Barcelona's test split through ONNX Runtime, as served.

    .venv/bin/python benchmarks/adapt_deployed.py --registry var/registry --version production --shots 20
    .venv/bin/python benchmarks/adapt_deployed.py --shots 0 --unlabelled 500   # `wbc adapt --unlabelled`

The site root holds k seeded cells per class from Barcelona's train split and all of its val split (the
adapted model's check and temperature); its test split is never in it. `--unlabelled N`: N seeded train
cells' images (labels unused) re-estimate the BatchNorm statistics instead (federation.adapt_statistics),
checked on the same val split. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np

from federation.adapt import AdaptSettings, adapt_version
from federation.adapt_statistics import adapt_statistics
from federation.site_data import SiteData
from federation.sites import EXTERNAL_SITE, DataRoot, Sample, resolve_data_root, write_manifest
from models.registry import Registry
from service.config import usable_cores
from service.evaluation import evaluate_classifier
from service.inference import Classifier, SessionConfig


def site_root(data: DataRoot, classes, shots: int, seed: int, dest: Path) -> Path:
    rng = np.random.default_rng(seed)
    picked: list[Sample] = []
    for label in classes:
        train = data.select([EXTERNAL_SITE], ["train"], [label])
        picked += [train[i] for i in sorted(rng.choice(len(train), min(shots, len(train)), replace=False))]
        picked += data.select([EXTERNAL_SITE], ["val"], [label])
    folder = dest / "sites" / EXTERNAL_SITE
    folder.mkdir(parents=True)
    for label in classes:
        (folder / label).symlink_to(data.select([EXTERNAL_SITE], None, [label])[0].path.parent)
    write_manifest(dest, [Sample(folder / s.label / s.path.name, s.site, s.label, s.split, s.group) for s in picked])
    return dest


def report(outcome, t0: float) -> None:
    print(f"adapted in {time.time() - t0:.0f} s; val balanced accuracy {outcome.before.balanced_accuracy:.3f} -> "
          f"{outcome.after.balanced_accuracy:.3f}; {(outcome.registered or {}).get('reason') or outcome.refused}")


def score(info, test) -> tuple[float, float, float]:
    classifier = Classifier(info.onnx_path, SessionConfig(intra_op_threads=usable_cores()))
    metrics, _, _ = evaluate_classifier(classifier, test)
    recall = metrics.as_dict()["recall"]
    return metrics.balanced_accuracy, metrics.extra["ece"], recall["lymphocyte"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--registry", type=Path, default=ROOT / "var" / "registry")
    ap.add_argument("--model-name", default="wbc-classifier")
    ap.add_argument("--version", default="production")
    ap.add_argument("--shots", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--unlabelled", type=int, default=0, help="also: statistics from N unlabelled train cells")
    args = ap.parse_args()
    data = DataRoot(resolve_data_root(None))
    parent = Registry(args.registry, args.model_name).resolve(args.version)
    classes = parent.contract.class_names
    test = data.select([EXTERNAL_SITE], ["test"], classes)
    t0 = time.time()
    rows = [("federated", parent)]
    with tempfile.TemporaryDirectory() as tmp:
        root = site_root(data, classes, args.shots, args.seed, Path(tmp) / "site")
        if args.shots:
            outcome = adapt_version(args.registry, args.model_name, str(parent.version), SiteData(EXTERNAL_SITE, root),
                                    target_model=f"{args.model_name}-{EXTERNAL_SITE}-k{args.shots}",
                                    settings=AdaptSettings(seed=args.seed), work_dir=Path(tmp) / "work")  # fmt: skip
            report(outcome, t0)
            if outcome.registered and outcome.registered.get("status") == "registered":
                rows.append((f"adapted, {args.shots} per class", Registry(args.registry, outcome.target_model).get(
                    outcome.registered["version"])))
        if args.unlabelled:
            t1 = time.time()
            pool = data.select([EXTERNAL_SITE], ["train"], classes)
            rng = np.random.default_rng(args.seed)
            cells = [pool[i].path for i in sorted(rng.choice(len(pool), min(args.unlabelled, len(pool)), replace=False))]
            val = SiteData(EXTERNAL_SITE, root).select("val", classes)[0]
            outcome = adapt_statistics(args.registry, args.model_name, str(parent.version), EXTERNAL_SITE, cells,
                                       val=val, target_model=f"{args.model_name}-{EXTERNAL_SITE}-adabn{args.unlabelled}",
                                       seed=args.seed, parity_root=root, work_dir=Path(tmp) / "work-statistics")
            report(outcome, t1)
            if outcome.registered and outcome.registered.get("status") == "registered":
                rows.append((f"statistics, {outcome.cells} unlabelled cells", Registry(
                    args.registry, outcome.target_model).get(outcome.registered["version"])))
    print(f"\n| {args.model_name} v{parent.version} on {EXTERNAL_SITE} test ({len(test)} cells) | balanced accuracy | "
          "ECE | lymphocyte recall |\n|---|---|---|---|")
    for label, info in rows:
        ba, ece, lymph = score(info, test)
        print(f"| {label} | {ba:.3f} | {ece:.3f} | {lymph:.2f} |")
    print(f"[{time.time() - t0:.0f} s]")


if __name__ == "__main__":
    main()
