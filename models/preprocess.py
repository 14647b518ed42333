"""The contract's preprocessing, in NumPy and Pillow only, shared by training, export checks and serving.

Two stages so that training can put random augmentation between them:
  `prepare(image)`  deterministic, cacheable: RGB conversion, then locate/centre/rescale the white cell
  `finish(image)`   colour policy, low-pass (`detail`), resize to the input size, normalise to CHW float32
`preprocess = finish ∘ prepare` is what the service and evaluation run.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from models.cellcrop import CellMeasures, crop_cell_sized, normalise_stain, white_balance
from models.contract import ModelContract

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit and float scaled down, alpha composited onto white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def prepare(image: Image.Image, contract: ModelContract) -> Image.Image:
    """Deterministic part: RGB, the cell crop and the colour normalisation the contract asks for."""
    return prepare_sized(image, contract)[0]


def prepare_sized(image: Image.Image, contract: ModelContract) -> tuple[Image.Image, CellMeasures]:
    """`prepare`, and the located cell's measures: diameter in the input's pixels, granule density (NaN
    without a cell crop)."""
    rgb = to_rgb(image)
    measures = CellMeasures(float("nan"), float("nan"))
    if contract.cell_crop is not None:
        rgb, measures = crop_cell_sized(rgb, contract.cell_crop)
    if contract.color_norm == "white-balance":
        rgb = white_balance(rgb)
    elif contract.color_norm == "stain":
        rgb = normalise_stain(rgb)
    return rgb, measures


def _resize(image: Image.Image, contract: ModelContract) -> Image.Image:
    size = contract.input_size
    resample = _RESAMPLE[contract.interpolation]
    if contract.resize == "stretch":
        return image.resize((size, size), resample)
    if contract.resize == "pad":
        return ImageOps.pad(image, (size, size), method=resample, color=_edge_colour(image))
    return ImageOps.fit(image, (size, size), method=resample)


def _edge_colour(image: Image.Image) -> tuple[int, ...]:
    """Median colour of the border: padding with the slide background, not black."""
    arr = np.asarray(image)
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def finish(image: Image.Image, contract: ModelContract) -> np.ndarray:
    """Colour policy, resize, normalise: a float32 array of shape (3, size, size)."""
    if contract.color == "gray":
        image = ImageOps.autocontrast(image.convert("L"), cutoff=1).convert("RGB")
    if contract.detail is not None and image.width > contract.detail:
        side = contract.detail
        image = image.resize((side, round(side * image.height / image.width)), Image.Resampling.BOX)
    image = _resize(image, contract)
    arr = np.asarray(image, dtype=np.float32) * (1.0 / 255.0)
    mean = np.asarray(contract.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(contract.std, dtype=np.float32)
    arr = (arr - mean) * inv_std
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess(image: Image.Image, contract: ModelContract) -> np.ndarray:
    return finish(prepare(image, contract), contract)


def preprocess_sized(image: Image.Image, contract: ModelContract) -> tuple[np.ndarray, CellMeasures]:
    """`preprocess`, and the located cell's measures (`prepare_sized`)."""
    prepared, measures = prepare_sized(image, contract)
    return finish(prepared, contract), measures


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Numerically stable softmax over the last axis, logits divided by the contract's temperature."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
