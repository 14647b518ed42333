"""The contract's low-pass (`detail`): it takes a scanner's fine texture away and leaves the cell's shape."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from federation.sites import DataRoot
from federation.task import build_contract
from models.contract import ModelContract
from models.preprocess import finish, prepare, preprocess


def _high_frequency_energy(chw: np.ndarray) -> float:
    """Mean squared difference between neighbouring pixels: what fine chromatin texture contributes."""
    return float(np.mean(np.diff(chw, axis=2) ** 2) + np.mean(np.diff(chw, axis=1) ** 2))


def test_low_pass_removes_texture_from_a_real_sharp_cell(data_root: DataRoot) -> None:
    # Barcelona (CellaVision) cells are the sharpest of the four sites: the case the low-pass is for.
    sample = next(s for s in data_root.samples if s.site == "barcelona-pbc" and s.label == "lymphocyte")
    plain = build_contract(input_size=128)
    soft = build_contract(input_size=128, detail=48)
    with Image.open(sample.path) as image:
        cell = prepare(image, plain)
    sharp_x, soft_x = finish(cell, plain), finish(cell, soft)
    assert soft_x.shape == sharp_x.shape == (3, 128, 128)
    assert _high_frequency_energy(soft_x) < 0.5 * _high_frequency_energy(sharp_x)
    # Same cell, same place: the coarse picture (8x8 means) barely moves.
    coarse = lambda x: x.reshape(3, 16, 8, 16, 8).mean(axis=(2, 4))
    assert np.abs(coarse(soft_x) - coarse(sharp_x)).mean() < 0.1


def test_low_pass_is_a_no_op_on_images_already_coarser_than_it() -> None:
    small = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    plain, soft = build_contract(input_size=64, cell_crop=None), build_contract(input_size=64, cell_crop=None, detail=48)
    np.testing.assert_array_equal(preprocess(small, plain), preprocess(small, soft))


def test_low_pass_survives_the_contract_round_trip_and_is_bounded() -> None:
    contract = build_contract(detail=48)
    assert ModelContract.from_json(contract.to_json()).detail == 48
    assert ModelContract.from_json(build_contract().to_json()).detail is None
    for bad in (4, 0, 5000):
        with pytest.raises(ValidationError):
            contract.with_updates(detail=bad)
