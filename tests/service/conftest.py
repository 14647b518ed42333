"""A real tiny exported model in a real registry, and a few real cell images, for the service tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from federation.sites import DataRoot
from models.contract import SHARED_CLASSES, ModelContract
from models.registry import Registry
from service.config import Settings
from service.main import create_app

MODEL_NAME = "wbc-test"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def export_test_model(contract: ModelContract, path: Path) -> Path:
    """A randomly initialised timm test network (≈100k parameters) exported by models.export."""
    torch = pytest.importorskip("torch", reason="exporting the test model needs the train extras (torch)")
    timm = pytest.importorskip("timm", reason="exporting the test model needs the train extras (timm)")
    from models.export import export_onnx

    torch.manual_seed(0)
    net = timm.create_model(contract.architecture, pretrained=False, num_classes=contract.num_classes)
    return export_onnx(net, contract, path)


@pytest.fixture(scope="session")
def model_contract() -> ModelContract:
    return ModelContract(
        architecture="test_efficientnet",
        class_names=SHARED_CLASSES,
        input_size=64,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        temperature=1.5,
    )


@pytest.fixture(scope="session")
def exported_onnx(tmp_path_factory: pytest.TempPathFactory, model_contract: ModelContract) -> Path:
    path = tmp_path_factory.mktemp("export") / "model.onnx"
    return export_test_model(model_contract, path)


@pytest.fixture(scope="session")
def registry_root(tmp_path_factory: pytest.TempPathFactory, exported_onnx: Path,
                  model_contract: ModelContract) -> Path:
    root = tmp_path_factory.mktemp("registry")
    Registry(root, MODEL_NAME).register(exported_onnx, model_contract, {"lineage": {"run_id": "service-tests"}})
    return root


@pytest.fixture()
def settings(registry_root: Path) -> Settings:
    return Settings(registry=registry_root, model_name=MODEL_NAME, intra_op_threads=1)


@pytest.fixture()
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as test_client:  # `with` runs the lifespan (model load)
        yield test_client


@pytest.fixture(scope="session")
def cell_images(data_root: DataRoot) -> dict[str, bytes]:
    """Four real crops from three sites, as uploaded: two JPEG, one PNG, one more JPEG."""
    picks = {}
    for site, label in (("tehran-lisc", "neutrophil"), ("bccd", "eosinophil"), ("jiangxi-tecom", "lymphocyte"),
                        ("barcelona-pbc", "monocyte")):
        sample = data_root.select([site], ["test"], [label])[0]
        picks[sample.path.name] = sample.path.read_bytes()
    return picks


@pytest.fixture(scope="session")
def jpeg_bytes(cell_images: dict[str, bytes]) -> bytes:
    return next(data for name, data in cell_images.items() if name.lower().endswith((".jpg", ".jpeg")))


@pytest.fixture(scope="session")
def png_bytes(cell_images: dict[str, bytes]) -> bytes:
    return next(data for name, data in cell_images.items() if name.lower().endswith(".png"))
