"""Registry watch: poll what the slot's reference resolves to and swap when it changes.

Promotion by any route (the `wbc registry` commands, the federation, another replica's admin call)
moves `aliases.json` or adds a version; every WBC_WATCH_SECONDS each replica re-resolves its reference
and, when the answer differs from what it serves, loads, warms and switches (`ModelSlot.refresh`).
A version that cannot be loaded is logged once (not every poll) and the served model stays.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.concurrency import run_in_threadpool

from service.inference import ModelLoadError, ModelSlot
from service.metrics import ServiceMetrics

log = logging.getLogger(__name__)


async def watch_registry(slot: ModelSlot, metrics: ServiceMetrics, interval: float) -> None:
    """Runs until cancelled (the app's lifespan cancels it at shutdown)."""
    last_error: str | None = None
    while True:
        await asyncio.sleep(interval)
        if slot.current is None:  # the ready probe's retry covers an empty slot
            await run_in_threadpool(slot.ensure_loaded)
            continue
        try:
            result = await run_in_threadpool(slot.refresh, "registry watch")
        except ModelLoadError as exc:
            if str(exc) != last_error:
                log.error("registry watch: keeping v%s: %s", slot.current.version, exc)
                metrics.swaps.labels("watch", "failed").inc()
            last_error = str(exc)
            continue
        except Exception:  # a half-written file on a network share, …: try again next time
            log.exception("registry watch: unexpected error")
            continue
        last_error = None
        if result.changed:
            metrics.swaps.labels("watch", "swapped").inc()
