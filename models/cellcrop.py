"""Locate the white cell in a crop and re-frame it at one scale (placeholder: centre square).

The real locator (nucleus segmentation) replaces `locate_cell`; `crop_cell` keeps its signature.
"""

from __future__ import annotations

from PIL import Image

from models.contract import CellCrop


def locate_cell(image: Image.Image) -> tuple[float, float, float]:
    """(centre x, centre y, diameter) of the white cell, in pixels of `image`."""
    w, h = image.size
    return w / 2.0, h / 2.0, min(w, h) / 2.0


def crop_cell(image: Image.Image, spec: CellCrop) -> Image.Image:
    cx, cy, diameter = locate_cell(image)
    half = spec.scale * diameter / 2.0
    box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
    return image.crop(box)
