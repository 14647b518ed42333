"""INT8 variants: models.quantize registers one beside the fp32 version; WBC_PRECISION picks it."""

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from upload_helpers import files_field

from federation.sites import DataRoot
from models.contract import ModelContract
from models.quantize import quantize_version
from models.registry import Registry
from service.config import Settings
from service.inference import Classifier, ModelLoadError, load_from_registry
from service.main import create_app


@pytest.fixture(scope="module")
def quantized(
    tmp_path_factory: pytest.TempPathFactory,
    exported_onnx: Path,
    model_contract: ModelContract,
    data_root: DataRoot,
) -> Path:
    root = tmp_path_factory.mktemp("int8")
    registry = Registry(root, "q")
    registry.register(exported_onnx, model_contract, {"lineage": {"run_id": "r"}})
    images = [s.path for s in data_root.select(["tehran-lisc", "bccd"], ["train"])[:24]]
    quantize_version(registry, 1, images)
    return root


def test_variant_is_registered_beside_its_source(quantized: Path) -> None:
    fp32, int8 = Registry(quantized, "q").versions()
    assert int8.metadata["variant"] == "int8" and int8.metadata["quantization"]["source_version"] == 1
    assert int8.metadata["quantization"]["source_sha256"] == fp32.sha256
    assert int8.metadata["lineage"] == {"run_id": "r", "parent_version": 1}
    assert int8.contract.with_updates(version=1) == fp32.contract  # same contract, its own version stamp
    ops = {n.op_type for n in __import__("onnx").load(str(int8.onnx_path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops


def test_int8_agrees_with_fp32_on_real_cells(quantized: Path, cell_images: dict[str, bytes]) -> None:
    settings = Settings(registry=quantized, model_name="q", intra_op_threads=1)
    with TestClient(create_app(settings)) as fp32_client:
        fp32 = fp32_client.post("/v1/classify", files=files_field(*cell_images.items())).json()
    with TestClient(create_app(settings.model_copy(update={"precision": "int8"}))) as int8_client:
        ready = int8_client.get("/v2/health/ready").json()
        int8 = int8_client.post("/v1/classify", files=files_field(*cell_images.items())).json()
    assert (fp32["version"], int8["version"], ready["precision"]) == (1, 2, "int8")
    for a, b in zip(fp32["results"], int8["results"]):
        diff = np.abs(
            np.array(list(a["probabilities"].values())) - np.array(list(b["probabilities"].values()))
        )
        assert diff.max() < 0.1


def test_latest_means_the_newest_fp32(quantized: Path) -> None:
    assert load_from_registry(Settings(registry=quantized, model_name="q")).version == 1
    assert load_from_registry(Settings(registry=quantized, model_name="q", version="2")).precision == "int8"


def test_int8_without_a_variant_is_refused_with_the_command(
    tmp_path: Path, exported_onnx: Path, model_contract: ModelContract
) -> None:
    Registry(tmp_path, "plain").register(exported_onnx, model_contract, {})
    with pytest.raises(ModelLoadError, match="models.quantize"):
        load_from_registry(Settings(registry=tmp_path, model_name="plain", precision="int8"))


def test_quantizing_a_variant_is_refused(quantized: Path) -> None:
    with pytest.raises(ValueError, match="already an INT8"):
        quantize_version(Registry(quantized, "q"), 2, [])
    assert Classifier(Registry(quantized, "q").get(2).onnx_path).contract.version == 2
