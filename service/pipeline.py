"""The request path shared by /v1/classify and the KServe v2 infer endpoint.

    bytes ──(preprocess worker: decode + contract preprocessing)──► array ──(DynamicBatcher)──► probabilities

Each image is decoded and preprocessed on a worker thread (WBC_PREPROCESS_THREADS of them, so 32
clients never start 32 CPU-bound threads on 2 cores) and queued for inference the moment
it is ready, so a request's images and different requests' images overlap with the batch running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from models.cellcrop import CellMeasures
from models.contract import UNIDENTIFIED, ModelContract
from models.preprocess import preprocess_sized
from models.size_prior import apply_size_prior, relative_log_size
from service.batching import DynamicBatcher
from service.decoding import DecodeError, decode_upload
from service.inference import LoadedModel, Prediction
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageError:
    code: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """One image's answer: a prediction, or the reason it could not be classified."""

    prediction: Prediction | None = None
    error: ImageError | None = None
    format: str | None = None
    sop_instance_uid: str | None = None


@dataclass(frozen=True)
class _Prepared:
    array: np.ndarray
    format: str
    sop_instance_uid: str | None
    measures: CellMeasures = CellMeasures(float("nan"), float("nan"))  # the located cell's (NaN: no crop)


def prepare_image(data: bytes, contract: ModelContract, max_pixels: int) -> _Prepared:
    """Decode + the contract's preprocessing (a worker thread: Pillow and NumPy release the GIL)."""
    decoded = decode_upload(data, max_pixels=max_pixels)
    try:
        array, measures = preprocess_sized(decoded.image, contract)
    except Exception as exc:  # a mode or geometry the contract's preprocessing cannot handle
        image = decoded.image
        raise DecodeError(
            "unprocessable", f"{decoded.format} {image.mode} {image.size}: preprocessing failed: {exc}"
        ) from None
    return _Prepared(array, decoded.format, decoded.sop_instance_uid, measures)


class Pipeline:
    """Preprocessing workers (a dedicated thread pool: its queue is C-level `SimpleQueue`, and the app's
    own thread pool stays free for file reads and the prediction sink) in front of the batcher."""

    def __init__(
        self,
        batcher: DynamicBatcher,
        preprocess_workers: int,
        metrics: ServiceMetrics,
        max_pixels: int,
        site_cell_diameter: float | None = None,
        site_granule_reference: float | None = None,
    ):
        self.batcher = batcher
        self.site_cell_diameter = site_cell_diameter
        self.site_granule_reference = site_granule_reference
        self._warned_no_reference: set[str] = set()
        self.executor = ThreadPoolExecutor(
            max_workers=preprocess_workers, thread_name_prefix="wbc-preprocess"
        )
        self.metrics = metrics
        self.max_pixels = max_pixels

    def close(self) -> None:
        """Stop the preprocessing workers, then the batcher (each finishes what it holds)."""
        self.executor.shutdown(wait=True)
        self.batcher.close()

    async def classify_bytes(
        self, model: LoadedModel, uploads: Sequence[bytes | ImageError]
    ) -> list[Outcome]:
        """Encoded images (or an error already found while reading) → one Outcome each, in order.

        QueueFullError and BatcherClosedError propagate: the route answers 503 for the whole request."""
        if len(uploads) == 1:
            return [await self._one(model, uploads[0])]
        return list(await asyncio.gather(*(self._one(model, item) for item in uploads)))

    async def _one(self, model: LoadedModel, item: bytes | ImageError) -> Outcome:
        if isinstance(item, ImageError):
            self.metrics.image_errors.labels(item.code).inc()
            return Outcome(error=item)
        loop = asyncio.get_running_loop()
        try:
            prepared, seconds, row = await loop.run_in_executor(self.executor, self._prepare, item, model)
        except DecodeError as exc:
            self.metrics.image_errors.labels(exc.code).inc()
            return Outcome(error=ImageError(exc.code, exc.message))
        self.metrics.preprocess_seconds.observe(seconds)
        if row is None:
            [row] = await self.batcher.probabilities(model, [prepared.array])
        prediction = self.predict(model, self.with_opinions(model, row, prepared.measures))
        return Outcome(prediction, format=prepared.format, sop_instance_uid=prepared.sop_instance_uid)

    def _prepare(self, data: bytes, model: LoadedModel) -> tuple[_Prepared, float, np.ndarray | None]:
        """Worker thread: decode + preprocess, then infer here too if the batcher is idle."""
        start = time.perf_counter()
        prepared = prepare_image(data, model.contract, self.max_pixels)
        seconds = time.perf_counter() - start
        return prepared, seconds, self.batcher.run_inline(model, prepared.array)

    async def classify_arrays(self, model: LoadedModel, batch: np.ndarray) -> list[Prediction]:
        """Already preprocessed (N, 3, S, S) float32 tensors (KServe v2 FP32 input) → predictions."""
        rows = await self.batcher.probabilities(model, list(batch))
        return [self.predict(model, row) for row in rows]

    def with_opinions(self, model: LoadedModel, row: np.ndarray, measures: CellMeasures) -> np.ndarray:
        """The network's probabilities combined with the cell's relative size and granule density, each
        when the model carries its prior and this site's reference is configured (only images are
        measured: tensors sent to the KServe v2 endpoint get the network's answer)."""
        contract = model.contract
        if self._usable(model, contract.size_prior, self.site_cell_diameter, "a size", "WBC_SITE_CELL_DIAMETER"):
            r = relative_log_size([measures.diameter], self.site_cell_diameter)
            row = apply_size_prior(row[None], r, contract.size_prior)[0]
        if self._usable(model, contract.granule_prior, self.site_granule_reference, "a granule",
                        "WBC_SITE_GRANULE_REFERENCE"):
            g = np.array([measures.granules - self.site_granule_reference])
            row = apply_size_prior(row[None], g, contract.granule_prior)[0]
        return row

    def _usable(self, model: LoadedModel, prior, reference: float | None, what: str, variable: str) -> bool:
        if prior is None or prior.weight == 0:
            return False
        if reference is None:
            if variable not in self._warned_no_reference:  # once per process: the answer goes on without it
                self._warned_no_reference.add(variable)
                log.warning("%s v%s carries %s prior but %s is not set: answering without that opinion "
                            "(wbc data site-scale measures it)", model.name, model.version, what, variable)
            return False
        return True

    def predict(self, model: LoadedModel, row: np.ndarray) -> Prediction:
        [prediction] = model.classifier.predictions_from(row[None])
        self.metrics.record_prediction(
            model.name,
            model.version,
            prediction.label,
            prediction.confidence,
            prediction.label == UNIDENTIFIED,
        )
        return prediction
