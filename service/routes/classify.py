"""POST /v1/classify: images in, one prediction (or one error) per file out.

Status codes (also in the OpenAPI `responses`):
  200  every file classified
  207  some files classified, some refused: each refused file has an `error` {code, message} in
       `results`, in request order, beside the predictions of the good files
  413  more files than WBC_MAX_FILES, or a body over WBC_MAX_REQUEST_BYTES
  422  no file could be classified (`errors` names each file and why), or no `files` field at all
       (FastAPI's validation format)
  503  no model loaded (`detail` says why); /v2/health/ready says the same
Bad input never causes a 5xx.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import numpy as np
from anyio import to_thread
from fastapi import APIRouter, File, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from models.contract import ModelContract
from models.preprocess import preprocess
from service.decoding import SUPPORTED_TEXT, DecodeError, decode_image
from service.deps import InferenceLimiterDep, MetricsDep, ModelSlotDep, SettingsDep

router = APIRouter(prefix="/v1", tags=["classify"])


class FileErrorInfo(BaseModel):
    code: str = Field(
        description="empty | too_large | unsupported_type | truncated | corrupt | too_many_pixels | unprocessable"
    )
    message: str


class FilePrediction(BaseModel):
    filename: str
    label: str = Field(description="The top class, or 'unidentified' when confidence is below the "
                                   "contract's abstain threshold")
    confidence: float = Field(description="Probability of the top class")
    probabilities: dict[str, float] = Field(description="Every class name → probability; they sum to 1")


class FileError(BaseModel):
    filename: str
    error: FileErrorInfo


class ClassifyResponse(BaseModel):
    model: str
    version: int
    classified: int
    failed: int
    results: list[FilePrediction | FileError] = Field(description="One entry per uploaded file, in order")


class ClassifyFailure(BaseModel):
    detail: str
    errors: list[FileError]


class Detail(BaseModel):
    detail: str


def _prepare(data: bytes, contract: ModelContract, max_pixels: int) -> np.ndarray:
    image = decode_image(data, max_pixels=max_pixels)
    try:
        return preprocess(image, contract)
    except Exception as exc:  # a mode or geometry the contract's preprocessing cannot handle
        raise DecodeError("unprocessable", f"{image.format} {image.mode} {image.size}: preprocessing failed: {exc}") from None


def _prepare_all(
    uploads: list[tuple[str, bytes | FileErrorInfo]], contract: ModelContract, max_pixels: int
) -> list[np.ndarray | FileErrorInfo]:
    """Decode + preprocess every upload (runs in a worker thread: Pillow and NumPy release the GIL)."""
    prepared: list[np.ndarray | FileErrorInfo] = []
    for _, data in uploads:
        if isinstance(data, FileErrorInfo):
            prepared.append(data)
            continue
        try:
            prepared.append(_prepare(data, contract, max_pixels))
        except DecodeError as exc:
            prepared.append(FileErrorInfo(code=exc.code, message=exc.message))
    return prepared


async def _read_limited(upload: UploadFile, max_bytes: int) -> bytes | FileErrorInfo:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        return FileErrorInfo(code="too_large", message=f"file is larger than the {max_bytes:,}-byte limit "
                                                         "(WBC_MAX_FILE_BYTES)")
    return data


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    responses={
        207: {"model": ClassifyResponse, "description": "Some files classified; refused ones carry `error`"},
        413: {"model": Detail, "description": "Too many files, or the body is over the byte limit"},
        422: {"model": ClassifyFailure, "description": "No file could be classified (or no `files` field)"},
        503: {"model": Detail, "description": "No model loaded"},
    },
)
async def classify(
    files: Annotated[list[UploadFile], File(description=f"One or more {SUPPORTED_TEXT} images")],
    response: Response,
    slot: ModelSlotDep,
    settings: SettingsDep,
    metrics: MetricsDep,
    inference_limiter: InferenceLimiterDep,
) -> Any:
    """Classify each uploaded white-cell image with the served model.

    200 when every file is classified; **207** when some are and some are not (the refused ones appear
    in `results` as `{filename, error: {code, message}}`, in request order); 422 when none can be;
    413 for more than WBC_MAX_FILES files; 503 while no model is loaded.
    """
    if len(files) > settings.max_files:
        return JSONResponse(
            {"detail": f"{len(files)} files sent; at most {settings.max_files} per request (WBC_MAX_FILES)"},
            status_code=413,
        )
    model = slot.current or await run_in_threadpool(slot.ensure_loaded)
    if model is None:
        return JSONResponse({"detail": f"no model loaded: {slot.last_error}"}, status_code=503)

    names = [upload.filename or f"file-{i + 1}" for i, upload in enumerate(files)]
    uploads = [(name, await _read_limited(upload, settings.max_file_bytes)) for name, upload in zip(names, files)]

    start = time.perf_counter()
    prepared = await run_in_threadpool(_prepare_all, uploads, model.contract, settings.max_pixels)
    metrics.preprocess_seconds.observe(time.perf_counter() - start)

    arrays = [item for item in prepared if isinstance(item, np.ndarray)]
    predictions = []
    if arrays:
        start = time.perf_counter()
        # One batch at a time through ORT: its intra-op threads already use every core.
        predictions = await to_thread.run_sync(model.classifier.predict, arrays, limiter=inference_limiter)
        metrics.inference_seconds.observe(time.perf_counter() - start)
        metrics.batch_size.observe(len(arrays))

    results: list[FilePrediction | FileError] = []
    answers = iter(predictions)
    for name, item in zip(names, prepared):
        if isinstance(item, FileErrorInfo):
            metrics.image_errors.labels(item.code).inc()
            results.append(FileError(filename=name, error=item))
        else:
            p = next(answers)
            metrics.predictions.labels(model.name, str(model.version), p.label).inc()
            results.append(FilePrediction(filename=name, label=p.label, confidence=p.confidence,
                                          probabilities=p.probabilities))

    failed = [r for r in results if isinstance(r, FileError)]
    if not predictions:
        summary = "; ".join(f"{e.filename}: {e.error.message}" for e in failed)
        body = ClassifyFailure(detail=f"no file could be classified ({summary})", errors=failed)
        return JSONResponse(body.model_dump(), status_code=422)
    if failed:
        response.status_code = 207
    return ClassifyResponse(model=model.name, version=model.version, classified=len(predictions),
                            failed=len(failed), results=results)
