from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # test helpers such as onnx_builders

from federation.sites import DataRoot, default_data_root  # noqa: E402
from models.contract import SHARED_CLASSES, ModelContract  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def review_store_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every service the tests start (in process or as a subprocess) keeps its review database and cell
    images in a temporary folder, never in var/ (WBC_* settings not passed explicitly come from here)."""
    root = tmp_path_factory.mktemp("review-store")
    values = {"WBC_DATABASE_URL": f"sqlite:///{root}/wbc.db", "WBC_IMAGE_STORE": str(root / "cells")}
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    yield root
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


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
