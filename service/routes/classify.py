"""POST /v1/classify: images in, one prediction (or one error) per file out.

Status codes (also in the OpenAPI `responses`):
  200  every file classified
  207  some files classified, some refused: each refused file has an `error` {code, message} in
       `results`, in request order, beside the predictions of the good files
  413  more files than WBC_MAX_FILES, or a body over WBC_MAX_REQUEST_BYTES
  422  no file could be classified (`errors` names each file and why), or no `files` field at all
       (FastAPI's validation format)
  503  no model loaded (`detail` says why; /v2/health/ready says the same), the inference queue is
       full (Retry-After), or the prediction sink could not record the results
Bad input never causes a 5xx.

Each classified image is handed to `app.state.prediction_sink` (service.sink) with the requesting
system (`service.deps.get_requester`) before the answer is sent.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from service.batching import BatcherClosedError, QueueFullError
from service.decoding import SUPPORTED_TEXT
from service.deps import ModelSlotDep, PipelineDep, PredictionSinkDep, RequesterDep, SettingsDep
from service.pipeline import ImageError
from service.sink import ClassifiedCell, SinkError, deliver

router = APIRouter(prefix="/v1", tags=["classify"])
ROUTE = "/v1/classify"


class FileErrorInfo(BaseModel):
    code: str = Field(
        description="empty | too_large | unsupported_type | truncated | corrupt | too_many_pixels | "
        "unprocessable | unsupported_dicom | no_pixel_data"
    )
    message: str


class FilePrediction(BaseModel):
    filename: str
    label: str = Field(description="The top class, or 'unidentified' when confidence is below the "
                                   "contract's abstain threshold")
    confidence: float = Field(description="Probability of the top class")
    probabilities: dict[str, float] = Field(description="Every class name → probability; they sum to 1")
    sop_instance_uid: str | None = Field(None, description="DICOM uploads: the file's SOP Instance UID")
    id: str | int | None = Field(None, description="The recorded prediction's id, when the service records them")


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


async def _read_limited(upload: UploadFile, max_bytes: int) -> bytes | ImageError:
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        return ImageError("too_large", f"file is larger than the {max_bytes:,}-byte limit (WBC_MAX_FILE_BYTES)")
    return data


def unavailable(detail: str, retry_after: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse({"detail": detail}, status_code=503, headers=headers)


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses={
        207: {"model": ClassifyResponse, "description": "Some files classified; refused ones carry `error`"},
        413: {"model": Detail, "description": "Too many files, or the body is over the byte limit"},
        422: {"model": ClassifyFailure, "description": "No file could be classified (or no `files` field)"},
        503: {"model": Detail, "description": "No model loaded, queue full, or the results could not be recorded"},
    },
)
async def classify(
    files: Annotated[list[UploadFile], File(description=f"One or more {SUPPORTED_TEXT} files")],
    slot: ModelSlotDep,
    settings: SettingsDep,
    pipeline: PipelineDep,
    sink: PredictionSinkDep,
    requester: RequesterDep,
    specimen: Annotated[str | None, Form(max_length=128, description="The laboratory's specimen (accession) id; "
                                         "its cells are reviewed and signed off together")] = None,
    slide: Annotated[str | None, Form(max_length=128, description="The laboratory's slide id")] = None,
) -> Any:
    """Classify each uploaded white-cell image (or DICOM file) with the served model.

    200 when every file is classified; **207** when some are and some are not (the refused ones appear
    in `results` as `{filename, error: {code, message}}`, in request order); 422 when none can be;
    413 for more than WBC_MAX_FILES files; 503 while no model is loaded or the queue is full.
    DICOM answers carry the file's `sop_instance_uid`.
    """
    if len(files) > settings.max_files:
        return JSONResponse(
            {"detail": f"{len(files)} files sent; at most {settings.max_files} per request (WBC_MAX_FILES)"},
            status_code=413,
        )
    # Taken once: this request finishes on this model even if a swap happens meanwhile.
    model = slot.current or await run_in_threadpool(slot.ensure_loaded)
    if model is None:
        return unavailable(f"no model loaded: {slot.last_error}")

    names = [upload.filename or f"file-{i + 1}" for i, upload in enumerate(files)]
    uploads = [await _read_limited(upload, settings.max_file_bytes) for upload in files]
    try:
        outcomes = await pipeline.classify_bytes(model, uploads)
    except QueueFullError as exc:
        return unavailable(str(exc), retry_after=1)
    except BatcherClosedError as exc:
        return unavailable(str(exc))

    cells = [
        ClassifiedCell(
            filename=name, data=data if isinstance(data, bytes) else None, format=o.format or "",
            sop_instance_uid=o.sop_instance_uid, label=o.prediction.label, confidence=o.prediction.confidence,
            probabilities=o.prediction.probabilities, model_name=model.name, model_version=model.version,
            model_precision=model.precision, requested_by=requester, route=ROUTE,
            specimen=specimen, slide=slide,
        )
        for name, data, o in zip(names, uploads, outcomes) if o.prediction is not None
    ]
    try:
        ids = iter(await deliver(sink, cells))
    except SinkError as exc:
        return unavailable(str(exc))

    results: list[FilePrediction | FileError] = []
    for name, outcome in zip(names, outcomes):
        if outcome.error is not None:
            info = FileErrorInfo(code=outcome.error.code, message=outcome.error.message)
            results.append(FileError(filename=name, error=info))
        else:
            p = outcome.prediction
            results.append(FilePrediction(filename=name, label=p.label, confidence=p.confidence,
                                          probabilities=p.probabilities, sop_instance_uid=outcome.sop_instance_uid,
                                          id=next(ids)))

    failed = [r for r in results if isinstance(r, FileError)]
    if not cells:
        summary = "; ".join(f"{e.filename}: {e.error.message}" for e in failed)
        body = ClassifyFailure(detail=f"no file could be classified ({summary})", errors=failed)
        return JSONResponse(body.model_dump(), status_code=422)
    body = ClassifyResponse(model=model.name, version=model.version, classified=len(cells),
                            failed=len(failed), results=results)
    # Built and checked above: answering it directly skips FastAPI's second validation of the response.
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=207 if failed else 200)
