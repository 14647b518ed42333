"""Dynamic batching: images from concurrent requests are queued and run through ONNX Runtime together.

One runner thread owns inference. It sleeps until an image is queued, then takes everything waiting
(up to `max_batch_size`), optionally waiting `max_queue_delay` for a fuller batch, and runs it. While a
batch runs, the next requests are decoded and preprocessed on other threads and pile up in the queue,
so under load batches form by themselves and decoding, HTTP and inference overlap; with one client the
runner is idle when an image arrives and runs it at once (no added latency).

Each queued image carries the `LoadedModel` its request started with. A batch that spans a model swap
is split by model, so requests in flight finish on the session they began with.

The runner answers through `loop.call_soon_threadsafe`, so the event loop never blocks on inference;
a request whose client went away (cancelled future) is skipped, not an error.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
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


class DynamicBatcher:
    """Queue of preprocessed images → batched `probabilities` on one runner thread."""

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
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="wbc-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def probabilities(self, model: LoadedModel, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One probability row per preprocessed (3, S, S) array, computed with `model`'s session."""
        if not arrays:
            return []
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        items = [_Item(model, a, loop.create_future(), loop, now) for a in arrays]
        with self._cond:
            if self._closed:
                raise BatcherClosedError("the service is shutting down")
            if len(self._queue) + len(items) > self.max_queue_images:
                raise QueueFullError(
                    f"{len(self._queue)} images are waiting for inference (limit {self.max_queue_images}, "
                    "WBC_MAX_QUEUE_IMAGES); retry shortly"
                )
            self._queue.extend(items)
            self._set_depth()
            self._cond.notify()
        try:
            return list(await asyncio.gather(*(item.future for item in items)))
        except asyncio.CancelledError:
            for item in items:
                item.future.cancel()
            raise

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the runner."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- runner thread ------------------------------------------------------------------------------
    def _set_depth(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.set(len(self._queue))

    def _take_batch(self) -> list[_Item] | None:
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            if self.max_queue_delay > 0 and len(self._queue) < self.max_batch_size:
                deadline = self._queue[0].enqueued + self.max_queue_delay
                while len(self._queue) < self.max_batch_size and not self._closed:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            n = min(self.max_batch_size, len(self._queue))
            batch = [self._queue.popleft() for _ in range(n)]
            self._set_depth()
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            started = time.perf_counter()
            live = [item for item in batch if not item.future.cancelled()]
            if self.metrics is not None:
                for item in live:
                    self.metrics.queue_seconds.observe(started - item.enqueued)
            # Group by model: a batch formed across a swap runs each part on its own session.
            groups: dict[int, list[_Item]] = {}
            for item in live:
                groups.setdefault(id(item.model), []).append(item)
            for items in groups.values():
                self._run_group(items)

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
