from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # test helpers such as onnx_builders

from federation.sites import DataRoot, default_data_root  # noqa: E402
from models.contract import SHARED_CLASSES, ModelContract  # noqa: E402


@pytest.fixture(scope="session")
def data_root() -> DataRoot:
    root = default_data_root()
    if root is None:
        pytest.skip(
            "needs the public WBC site data: set WBC_DATA_ROOT or provide ../shared/data/wbc "
            "(README, 'Site data')"
        )
    return DataRoot(root)


@pytest.fixture(scope="session")
def tiny_contract() -> ModelContract:
    return ModelContract(
        architecture="tiny-gap-linear",
        class_names=SHARED_CLASSES,
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
