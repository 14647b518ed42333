"""Training-time augmentation of prepared cells: the invariances a classifier needs to work at a new site.

Applied between `prepare` (cell located, centred, white-balanced) and `finish` (contract colour mode,
resize, normalise), so the service never runs any of it. Every draw comes from the `random.Random`
passed in, so an augmented view is reproducible from its seed (the benchmark caches them).

What varies between hospitals, and the augmentation that covers it:
  - framing: the locator's centre and diameter are estimates → zoom 0.8-1.25x, shift, any rotation, flip
  - stain amount and hue (MGG vs Giemsa-Wright vs rapid stains) → per-channel optical-density gain and a
    small mixing of the density channels (Beer-Lambert: background stays white, darker parts change most)
  - camera: exposure, gamma, saturation, residual colour cast → light jitter after the stain step
  - optics and resolution (120 px crops vs 360 px fields) → blur, down-and-up sampling, sharpening, noise
  - texture as a class cue (one site's sharp basophils) → a cell's Fourier amplitude mixed with another
    cell's of the same site, any class, phase (shape) kept (`style_p`, `federation.style.OwnAmplitudes`)
NumPy + Pillow only.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from federation.style import mix_amplitude


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of each augmentation; `none()` switches everything off, `light()` is the old recipe's size."""

    zoom: tuple[float, float] = (0.8, 1.25)  # >1 zooms in (cell larger)
    shift: float = 0.08  # fraction of the side
    rotate: bool = True  # any angle (flips always)
    stain_gain: tuple[float, float] = (0.7, 1.35)  # per-channel optical-density multiplier
    stain_mix: float = 0.12  # off-diagonal optical-density mixing
    brightness: float = 0.15
    contrast: float = 0.2
    saturation: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.8, 1.25)
    cast: float = 0.05  # per-channel multiplicative tint
    gray_p: float = 0.1
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.4)
    lowres_p: float = 0.25
    lowres_scale: tuple[float, float] = (0.35, 0.8)
    noise_p: float = 0.2
    noise_sigma: tuple[float, float] = (1.0, 6.0)
    hue: float = 0.0  # max hue rotation, fraction of the colour circle (0 = off)
    sharpen_p: float = 0.0  # unsharp mask: fine texture added to soft cells (sharp scanners), 0 = off
    style_p: float = 0.0  # amplitude mix with another site's style (federation.style), 0 = off
    style_lambda: float = 1.0  # the mix fraction is drawn from U(0, style_lambda)
    # The prepared cell left as it is this often (the served rendering): the benchmark's cached views hold
    # the clean cell beside 8 augmented ones and draw it 1 time in 9; a deployment's site sets this to match.
    clean_p: float = 0.0

    @classmethod
    def none(cls) -> AugmentConfig:
        return cls(
            zoom=(1.0, 1.0), shift=0.0, rotate=False, stain_gain=(1.0, 1.0), stain_mix=0.0, brightness=0.0,
            contrast=0.0, saturation=(1.0, 1.0), gamma=(1.0, 1.0), cast=0.0, gray_p=0.0, blur_p=0.0,
            lowres_p=0.0, noise_p=0.0,
        )  # fmt: skip

    @classmethod
    def strong_colour(cls) -> AugmentConfig:
        """Colour cues that identify a site more than a cell type: hue rotation, more gray, wider stain."""
        return cls(stain_gain=(0.5, 1.6), stain_mix=0.25, saturation=(0.4, 1.6), gray_p=0.3, hue=0.08)

    @classmethod
    def texture(cls) -> AugmentConfig:
        """Optical resolution as a nuisance: soften most views, sharpen some, so texture cannot name a class."""
        return cls(blur_p=0.5, lowres_p=0.5, sharpen_p=0.3)

    @classmethod
    def texture_and_style(cls) -> AugmentConfig:
        """Texture, plus half the views taking another amplitude spectrum from the styles given: the sites'
        mean spectra (benchmark) or, in a deployment, the site's own other cells (`federation.style`)."""
        return replace(cls.texture(), style_p=0.5)

    @classmethod
    def geometry_only(cls) -> AugmentConfig:
        none = cls.none()
        base = cls()
        return AugmentConfig(**{**none.__dict__, "zoom": base.zoom, "shift": base.shift, "rotate": True})


def _border_colour(arr: np.ndarray) -> tuple[int, int, int]:
    border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
    r, g, b = np.median(border, axis=0)
    return int(r), int(g), int(b)


def geometric(image: Image.Image, rng: random.Random, cfg: AugmentConfig, out_side: int) -> Image.Image:
    """Zoom, shift, rotate and flip in one affine resample to `out_side` (fill: the slide background)."""
    if image.width > 1.5 * out_side:  # an affine resample does not antialias: shrink first
        side = round(1.5 * out_side)
        image = image.resize((side, round(side * image.height / image.width)), Image.Resampling.BILINEAR)
    w, h = image.size
    zoom = math.exp(rng.uniform(math.log(cfg.zoom[0]), math.log(cfg.zoom[1])))
    angle = rng.uniform(0.0, 2 * math.pi) if cfg.rotate else 0.0
    dx, dy = (rng.uniform(-cfg.shift, cfg.shift) * w, rng.uniform(-cfg.shift, cfg.shift) * h)
    flip = rng.random() < 0.5
    # Output pixel (u, v) → input (x, y): centre, scale by side/(out·zoom), rotate, shift back.
    s = (w / out_side) / zoom
    cos, sin = math.cos(angle) * s, math.sin(angle) * s
    fx = -1.0 if flip else 1.0
    c_out = out_side / 2.0
    a, b = cos * fx, -sin
    d, e = sin * fx, cos
    cx, cy = w / 2.0 + dx, h / 2.0 + dy
    coeffs = (a, b, cx - a * c_out - b * c_out, d, e, cy - d * c_out - e * c_out)
    fill = _border_colour(np.asarray(image))
    return image.transform(
        (out_side, out_side), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=fill
    )


def stain(arr: np.ndarray, rng: random.Random, cfg: AugmentConfig) -> np.ndarray:
    """Optical-density jitter: per-channel gain plus a little mixing; white stays white."""
    if cfg.stain_gain == (1.0, 1.0) and cfg.stain_mix == 0.0:
        return arr
    od = -np.log((arr.astype(np.float32) + 1.0) / 256.0)
    mix = np.eye(3, dtype=np.float32)
    for i in range(3):
        mix[i, i] = rng.uniform(*cfg.stain_gain)
        for j in range(3):
            if i != j:
                mix[i, j] = rng.uniform(-cfg.stain_mix, cfg.stain_mix)
    od = np.maximum(od @ mix.T, 0.0)
    return np.clip(np.exp(-od) * 256.0 - 1.0, 0, 255).astype(np.uint8)


def camera(arr: np.ndarray, rng: random.Random, cfg: AugmentConfig) -> np.ndarray:
    """Exposure, contrast, gamma and a colour cast."""
    x = arr.astype(np.float32) / 255.0
    x = x ** rng.uniform(*cfg.gamma)
    mean = x.mean()
    x = (x - mean) * (1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + mean
    x = x * (1.0 + rng.uniform(-cfg.brightness, cfg.brightness))
    x = x * np.array([1.0 + rng.uniform(-cfg.cast, cfg.cast) for _ in range(3)], np.float32)
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


def optics(image: Image.Image, rng: random.Random, cfg: AugmentConfig) -> Image.Image:
    """Blur, a lower-resolution camera, sensor noise."""
    if rng.random() < cfg.lowres_p:
        side = image.width
        low = max(8, round(side * rng.uniform(*cfg.lowres_scale)))
        image = image.resize((low, low), Image.Resampling.BILINEAR).resize(
            (side, side), Image.Resampling.BILINEAR
        )
    if rng.random() < cfg.blur_p:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(*cfg.blur_sigma)))
    if cfg.sharpen_p and rng.random() < cfg.sharpen_p:
        radius, percent = rng.uniform(1.0, 2.5), rng.randint(80, 200)
        image = image.filter(ImageFilter.UnsharpMask(radius=radius, percent=percent, threshold=2))
    if rng.random() < cfg.noise_p:
        arr = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.getrandbits(32)).normal(
            0.0, rng.uniform(*cfg.noise_sigma), arr.shape
        )
        image = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    return image


def _rotate_hue(image: Image.Image, shift: float) -> Image.Image:
    h, s, v = image.convert("HSV").split()
    h = h.point(lambda x: (x + round(shift * 256)) % 256)
    return Image.merge("HSV", (h, s, v)).convert("RGB")


class CellAugment:
    """prepared cell (PIL RGB) → augmented PIL RGB of side `out_side`; `rng` makes it reproducible."""

    def __init__(
        self, out_side: int, config: AugmentConfig | None = None, styles: Sequence[np.ndarray] = ()
    ):
        self.out_side = out_side
        self.config = config or AugmentConfig()
        # amplitude spectra (out_side, out_side, 3) to mix in, see style_p: the sites' means (benchmark) or
        # a lazy sequence over the site's own cells (federation.style.OwnAmplitudes)
        self.styles = styles

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> Image.Image:
        rng = rng or random.Random(random.getrandbits(64))
        cfg = self.config
        if cfg.clean_p and rng.random() < cfg.clean_p:
            return image  # the contract's own resize follows (task.CellDataset), as when serving
        image = geometric(image, rng, cfg, self.out_side)
        if cfg.style_p and self.styles and rng.random() < cfg.style_p:
            style = self.styles[rng.randrange(len(self.styles))]
            image = mix_amplitude(image, style, rng.uniform(0.0, cfg.style_lambda))
        arr = camera(stain(np.asarray(image), rng, cfg), rng, cfg)
        image = Image.fromarray(arr)
        if cfg.saturation != (1.0, 1.0):
            image = ImageEnhance.Color(image).enhance(rng.uniform(*cfg.saturation))
        if cfg.hue:
            image = _rotate_hue(image, rng.uniform(-cfg.hue, cfg.hue))
        if rng.random() < cfg.gray_p:
            image = image.convert("L").convert("RGB")
        return optics(image, rng, cfg)


def named_augmentation(name: str) -> AugmentConfig:
    """The recipes a run config can name (`augment = "..."`); docs/results.md compares them."""
    presets = {
        "default": AugmentConfig,
        "texture": AugmentConfig.texture,
        "texture-amplitude": AugmentConfig.texture_and_style,  # + amplitude mixed among the site's own cells
        "strong-colour": AugmentConfig.strong_colour,
        "geometry": AugmentConfig.geometry_only,
        "none": AugmentConfig.none,
    }
    if name not in presets:
        raise ValueError(f"augmentation {name!r} is not one of {', '.join(presets)}")
    return presets[name]()
