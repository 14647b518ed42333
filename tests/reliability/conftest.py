"""Reliability and security tests: the service's own fixtures (a tiny real exported model in a real
registry, real cell crops, per-test PostgreSQL databases), reused from tests/service, plus what only
these tests need (Barcelona JPEGs for load, a production-like contract for the memory bound).

The fixtures of tests/service/conftest.py and tests/service/review/conftest.py are re-exported here
(pytest only sees a conftest's fixtures below its own folder); their helper modules (upload_helpers,
server_helpers, dicom_helpers, review_helpers) are put on sys.path the same way pytest does for them.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from federation.sites import DataRoot
from models.contract import CellCrop, ModelContract
from models.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
for helpers in ("tests/service/review", "tests/service", "tests/reliability"):
    if str(ROOT / helpers) not in sys.path:
        sys.path.insert(0, str(ROOT / helpers))


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_service = _load("_wbc_service_fixtures", ROOT / "tests/service/conftest.py")
_review = _load("_wbc_review_fixtures", ROOT / "tests/service/review/conftest.py")

# Re-exported fixtures (same functions, so the same behaviour as in tests/service).
model_contract = _service.model_contract
exported_onnx = _service.exported_onnx
registry_root = _service.registry_root
settings = _service.settings
client = _service.client
cell_images = _service.cell_images
jpeg_bytes = _service.jpeg_bytes
png_bytes = _service.png_bytes
pg_admin = _review.pg_admin
pg_url = _review.pg_url
pg_db = _review.pg_db
review_registry = _review.review_registry
make_settings = _review.make_settings
barcelona_cells = _review.barcelona_cells
audit_log = _review.audit_log

MODEL_NAME = _service.MODEL_NAME
BARCELONA = "barcelona-pbc"


@pytest.fixture(scope="session")
def barcelona_jpegs(data_root: DataRoot) -> list[tuple[str, bytes]]:
    """Forty real Barcelona test-split crops (360x363 JPEGs), eight of each of five classes: the load."""
    picks = []
    for label in ("neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"):
        for sample in data_root.select([BARCELONA], ["test"], [label])[:8]:
            picks.append((sample.path.name, sample.path.read_bytes()))
    return picks


@pytest.fixture(scope="session")
def production_like_registry(
    tmp_path_factory: pytest.TempPathFactory, exported_onnx: Path, model_contract: ModelContract
) -> Path:
    """The test network registered with the preprocessing the federation's models use (cell crop 1.3 and
    white balance, federation/pyproject defaults): what decides the memory a huge image costs."""
    root = tmp_path_factory.mktemp("production-like-registry")
    contract = model_contract.model_copy(
        update={"cell_crop": CellCrop(scale=1.3), "color_norm": "white-balance"}
    )
    Registry(root, MODEL_NAME).register(exported_onnx, contract, {"lineage": {"run_id": "reliability"}})
    return root
