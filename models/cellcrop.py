"""Locate the white cell in a crop and re-frame it at one scale, so crops from every site look alike.

Sites crop at very different magnifications (a tight 120 px box around the cell in one hospital, a
360 px field full of red cells in another). The white cell's nucleus is the one object every stain
colours strongly, so the locator measures the nucleus and derives the frame from it:

1. trim black padding bars (crops taken at a slide image's edge are padded with black) and work on a
   copy box-reduced to about 112 px (speed; a nucleus is still 10+ px across);
2. white-balance against the slide background (its brightest pixels), so a yellow or blue cast goes,
   and score each pixel's "nucleus-ness" as green optical density x (0.5 + saturation): nuclei are dark and
   chromatic, red cells paler or greyer, background neither;
3. a three-class Otsu split of that score (background / red cells or cytoplasm / nucleus); the core is
   the upper class's component that is large and near the centre (labelled crops are centred);
4. the paler parts of the same nucleus (other lobes, the rim of a dark nucleus) join the core: pixels
   at least about half as stained as the core, in components that touch it, or that lie within a lobe
   gap, are not specks and have the core's stain colour (optical-density direction: not red cells);
5. the scale is the nucleus's spread (the diameter of the disc with the same second moments), which
   grows with a lobed nucleus spread over the cell as it does with a round one filling it; the cell
   diameter reported is a fixed multiple of it, so every site is framed by the same rule.

`crop_cell` cuts the square of side `scale` x diameter around the cell; what falls outside the image
(or on a black bar) is filled with the border's median colour.

Two colour normalisations for after the crop, same machinery: `white_balance` (background to white, one
contrast stretch) and `normalise_stain` (the nucleus's optical density mapped to one reference colour).

NumPy + scipy.ndimage + Pillow only: the service runs this per request (about 1-2 ms on a 360 px JPEG).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image
from scipy import ndimage

from models.contract import CellCrop

# Working size: images are box-reduced by an integer factor to about this long side.
_WORK_SIDE = 112
# Edge rows/columns whose pixels are this dark (grey level) in > 90 % are padding, not slide.
_BLACK = 20
# Green optical density above this counts as fully stained (a dark core, not a denser nucleus).
_MAX_DENSITY = 1.5
# Pixels trimmed beyond a black bar's edge (JPEG smears it over a few pixels).
_BAR_MARGIN = 3
# Paler nucleus parts join the darkest core down to this fraction of the core's median score.
_LOBE_LEVEL = 0.55
# Nucleus parts join when within this many sqrt(joined area) pixels (the gap between two lobes).
_JOIN_REACH = 0.5
# A separate component joins the nucleus only if at least this fraction of the core's area.
_MIN_LOBE = 0.1
# ... and only if its optical-density direction (stain colour) is within ~14 degrees of the core's.
_SAME_STAIN = 0.97
# Reported cell diameter per nucleus spread (round lymphocyte nucleus ~0.8 of its cell).
_CELL_PER_NUCLEUS = 1.25
# Granule density: cytoplasm within this many cell diameters of the nucleus's centre, stained above this
# summed optical density (not background), at least this many working pixels, its densest fraction.
_CYTOPLASM_REACH = 0.6
_MIN_CYTOPLASM_DENSITY = 0.2
_MIN_CYTOPLASM_PIXELS = 10
_GRANULE_QUANTILE = 0.3
# Nothing is stained when the best nucleus score is below this (blank or grey field).
_MIN_SCORE = 0.1
# normalise_stain: the nucleus's optical density per channel after normalisation (an MGG-like purple,
# about the middle of the four public sites), and the limits on the per-channel gain.
_REFERENCE_DENSITY = np.array([0.9, 1.5, 0.4], np.float32)
_GAIN_RANGE = (0.25, 4.0)
# Fallback when no nucleus is found: centre of the unpadded image, a cell half its short side across.
_FALLBACK_FRACTION = 0.5


class _Found(NamedTuple):
    cx: float
    cy: float
    diameter: float
    box: tuple[int, int, int, int]  # unpadded content (left, top, right, bottom), full resolution
    fill: tuple[int, int, int]  # median colour of the content's border
    located: bool = True  # False: no nucleus found, centre and diameter are the fallback's guess
    granules: float = float("nan")  # `_granule_density` (NaN: no nucleus or too little cytoplasm)


class CellMeasures(NamedTuple):
    """What the locator measures of the white cell for the opinions beside the network (NaN: not found).

    diameter: pixels of the input image (`models.size_prior`); granules: the log optical density of the
    densest part of the cytoplasm relative to the nucleus's (`models.granule_prior`)."""

    diameter: float
    granules: float


def locate_cell(image: Image.Image) -> tuple[float, float, float]:
    """(centre x, centre y, diameter) of the white cell, in pixels of `image`.

    Never raises on a valid image: with nothing found it answers the centre of the (unpadded) image and
    half its short side.
    """
    found = _analyse(image)
    return found.cx, found.cy, found.diameter


def crop_cell(image: Image.Image, spec: CellCrop) -> Image.Image:
    """A square of side `spec.scale` x the cell's diameter, centred on the cell.

    Whatever falls outside the image, or on its black padding bars, is filled with the median colour of
    the (unpadded) image border, not black.
    """
    return crop_cell_sized(image, spec)[0]


def crop_cell_sized(image: Image.Image, spec: CellCrop) -> tuple[Image.Image, CellMeasures]:
    """`crop_cell`, and the measures the opinions beside the network need, from the same analysis; NaN
    when no nucleus was found (the fallback frame says nothing about size or granules)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    found = _analyse(rgb)
    return _cut(rgb, found, spec), _measures(found)


def cell_measures(image: Image.Image) -> CellMeasures:
    """The located white cell's diameter (pixels of `image`) and granule density; NaN where not found."""
    return _measures(_analyse(image if image.mode == "RGB" else image.convert("RGB")))


def cell_diameter(image: Image.Image) -> float:
    """The located white cell's diameter in pixels of `image`; NaN when no nucleus was found."""
    return cell_measures(image).diameter


def _measures(found: _Found) -> CellMeasures:
    if not found.located:
        return CellMeasures(float("nan"), float("nan"))
    return CellMeasures(found.diameter, found.granules)


def _cut(rgb: Image.Image, found: _Found, spec: CellCrop) -> Image.Image:
    side = max(1, int(round(spec.scale * found.diameter)))
    x0 = int(round(found.cx - side / 2.0))
    y0 = int(round(found.cy - side / 2.0))
    left, top, right, bottom = found.box
    # The requested square intersected with the unpadded content, in image coordinates.
    ix0, iy0 = max(x0, left), max(y0, top)
    ix1, iy1 = min(x0 + side, right), min(y0 + side, bottom)
    if (ix0, iy0, ix1, iy1) == (x0, y0, x0 + side, y0 + side):
        return rgb.crop((ix0, iy0, ix1, iy1))
    out = Image.new("RGB", (side, side), found.fill)
    if ix1 > ix0 and iy1 > iy0:
        out.paste(rgb.crop((ix0, iy0, ix1, iy1)), (ix0 - x0, iy0 - y0))
    return out


def white_balance(image: Image.Image) -> Image.Image:
    """Divide by the slide background's colour (so it turns white), then stretch all channels together
    so the darkest 1 % reach black: removes a site's colour cast and exposure, keeps the stain's hue."""
    a = np.asarray(image if image.mode == "RGB" else image.convert("RGB"), dtype=np.float32) + 1.0
    balanced = np.minimum(a / _background(a), 1.0)
    low = float(np.percentile(balanced, 1))
    out = (balanced - low) * (255.0 / max(1.0 - low, 1e-3))
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


def normalise_stain(image: Image.Image) -> Image.Image:
    """Re-render `image` so that its slide background is white and its white cell's nucleus has one
    reference colour, whatever the site's stain, camera and white balance.

    In optical density (which Beer-Lambert makes proportional to the amount of stain) each channel is
    scaled so that the nucleus's median density matches `_REFERENCE_DENSITY`; everything else (cytoplasm,
    granules, red cells) is scaled by the same factors. Without a nucleus only the white balance applies.
    """
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    factor = max(1, int(round(max(rgb.size) / _WORK_SIDE)))
    small = np.asarray(rgb.reduce(factor) if factor > 1 else rgb)
    a = np.asarray(rgb, dtype=np.float32) + 1.0
    background = _background(small.astype(np.float32) + 1.0)
    density = -np.log(np.minimum(a / background, 1.0))
    gain = np.ones(3, np.float32)
    nucleus = _nucleus_mask(small) if min(small.shape[:2]) >= 4 else None
    if nucleus is not None:
        _, small_density = _stain(small)
        core = np.median(small_density[nucleus], axis=0)
        gain = np.clip(_REFERENCE_DENSITY / np.maximum(core, 1e-3), *_GAIN_RANGE).astype(np.float32)
    out = np.exp(-density * gain) * 255.0
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


# --- internals ------------------------------------------------------------------------------------


def _analyse(image: Image.Image) -> _Found:
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    box = _content_box(rgb)
    left, top, right, bottom = box
    content = rgb.crop(box) if box != (0, 0, rgb.width, rgb.height) else rgb
    factor = max(1, int(round(max(content.size) / _WORK_SIDE)))
    small = np.asarray(content.reduce(factor) if factor > 1 else content)
    fill = _border_colour(small)

    nucleus, density = None, None
    if min(small.shape[:2]) >= 4:
        score, density = _stain(small)
        nucleus = _nucleus_from(score, density)
    if nucleus is None:
        diameter = _FALLBACK_FRACTION * min(right - left, bottom - top)
        return _Found((left + right) / 2.0, (top + bottom) / 2.0, max(float(diameter), 1.0), box, fill, False)
    ys, xs = np.nonzero(nucleus)
    diameter = _CELL_PER_NUCLEUS * _spread(ys, xs)
    # Back to full-resolution pixels (reduced pixel i covers [i*f, (i+1)*f)).
    return _Found(
        float(left + (xs.mean() + 0.5) * factor),
        float(top + (ys.mean() + 0.5) * factor),
        float(max(diameter, 2.0) * factor),
        box,
        fill,
        granules=_granule_density(nucleus, density, _CYTOPLASM_REACH * diameter),
    )


def _granule_density(nucleus: np.ndarray, density: np.ndarray, radius: float) -> float:
    """log(mean optical density of the densest `_GRANULE_QUANTILE` of the cytoplasm / the nucleus's mean).

    Cytoplasm: stained pixels within `radius` of the nucleus's centre, nucleus out. An eosinophil's
    granules are about as dense as its nucleus, a neutrophil's much paler; being a ratio inside one cell it
    agrees between sites whatever their stain strength, camera or magnification (eosinophil > neutrophil
    AUC 0.75-1.00 at each of the four sites; docs/results.md, "Granules")."""
    ys, xs = np.nonzero(nucleus)
    total = density.sum(axis=-1)
    yy, xx = np.mgrid[: total.shape[0], : total.shape[1]]
    near = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= radius**2
    cytoplasm = total[near & ~nucleus & (total > _MIN_CYTOPLASM_DENSITY)]
    if cytoplasm.size < _MIN_CYTOPLASM_PIXELS:
        return float("nan")
    dense = cytoplasm[cytoplasm >= np.percentile(cytoplasm, 100 * (1 - _GRANULE_QUANTILE))]
    return float(np.log(dense.mean()) - np.log(total[nucleus].mean()))


def _content_box(rgb: Image.Image) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) after trimming edge rows/columns that are mostly black padding."""
    dark = np.asarray(rgb.convert("L")) < _BLACK
    h, w = dark.shape
    rows = dark.mean(axis=1) > 0.9
    cols = dark.mean(axis=0) > 0.9
    if not (rows[0] or rows[-1] or cols[0] or cols[-1]):
        return 0, 0, w, h
    keep_rows, keep_cols = np.flatnonzero(~rows), np.flatnonzero(~cols)
    if keep_rows.size == 0 or keep_cols.size == 0:  # all black: keep the whole image
        return 0, 0, w, h
    # Only bars at the edges are trimmed (a dark band inside stays), plus a margin for the JPEG-blurred
    # edge of the bar.
    left, top = int(keep_cols[0]), int(keep_rows[0])
    right, bottom = int(keep_cols[-1]) + 1, int(keep_rows[-1]) + 1
    m = _BAR_MARGIN
    left, top = left + m * (left > 0), top + m * (top > 0)
    right, bottom = right - m * (right < w), bottom - m * (bottom < h)
    if right - left < 2 * m or bottom - top < 2 * m:
        return 0, 0, w, h
    return left, top, right, bottom


def _border_colour(arr: np.ndarray) -> tuple[int, int, int]:
    """Median colour of the outermost pixels: the slide background, for padding."""
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    r, g, b = np.median(border, axis=0)
    return int(r), int(g), int(b)


def _stain(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nucleus-ness score, optical density per channel), both relative to the slide background.

    Score: green optical density x (0.5 + saturation) after white balance. Optical density is what
    Beer-Lambert makes additive: its direction is the stain's colour, whatever the darkness.
    """
    a = arr.astype(np.float32) + 1.0
    balanced = np.minimum(a / _background(a), 1.0)
    density = -np.log(balanced)
    r, g, b = balanced[..., 0], balanced[..., 1], balanced[..., 2]
    saturation = 1.0 - np.minimum(np.minimum(r, g), b) / np.maximum(np.maximum(r, g), b)
    # Capped so that a nearly black core does not dwarf the paler lobes of the same nucleus.
    score = np.minimum(density[..., 1], _MAX_DENSITY) * (0.5 + saturation)
    return score, density


def _background(a: np.ndarray) -> np.ndarray:
    """Slide background colour: the median of the brightest 15 % of pixels."""
    lum = a.sum(axis=2)
    return np.median(a[lum >= np.percentile(lum, 85)], axis=0)


def _nucleus_mask(arr: np.ndarray) -> np.ndarray | None:
    """Mask of the white cell's nucleus (the central, large, strongly stained object), or None."""
    score, density = _stain(arr)
    return _nucleus_from(score, density)


def _nucleus_from(score: np.ndarray, density: np.ndarray) -> np.ndarray | None:
    score = ndimage.uniform_filter(score, size=3)
    if float(score.max()) < _MIN_SCORE:
        return None
    lower, upper = _otsu3(score)
    core = _central_component(_clean(score > upper))
    if core is None:
        return None
    # Paler parts of the same nucleus: at least about half as stained as the core (red cells mostly
    # stay below that), in components that touch the core or lie within a lobe gap of it.
    level = max(lower, _LOBE_LEVEL * float(np.median(score[core])))
    return _grow(_clean(score > level) | core, core, density)


def _otsu3(values: np.ndarray, bins: int = 64) -> tuple[float, float]:
    """(lower, upper) thresholds of a three-class Otsu split of `values` (exhaustive over bin pairs)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return hi, hi
    hist = np.bincount(
        np.minimum(((values.ravel() - lo) * (bins / (hi - lo))).astype(np.int64), bins - 1), minlength=bins
    )
    edges = lo + (hi - lo) / bins * np.arange(bins + 1)
    p = hist / hist.sum()
    w = np.concatenate([[0.0], np.cumsum(p)])  # w[k] = mass of bins < k
    m = np.concatenate([[0.0], np.cumsum(p * (edges[:-1] + edges[1:]) / 2.0)])
    i, j = _bin_pairs(bins)  # classes [0, i), [i, j), [j, bins)
    w0, w1, w2 = w[i], w[j] - w[i], w[bins] - w[j]
    m0, m1, m2 = m[i], m[j] - m[i], m[bins] - m[j]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.nan_to_num(m0 * m0 / w0) + np.nan_to_num(m1 * m1 / w1) + np.nan_to_num(m2 * m2 / w2)
    best = int(np.argmax(between))
    return float(edges[i[best]]), float(edges[j[best]])


_PAIRS: dict[int, tuple[np.ndarray, np.ndarray]] = {}
_SQUARE = np.ones((3, 3), bool)


def _bin_pairs(bins: int) -> tuple[np.ndarray, np.ndarray]:
    if bins not in _PAIRS:
        i, j = np.triu_indices(bins + 1, k=1)
        keep = (i > 0) & (j < bins)
        _PAIRS[bins] = (i[keep], j[keep])
    return _PAIRS[bins]


def _clean(mask: np.ndarray) -> np.ndarray:
    """Drop specks and one-pixel bridges."""
    return ndimage.binary_opening(mask, structure=np.ones((2, 2), bool))


def _central_component(mask: np.ndarray) -> np.ndarray | None:
    """The component that is large and near the centre (labelled crops are centred on their cell)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    index = np.arange(1, n + 1)
    areas = ndimage.sum_labels(mask, labels, index)
    h, w = mask.shape
    yy, xx = np.indices(mask.shape)
    cys = ndimage.sum_labels(yy, labels, index) / areas
    cxs = ndimage.sum_labels(xx, labels, index) / areas
    sigma = 0.3 * min(h, w)
    dist2 = ((cys - (h - 1) / 2.0) ** 2 + (cxs - (w - 1) / 2.0) ** 2) / sigma**2
    return labels == int(np.argmax(areas * np.exp(-0.5 * dist2))) + 1


def _grow(mask: np.ndarray, seed: np.ndarray, density: np.ndarray, rounds: int = 3) -> np.ndarray:
    """`seed` plus the components of `mask` that touch it, or that lie within a lobe gap of what was
    joined so far, are not specks (platelets, debris) and are stained the same colour (not red cells)."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return seed
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    touching = np.zeros(n + 1, bool)
    touching[np.unique(labels[seed])] = True
    stain = np.stack([np.bincount(labels.ravel(), density[..., c].ravel(), n + 1) for c in range(3)], 1)
    stain /= np.linalg.norm(stain, axis=1, keepdims=True) + 1e-9
    core = density[seed].sum(axis=0)
    core /= np.linalg.norm(core) + 1e-9
    joinable = (areas >= _MIN_LOBE * int(seed.sum())) & (stain @ core >= _SAME_STAIN)
    joinable[0] = False
    chosen = touching.copy()
    chosen[0] = False
    for _ in range(rounds):
        joined = chosen[labels] | seed
        reach = max(2, int(round(_JOIN_REACH * np.sqrt(joined.sum()))))
        near = ndimage.binary_dilation(joined, structure=_SQUARE, iterations=reach)
        nearby = np.zeros(n + 1, bool)
        nearby[np.unique(labels[near])] = True
        grown = chosen | (nearby & joinable)
        if (grown == chosen).all():
            break
        chosen = grown
    return chosen[labels] | seed


def _spread(ys: np.ndarray, xs: np.ndarray) -> float:
    """Diameter of the disc with the same second moments as these pixels (a filled disc: its own)."""
    return float(4.0 * np.sqrt(0.5 * (ys.var() + xs.var()) + 1.0 / 12.0))
