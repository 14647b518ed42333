"""Frozen-trunk outputs for clean and augmented views of every image, cached on disk.

View 0 of an image is the contract's exact preprocessing (`finish(prepare(image))`, what the service
computes); views 1..K are augmented (`federation.augment.CellAugment`, seeded per image and view, so a
cache rebuild gives the same bytes). Only the frozen trunk runs here; the trainable top sees these
tensors as its input, so training on them is exactly training the top of the full model on those views
(the trunk is in eval mode, its BatchNorm statistics fixed). Stored as float16 under a cache folder
(`var/benchmark/features/`, a site cache's `features/`), keyed by everything that changes the bytes.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from federation.augment import AugmentConfig, CellAugment
from federation.disk_cache import mark_used, save_array
from federation.prepared import PreparedImages, preparation_key
from federation.sites import Sample
from federation.trunk import Split
from models.contract import ModelContract
from models.preprocess import finish

FEATURES_VERSION = "1"


def view_seed(seed: int, index: int, view: int) -> int:
    return (seed * 1_000_003 + index * 9_176 + view * 7_919 + 17) % (2**63)


def render_view(
    prepared: PreparedImages,
    i: int,
    view: int,
    contract: ModelContract,
    augment: CellAugment | None,
    seed: int,
) -> np.ndarray:
    """The network input of one view: view 0 = exact contract preprocessing, else seeded augmentation."""
    image = prepared.image(i)
    if view > 0 and augment is not None:
        image = augment(image, random.Random(view_seed(seed, i, view)))
    return finish(image, contract)


# Fields added to AugmentConfig after caches existed: left out of the key at their "off" value, so the
# views cached before them (identical bytes) stay valid.
_LATER_FIELDS = {"hue": 0.0, "sharpen_p": 0.0, "style_p": 0.0, "style_lambda": 1.0, "clean_p": 0.0}


def _augment_key(augment: AugmentConfig | None) -> dict | None:
    if augment is None:
        return None
    return {k: v for k, v in asdict(augment).items() if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}


def cache_key(
    contract: ModelContract,
    architecture_top: str,
    samples: Sequence[Sample],
    views: int,
    augment: AugmentConfig | None,
    seed: int,
    variant: str = "",
) -> str:
    payload = {
        "variant": variant,
        "prepare": preparation_key(contract),
        "architecture": contract.architecture,
        "input_size": contract.input_size,
        "color": contract.color,
        "mean": contract.mean,
        "std": contract.std,
        "interpolation": contract.interpolation,
        "resize": contract.resize,
        "top": architecture_top,
        "views": views,
        "augment": _augment_key(augment),
        "seed": seed,
        "version": FEATURES_VERSION,
    }
    if contract.detail is not None:  # added later: absent when off, so older caches keep their keys
        payload["detail"] = contract.detail
    h = hashlib.sha1(json.dumps(payload, sort_keys=True, default=list).encode())
    h.update("\n".join(str(s.path) for s in samples).encode())
    return h.hexdigest()[:16]


def trunk_features(
    split: Split,
    samples: Sequence[Sample],
    prepared: PreparedImages,
    contract: ModelContract,
    *,
    views: int = 0,
    augment: AugmentConfig | None = None,
    seed: int = 0,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    log: Callable[[str], None] = print,
    variant: str = "",
    styles: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """Array (N, 1 + views, *trunk output shape), float16: view 0 clean, then `views` augmented views.

    `styles`: the amplitude spectra the augmentation may mix in (`AugmentConfig.style_p`): the sites' means,
    or the spectra of one site's own cells when the samples are that site's."""
    if len(prepared) != len(samples):
        raise ValueError(f"{len(prepared)} prepared images for {len(samples)} samples")
    if views == 0 and cache_dir is not None:
        return _clean_features(split, samples, prepared, contract, cache_dir, batch_size, log, variant)
    path = None
    if cache_dir is not None:
        if styles and views:  # the styles change the views' bytes
            digest = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in styles)).hexdigest()[:12]
            variant = f"{variant}+styles-{digest}"
        key = cache_key(contract, split.top_name, samples, views, augment if views else None, seed, variant)
        path = (
            cache_dir / f"{contract.architecture}-{split.top_name}-{contract.input_size}-v{views}-{key}.npy"
        )
        if path.is_file():
            mark_used(path)
            return np.load(path, mmap_mode="r")
    aug = CellAugment(contract.input_size, augment, styles) if views else None
    jobs = [(i, v) for i in range(len(samples)) for v in range(1 + views)]
    out: np.ndarray | None = None
    t0 = time.perf_counter()
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        x = torch.from_numpy(np.stack([render_view(prepared, i, v, contract, aug, seed) for i, v in chunk]))
        feats = split.trunk_features(x).numpy().astype(np.float16)
        if out is None:
            out = np.zeros((len(samples), 1 + views, *feats.shape[1:]), np.float16)
        for (i, v), f in zip(chunk, feats):
            out[i, v] = f
    assert out is not None, "no samples"
    log(
        f"{contract.architecture}/{split.top_name} {contract.input_size}px: {len(jobs)} views of "
        f"{len(samples)} images in {time.perf_counter() - t0:.0f} s"
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_array(path, out)
    return out


def _clean_features(
    split: Split,
    samples: Sequence[Sample],
    prepared: PreparedImages,
    contract: ModelContract,
    cache_dir: Path,
    batch_size: int,
    log: Callable[[str], None],
    variant: str,
) -> np.ndarray:
    """Clean views (no randomness) are cached per image, so any later sample list reuses them."""
    key = cache_key(contract, split.top_name, [], 0, None, 0, variant)
    store = cache_dir / f"clean-{contract.architecture}-{split.top_name}-{contract.input_size}-{key}"
    store.mkdir(parents=True, exist_ok=True)
    files = [store / (hashlib.sha1(str(s.path).encode()).hexdigest()[:20] + ".npy") for s in samples]
    todo = [i for i, f in enumerate(files) if not f.is_file()]
    t0 = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        x = torch.from_numpy(np.stack([render_view(prepared, i, 0, contract, None, 0) for i in chunk]))
        for i, f in zip(chunk, split.trunk_features(x).numpy().astype(np.float16)):
            save_array(files[i], f)
    if todo:
        log(
            f"{contract.architecture}/{split.top_name} {contract.input_size}px: {len(todo)} clean views "
            f"in {time.perf_counter() - t0:.0f} s ({len(samples) - len(todo)} cached)"
        )
    for i in set(range(len(files))) - set(todo):
        mark_used(files[i])
    return np.stack([np.load(f) for f in files])[:, None]
