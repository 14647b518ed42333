"""INT8 variant of a registered model: ONNX Runtime static quantization, registered beside the fp32 version.

    python -m models.quantize --registry var/registry --model wbc-classifier --version 3
    WBC_PRECISION=int8 wbc serve ...        # serves the INT8 variant of whatever version is resolved

Static QDQ quantization (per-channel signed int8 weights, unsigned int8 activations) calibrated on
real cells of the training sites' `train` split, preprocessed by the version's own contract. The
result is a new version of the same model with `variant: "int8"` and `quantization.source_version`
in its metadata.json (lineage copied from the source, `parent_version` = the source), so the service's
WBC_PRECISION=int8 finds it, 'latest' never picks it by accident, and Triton sees an ordinary version.

Needs `onnx` (train/dev extras) besides onnxruntime; the service only reads the result.
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from models.contract import ModelContract
from models.export import INPUT_NAME
from models.registry import Registry, VersionInfo

log = logging.getLogger(__name__)

INT8 = "int8"
DEFAULT_CALIBRATION_IMAGES = 256


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over preprocessed batches."""

    def __init__(self, batches: Iterable[np.ndarray]):
        self._batches: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def calibration_batches(
    paths: list[Path], contract: ModelContract, batch_size: int = 16
) -> Iterator[np.ndarray]:
    from PIL import Image

    from models.preprocess import preprocess

    for i in range(0, len(paths), batch_size):
        arrays = []
        for path in paths[i : i + batch_size]:
            with Image.open(path) as image:
                arrays.append(preprocess(image, contract))
        yield np.stack(arrays)


def quantize_onnx(
    source: Path, target: Path, batches: Iterable[np.ndarray], *, method: str = "minmax"
) -> dict[str, Any]:
    """Write the static-INT8 QDQ model of `source` to `target`; returns what was done (for metadata)."""
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        # Shape inference + graph fusion first (BatchNorm folded into Conv), as ORT's docs recommend.
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(target),
            _Reader(batches),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=methods[method],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    return {
        "format": "QDQ",
        "weights": "int8 per-channel symmetric",
        "activations": "uint8 per-tensor",
        "calibration": method,
        "onnxruntime": onnxruntime.__version__,
    }


def calibration_images(data_root: str | Path | None, count: int, seed: int = 0) -> list[Path]:
    """A seeded, class-mixed sample of training-site `train` images (never test images)."""
    from federation.sites import DEFAULT_TRAINING_SITES, DataRoot, resolve_data_root

    samples = DataRoot(resolve_data_root(data_root)).select(DEFAULT_TRAINING_SITES, ["train"])
    random.Random(seed).shuffle(samples)
    return [s.path for s in samples[:count]]


def quantize_version(
    registry: Registry,
    version: int,
    images: list[Path],
    *,
    method: str = "minmax",
    extra_metadata: dict[str, Any] | None = None,
) -> VersionInfo:
    """Quantize `version` and register the result as the next version (variant int8)."""
    source = registry.get(version)
    if source.metadata.get("variant") == INT8:
        raise ValueError(f"{registry.model_name} v{version} is already an INT8 variant")
    source.verify()
    contract = source.contract
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "model.int8.onnx"
        done = quantize_onnx(source.onnx_path, target, calibration_batches(images, contract), method=method)
        metadata = {
            **{k: v for k, v in source.metadata.items() if k in ("lineage", "gate", "metrics")},
            **(extra_metadata or {}),
            "variant": INT8,
            "quantization": {
                **done,
                "source_version": version,
                "source_sha256": source.sha256,
                "calibration_images": len(images),
            },
        }
        metadata["lineage"] = {**metadata.get("lineage", {}), "parent_version": version}
        registered = registry.register(target, contract.with_updates(model_name=None, version=None), metadata)
    log.info("%s v%d: INT8 variant of v%d registered", registry.model_name, registered.version, version)
    return registered


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--registry", required=True, help="registry root")
    parser.add_argument("--model", default="wbc-classifier", help="model name in the registry")
    parser.add_argument("--version", type=int, required=True, help="the fp32 version to quantize")
    parser.add_argument(
        "--data-root", default=None, help="site data (default: WBC_DATA_ROOT or ../shared/data/wbc)"
    )
    parser.add_argument("--calibration-images", type=int, default=DEFAULT_CALIBRATION_IMAGES)
    parser.add_argument("--method", choices=("minmax", "percentile", "entropy"), default="minmax")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    registry = Registry(args.registry, args.model)
    images = calibration_images(args.data_root, args.calibration_images)
    info = quantize_version(registry, args.version, images, method=args.method)
    print(f"{args.model} v{info.version}: INT8 variant of v{args.version} ({info.onnx_path})")


if __name__ == "__main__":
    main()
