"""The contract's deterministic `prepare` step (RGB → cell crop → colour normalisation), cached on disk.

Locating the cell costs ~15-25 ms per image here; every benchmark row, every augmented view and every
round of a SuperNode with a site cache starts from the same prepared image, so it is computed once per
(data set, contract preprocessing) and kept under a cache folder (`var/benchmark/prepared/<key>/`, a
site cache's `prepared/<key>/`), one file per image, with the locator's measures beside them; in memory
they are one flat uint8 buffer plus shapes. Images keep their prepared size (no extra resize), so
`finish(prepared)` is exactly what the service computes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from federation.disk_cache import mark_used, save_array, save_text
from federation.sites import Sample
from models.contract import ModelContract
from models.preprocess import prepare_sized

# Bump when models/cellcrop.py or models/preprocess.py change what `prepare` returns.
PREPARE_VERSION = "1"


def preparation_key(contract: ModelContract) -> dict[str, object]:
    """The contract fields `prepare` depends on (nothing else: size, colour mode and mean/std come later)."""
    return {
        "cell_crop": contract.cell_crop.model_dump() if contract.cell_crop else None,
        "color_norm": contract.color_norm,
        "version": PREPARE_VERSION,
    }


def _key_digest(contract: ModelContract) -> str:
    return hashlib.sha1(json.dumps(preparation_key(contract), sort_keys=True).encode()).hexdigest()[:16]


class PreparedImages:
    """Prepared images of a fixed sample list, in sample order; `image(i)` is a fresh PIL image."""

    def __init__(self, buffer: np.ndarray, shapes: np.ndarray, diameters: np.ndarray | None = None,
                 granules: np.ndarray | None = None):
        self.buffer = buffer
        self.shapes = shapes
        self.offsets = np.concatenate([[0], np.cumsum(shapes.prod(axis=1))])[:-1]
        # the locator's measures (NaN: none found), when built with them: cell diameters, granule densities
        self.diameters = diameters
        self.granules = granules

    def __len__(self) -> int:
        return len(self.shapes)

    def subset(self, indices: Sequence[int]) -> PreparedImages:
        """The same images, a selection of them, without copying pixels."""
        view = PreparedImages.__new__(PreparedImages)
        picked = np.asarray(indices, dtype=np.int64)
        view.buffer, view.shapes, view.offsets = self.buffer, self.shapes[picked], self.offsets[picked]
        view.diameters = None if self.diameters is None else self.diameters[picked]
        view.granules = None if self.granules is None else self.granules[picked]
        return view

    def array(self, i: int) -> np.ndarray:
        h, w, c = (int(v) for v in self.shapes[i])
        start = int(self.offsets[i])
        return np.asarray(self.buffer[start : start + h * w * c]).reshape(h, w, c)

    def image(self, i: int) -> Image.Image:
        return Image.fromarray(self.array(i), "RGB")

    @classmethod
    def build(
        cls,
        samples: Sequence[Sample],
        contract: ModelContract,
        cache_dir: Path | None,
        log: Callable[[str], None] = print,
        *,
        diameters: bool = False,
        with_stat: bool = False,
    ) -> PreparedImages:
        """Prepared images of `samples`; each image is cached once per preparation key (any later sample
        list that holds it reuses it). `diameters`: also the locator's measures, cell diameters and granule
        densities (kept beside the images in `diameters.json` and `granules.json`); `with_stat`: a file is known by its path, size and mtime (a site's
        own folder, where an image may be replaced), not by its path alone (the fixed public data)."""
        store = cache_dir / _key_digest(contract) if cache_dir is not None else None
        if store is not None:
            store.mkdir(parents=True, exist_ok=True)
        known: dict[str, float | None] = {}
        known_granules: dict[str, float | None] = {}
        sizes = store / "diameters.json" if store is not None and diameters else None
        granule_file = store / "granules.json" if store is not None and diameters else None
        if sizes is not None and sizes.is_file():
            known = json.loads(sizes.read_text())
            mark_used(sizes)
        if granule_file is not None and granule_file.is_file():
            known_granules = json.loads(granule_file.read_text())
            mark_used(granule_file)
        t0 = time.perf_counter()
        arrays, located, granules, computed = [], [], [], 0
        for s in samples:
            name = _image_name(s, with_stat)
            path = store / (name + ".npy") if store else None
            if path is not None and path.is_file() and (not diameters or (name in known and name in known_granules)):
                mark_used(path)
                arrays.append(np.load(path))
                located.append(known.get(name))
                granules.append(known_granules.get(name))
                continue
            with Image.open(s.path) as img:
                img.load()
                prepared, measures = prepare_sized(img, contract)
                arr = np.asarray(prepared, dtype=np.uint8)
            computed += 1
            if path is not None:
                save_array(path, arr)
            known[name] = measures.diameter if np.isfinite(measures.diameter) else None
            known_granules[name] = measures.granules if np.isfinite(measures.granules) else None
            arrays.append(arr)
            located.append(known[name])
            granules.append(known_granules[name])
        for file, values in ((sizes, known), (granule_file, known_granules)):
            if file is not None and computed:
                save_text(file, json.dumps(values))
        shapes = np.array([a.shape for a in arrays], dtype=np.int64).reshape(-1, 3)
        buffer = np.concatenate([a.ravel() for a in arrays]) if arrays else np.zeros(0, np.uint8)
        if computed:
            log(f"prepared {computed} of {len(samples)} images in {time.perf_counter() - t0:.0f} s")
        if not diameters:
            return cls(buffer, shapes)
        return cls(buffer, shapes, _floats(located), _floats(granules))


def _floats(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _image_name(sample: Sample, with_stat: bool) -> str:
    text = str(sample.path)
    if with_stat:
        st = Path(sample.path).stat()
        text += f"|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(text.encode()).hexdigest()[:20]


def cached_source(cache_dir: Path) -> Callable[[Sample, ModelContract], Image.Image]:
    """A `federation.task.set_prepared_source` callable over this cache (prepares and stores on a miss)."""

    def source(sample: Sample, contract: ModelContract) -> Image.Image:
        return PreparedImages.build([sample], contract, cache_dir, log=lambda _s: None).image(0)

    return source
