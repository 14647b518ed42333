"""Amplitude spectra: a cell keeps its shapes and takes on another site's look, or another cell's of its own site."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from federation.augment import AugmentConfig, CellAugment
from federation.sites import DataRoot
from federation.style import OwnAmplitudes, amplitude, mean_amplitude, mix_amplitude


def _edge_energy(image: Image.Image) -> float:
    arr = np.asarray(image.convert("L"), dtype=np.float32)
    return float(np.mean(np.diff(arr, axis=0) ** 2) + np.mean(np.diff(arr, axis=1) ** 2))


def _cells(data_root: DataRoot, site: str, n: int, side: int) -> list[Image.Image]:
    samples = [s for s in data_root.samples if s.site == site][:n]
    return [Image.open(s.path).convert("RGB").resize((side, side)) for s in samples]


def test_a_sharp_cell_takes_a_soft_sites_style_and_keeps_its_shape(data_root: DataRoot) -> None:
    side = 64
    soft_style = mean_amplitude([c.filter(ImageFilter.GaussianBlur(2.0)) for c in _cells(data_root, "bccd", 12, side)], side)
    sharp = _cells(data_root, "tehran-lisc", 1, side)[0]
    mixed = mix_amplitude(sharp, soft_style, 1.0)
    assert _edge_energy(mixed) < 0.7 * _edge_energy(sharp)  # the soft site's optics
    # Phase kept: the cell is where it was (the darkest region barely moves).
    dark = lambda im: np.unravel_index(np.argmin(np.asarray(im.convert("L").filter(ImageFilter.BoxBlur(6)))), (side, side))
    assert np.abs(np.subtract(dark(mixed), dark(sharp))).max() <= 6


def test_no_mix_is_the_identity_and_shapes_are_checked() -> None:
    cell = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    same = mix_amplitude(cell, amplitude(cell, 32), 0.7)  # mixing towards itself changes nothing
    assert np.abs(np.asarray(same, int) - np.asarray(cell, int)).max() <= 1
    with pytest.raises(ValueError, match="shape"):
        mix_amplitude(cell, np.zeros((16, 16, 3), np.float32), 0.5)
    with pytest.raises(ValueError, match="no images"):
        mean_amplitude([], 32)


def test_augmentation_uses_styles_only_when_asked() -> None:
    cell = Image.fromarray(np.random.default_rng(1).integers(0, 255, (48, 48, 3), dtype=np.uint8))
    flat = np.full((48, 48, 3), 0.0, np.float32)
    flat[0, 0] = 48 * 48 * 128.0  # a uniform gray image's spectrum: a strong, visible style
    off = AugmentConfig(**{**AugmentConfig.none().__dict__})
    on = AugmentConfig(**{**AugmentConfig.none().__dict__, "style_p": 1.0, "style_lambda": 1.0})
    a = np.asarray(CellAugment(48, off, [flat])(cell, random.Random(3)), int)
    b = np.asarray(CellAugment(48, on, [flat])(cell, random.Random(3)), int)
    c = np.asarray(CellAugment(48, on, [])(cell, random.Random(3)), int)  # no styles shared: no mix
    assert np.array_equal(a, c)
    assert np.abs(a - b).mean() > 5


def test_own_amplitudes_are_the_sites_cells_spectra_computed_when_drawn(data_root: DataRoot) -> None:
    cells = _cells(data_root, "tehran-lisc", 3, 40)
    read: list[int] = []
    prepared = lambda i: (read.append(i), cells[i])[1]
    bank = OwnAmplitudes(prepared, len(cells), 32)
    assert len(bank) == 3 and read == []  # nothing computed (or kept) up front
    assert np.allclose(bank[1], amplitude(cells[1], 32)) and read == [1]
    assert np.allclose(bank[-1], amplitude(cells[2], 32)) and len(bank[0:2]) == 2
    with pytest.raises(IndexError):
        bank[3]
    # In the augmentation: a cell drawn with another cell's spectrum, its sharpness moved towards it.
    on = AugmentConfig(**{**AugmentConfig.none().__dict__, "style_p": 1.0, "style_lambda": 1.0})
    soft = [c.filter(ImageFilter.GaussianBlur(2.5)) for c in cells]
    soft_bank = OwnAmplitudes(lambda i: soft[i], len(soft), 40)
    mixed = CellAugment(40, on, soft_bank)(cells[0], random.Random(0))
    assert _edge_energy(mixed) < 0.7 * _edge_energy(cells[0])
