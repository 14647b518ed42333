"""Site styles as amplitude spectra: what a site can share so that others train on cells that look like its.

A cell's Fourier amplitude carries its "style" (colour cast, illumination, how sharp the optics are:
the fall-off of high frequencies), its phase carries the shapes (Oppenheim & Lim 1981). Federated domain
generalisation shares amplitude between sites and trains on cells whose amplitude is mixed with another
site's (FedDG, Liu et al., CVPR 2021; full-spectrum amplitude mix as in FACT, Xu et al., CVPR 2021). Here a
site shares one array, the *mean* amplitude over its training cells at the network's input size: no
image, no label, no single cell (benchmark only: the deployment has no message that hands styles out).
Within a site nothing needs sharing: `OwnAmplitudes` mixes a cell with another cell of the same site
(run config `augment = "texture-amplitude"`). `AugmentConfig.style_p` applies either during training; the
service never sees any of it. NumPy + Pillow only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image


def amplitude(image: Image.Image, side: int) -> np.ndarray:
    """Per-channel Fourier amplitude (side, side, 3), float32, of the image resized to side × side."""
    arr = np.asarray(image.convert("RGB").resize((side, side), Image.Resampling.BILINEAR), np.float32)
    return np.abs(np.fft.fft2(arr, axes=(0, 1))).astype(np.float32)


def mean_amplitude(images: Iterable[Image.Image], side: int) -> np.ndarray:
    """A site's style: the mean amplitude of its cells (what it shares)."""
    total, n = np.zeros((side, side, 3), np.float64), 0
    for image in images:
        total += amplitude(image, side)
        n += 1
    if n == 0:
        raise ValueError("no images to take a style from")
    return (total / n).astype(np.float32)


def mix_amplitude(image: Image.Image, style: np.ndarray, lam: float) -> Image.Image:
    """The cell with its amplitude moved a fraction `lam` towards `style`; its phase (shapes) kept."""
    arr = np.asarray(image, np.float32)
    if arr.shape != style.shape:
        raise ValueError(f"style of shape {style.shape} for an image of shape {arr.shape}")
    spectrum = np.fft.fft2(arr, axes=(0, 1))
    amp = (1.0 - lam) * np.abs(spectrum) + lam * style
    out = np.real(np.fft.ifft2(amp * np.exp(1j * np.angle(spectrum)), axes=(0, 1)))
    return Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8))


class OwnAmplitudes(Sequence[np.ndarray]):
    """The amplitude spectra of a site's own training cells, computed when drawn (none kept, none shared).

    What a deployment mixes in (`AugmentConfig.style_p`): a cell takes part of the texture and sharpness of
    another cell of its own site, whatever that cell's class, so that within a site texture no longer names
    a class (FACT's within-domain amplitude mix, Xu et al., CVPR 2021). docs/results.md, "Texture as a
    nuisance": the benchmark's criterion and internal test prefer it to texture alone, two deployed runs did
    not (lower at Barcelona), so it is an option (`augment = "texture-amplitude"`), not the default.
    """

    def __init__(self, prepared: Callable[[int], Image.Image], count: int, side: int):
        self.prepared, self.count, self.side = prepared, count, side

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if not -self.count <= index < self.count:
            raise IndexError(index)
        return amplitude(self.prepared(index % self.count), self.side)
