"""Where every classified cell goes after it is answered: the hook persistence plugs into.

Set `app.state.prediction_sink` to a callable taking a list of `ClassifiedCell` (one per classified
image of one request). The routes call it on a worker thread (never on the event loop) after
classification and before answering; it may return one id per cell (e.g. the stored row's id), which
the answer then carries as `id`. If it raises, the request is answered 503 and nothing is reported as
classified: a cell the laboratory sees a result for has always been recorded. None (the default) means
no persistence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, Sequence


@dataclass(frozen=True)
class ClassifiedCell:
    filename: str
    data: bytes | None  # the uploaded file as received (None for KServe v2 FP32 tensors)
    format: str  # JPEG | PNG | BMP | TIFF | DICOM | tensor
    sop_instance_uid: str | None  # DICOM only
    label: str  # a class name or "unidentified"
    confidence: float
    probabilities: dict[str, float]
    model_name: str
    model_version: int
    model_precision: str
    requested_by: str | None  # the requesting system (service.deps.get_requester)
    route: str  # the API that was called, e.g. "/v1/classify"
    received_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    specimen: str | None = None  # the lab system's specimen (accession) id, if it gave one
    slide: str | None = None  # the lab system's slide id, if it gave one


class PredictionSink(Protocol):
    def __call__(self, cells: Sequence[ClassifiedCell]) -> Sequence[str | int | None] | None: ...


class SinkError(RuntimeError):
    """The sink refused or failed; the request is answered 503."""


async def deliver(sink: PredictionSink | None, cells: Sequence[ClassifiedCell]) -> list[str | int | None]:
    """Hand the cells to the sink on a worker thread; one id (or None) per cell. Raises SinkError."""
    from fastapi.concurrency import run_in_threadpool

    if sink is None or not cells:
        return [None] * len(cells)
    try:
        ids = await run_in_threadpool(sink, list(cells))
    except Exception as exc:
        raise SinkError(
            f"the predictions could not be recorded ({type(exc).__name__}); nothing was "
            "answered, send the images again"
        ) from exc
    if ids is None:
        return [None] * len(cells)
    ids = list(ids)
    if len(ids) != len(cells):
        raise SinkError(f"the prediction sink returned {len(ids)} ids for {len(cells)} cells")
    return ids
