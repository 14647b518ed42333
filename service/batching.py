"""Dynamic batching: images from concurrent requests are queued and run through ONNX Runtime together.

One runner thread owns inference. It sleeps until an image is queued, then takes everything waiting
(up to `max_batch_size`), optionally waiting `max_queue_delay` for a fuller batch, and runs it. While a
batch runs, the next requests are decoded and preprocessed on other threads and pile up in the queue,
so under load batches form by themselves and decoding, HTTP and inference overlap. When nothing is
queued and no batch runs (low load), the preprocessing worker runs its image itself (`run_inline`),
saving the hand-over to the runner thread and back.

Each queued image carries the `LoadedModel` its request started with. A batch that spans a model swap
is split by model, so requests in flight finish on the session they began with.

The runner answers through `loop.call_soon_threadsafe`, so the event loop never blocks on inference;
a request whose client went away (cancelled future) is skipped, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from service.inference import LoadedModel
    from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """More images are waiting than WBC_MAX_QUEUE_IMAGES: the caller should answer 503 and retry later."""


class BatcherClosedError(RuntimeError):
    """The service is shutting down."""


@dataclass(slots=True)
class _Item:
    model: LoadedModel
    array: np.ndarray
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float


def _resolve(answers: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    for future, value, error in answers:
        if future.done():  # the request was cancelled (client gone): nothing to answer
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)


def _answer(items: list[_Item], values: Any, error: BaseException | None = None) -> None:
    """One wake-up per event loop for the whole batch (not one per image)."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for i, item in enumerate(items):
        by_loop.setdefault(item.loop, []).append((item.future, None if values is None else values[i], error))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, answers)
        except RuntimeError:  # that loop has closed (its app shut down): nobody is waiting
            pass


_STOP = object()  # queued by close(): the runner finishes what is ahead of it, then stops


class DynamicBatcher:
    """Queue of preprocessed images → batched `probabilities` on one runner thread.

    The queue is a `queue.SimpleQueue` (implemented in C): putting an image and waking the runner
    costs no Python-level lock, which matters when the GIL is shared with HTTP and preprocessing.
    """

    def __init__(
        self,
        max_batch_size: int = 32,
        max_queue_delay: float = 0.0,
        max_queue_images: int = 512,
        metrics: ServiceMetrics | None = None,
    ):
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_images = max_queue_images
        self.metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._inference = threading.Lock()  # one ONNX Runtime run at a time: the runner's or an inline one
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="wbc-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    async def probabilities(self, model: LoadedModel, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One probability row per preprocessed (3, S, S) array, computed with `model`'s session."""
        if not arrays:
            return []
        if self._closed:
            raise BatcherClosedError("the service is shutting down")
        waiting = self._queue.qsize()
        if waiting + len(arrays) > self.max_queue_images:
            raise QueueFullError(
                f"{waiting} images are waiting for inference (limit {self.max_queue_images}, "
                "WBC_MAX_QUEUE_IMAGES); retry shortly"
            )
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(model, a, loop.create_future(), loop, now) for a in arrays]
        for item in items:
            self._queue.put(item)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        try:
            if len(items) == 1:
                return [await items[0].future]
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise

    def run_inline(self, model: LoadedModel, array: np.ndarray) -> np.ndarray | None:
        """On a preprocessing worker: when nothing is queued and no batch is running, infer this one image
        right here and return its probabilities (saves handing it to the runner thread and back: the
        common case at low load). Otherwise None: queue it with `probabilities` as usual. Never with a
        queue delay set: then the caller asked for fuller batches (a GPU) rather than the lowest latency."""
        if self.max_queue_delay > 0 or self._closed or not self._queue.empty():
            return None
        if not self._inference.acquire(blocking=False):
            return None
        try:
            start = time.perf_counter()
            try:
                row = model.classifier.probabilities(array[None])[0]
            except Exception:  # the queued path runs it again and answers the error
                return None
            if self.metrics is not None:
                self.metrics.queue_seconds.observe(0.0)
                self.metrics.inference_seconds.observe(time.perf_counter() - start)
                self.metrics.batch_size.observe(1)
            return row
        finally:
            self._inference.release()

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the runner."""
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)

    # ---- runner thread ------------------------------------------------------------------------------
    def _take_batch(self) -> tuple[list[_Item], bool]:
        """Block for the first image, then take what is waiting (up to the batch size); (batch, stop)."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, stop = [first], False
        deadline = first.enqueued + self.max_queue_delay
        while len(batch) < self.max_batch_size:
            try:
                if self.max_queue_delay > 0:
                    left = deadline - time.perf_counter()
                    item = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                stop = True
                break
            batch.append(item)
        if self.metrics is not None:
            self.metrics.queue_depth.set(self._queue.qsize())
        return batch, stop

    def _run(self) -> None:
        while True:
            batch, stop = self._take_batch()
            started = time.perf_counter()
            live = [item for item in batch if not item.future.cancelled()]
            if self.metrics is not None:
                for item in live:
                    self.metrics.queue_seconds.observe(started - item.enqueued)
            # Group by model: a batch formed across a swap runs each part on its own session.
            groups: dict[int, list[_Item]] = {}
            for item in live:
                groups.setdefault(id(item.model), []).append(item)
            with self._inference:
                for items in groups.values():
                    self._run_group(items)
            if stop:
                return

    def _run_group(self, items: list[_Item]) -> None:
        model = items[0].model
        start = time.perf_counter()
        try:
            probs = model.classifier.probabilities(np.stack([item.array for item in items]))
        except Exception as exc:  # an ORT runtime failure answers these requests, it never kills the runner
            log.exception(
                "inference failed for a batch of %d on %s v%d", len(items), model.name, model.version
            )
            _answer(items, None, RuntimeError(f"inference failed: {type(exc).__name__}: {exc}"))
            return
        if self.metrics is not None:
            self.metrics.inference_seconds.observe(time.perf_counter() - start)
            self.metrics.batch_size.observe(len(items))
        _answer(items, probs)
