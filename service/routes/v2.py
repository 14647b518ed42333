"""Open Inference Protocol (KServe v2) endpoints beside /v1/classify, usable with `tritonclient.http`.

    GET  /v2                                              server metadata
    GET  /v2/models/{name}[/versions/{v}]                 model metadata (+ provider, precision, classes)
    GET  /v2/models/{name}[/versions/{v}]/ready           200 when that model (version) is served
    POST /v2/models/{name}[/versions/{v}]/infer           inference

Inputs (one per request): `input` FP32 [N, 3, S, S], tensors already preprocessed by the contract, or
`image` BYTES [N], encoded image or DICOM files (the service decodes and preprocesses them exactly as
/v1/classify does). Outputs: `probabilities` FP32 [N, C] (temperature-scaled softmax, classes in the
contract's order) and `label` BYTES [N] (a class name, or "unidentified" below the abstain threshold).
Tensor data may come as JSON `data` or with Triton's binary tensor data extension
(`Inference-Header-Content-Length`), which is what tritonclient sends by default; outputs are binary
when asked (`binary_data` / `binary_data_output`). Errors are `{"error": "..."}` with 400 (bad
request), 404 (unknown model or version), 503 (not ready, queue full).

Only the version being served is reachable; after a swap the previous version answers 404.
"""

from __future__ import annotations

import json
import zlib
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from service.batching import BatcherClosedError, QueueFullError
from service.deps import ModelSlotDep, PipelineDep, PredictionSinkDep, RequesterDep, SettingsDep
from service.inference import LoadedModel, ModelSlot
from service.sink import ClassifiedCell, SinkError, deliver

router = APIRouter(prefix="/v2", tags=["kserve-v2"])

TENSOR_INPUT = "input"
IMAGE_INPUT = "image"
PROBABILITIES = "probabilities"
LABEL = "label"
HEADER_LENGTH = "Inference-Header-Content-Length"
SERVER_NAME = "wbc-classifier-service"


class V2Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _error(exc: V2Error) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status)


def _server_version() -> str:
    try:
        return package_version("wbc-federated")
    except PackageNotFoundError:
        return "0"


async def _served(slot: ModelSlot, name: str, version: str | None) -> LoadedModel:
    if name != slot.settings.model_name:
        raise V2Error(404, f"unknown model {name!r}; this service serves {slot.settings.model_name!r}")
    model = slot.current or await run_in_threadpool(slot.ensure_loaded)
    if model is None:
        raise V2Error(503, f"model {name!r} is not ready: {slot.last_error}")
    if version not in (None, "", str(model.version)):
        raise V2Error(404, f"model {name!r} version {version!r} is not served; version {model.version} is")
    return model


def model_metadata(model: LoadedModel) -> dict[str, Any]:
    s, c = model.contract.input_size, model.contract.num_classes
    return {
        "name": model.name,
        "versions": [str(model.version)],
        "platform": "onnxruntime_onnx",
        "inputs": [
            {"name": TENSOR_INPUT, "datatype": "FP32", "shape": [-1, 3, s, s]},
            {"name": IMAGE_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [
            {"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, c]},
            {"name": LABEL, "datatype": "BYTES", "shape": [-1]},
        ],
        # Beyond the protocol's fields: what clients need to read the outputs, and what runs them.
        "parameters": {
            "classes": list(model.contract.class_names),
            "abstain_threshold": model.contract.abstain_threshold,
            "architecture": model.contract.architecture,
            "precision": model.precision,
            "provider": model.provider,
            "sha256": model.info.sha256,
        },
    }


@router.get("")
async def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": _server_version(), "extensions": ["binary_tensor_data"]}


@router.get("/models/{name}")
@router.get("/models/{name}/versions/{version}")
async def get_model_metadata(name: str, slot: ModelSlotDep, version: str | None = None) -> Any:
    try:
        return model_metadata(await _served(slot, name, version))
    except V2Error as exc:
        return _error(exc)


@router.get("/models/{name}/ready")
@router.get("/models/{name}/versions/{version}/ready")
async def model_ready(name: str, slot: ModelSlotDep, version: str | None = None) -> Any:
    try:
        model = await _served(slot, name, version)
    except V2Error as exc:
        return JSONResponse({"name": name, "ready": False, "error": exc.message}, status_code=exc.status)
    return {"name": name, "version": str(model.version), "ready": True}


# ---- infer ------------------------------------------------------------------------------------------------
def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise V2Error(400, f"Content-Encoding {encoding!r} is not supported (gzip, deflate)")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise V2Error(400, f"{encoding} body could not be decompressed: {exc}") from None
    if len(out) > limit:
        raise V2Error(400, f"decompressed body is larger than the {limit:,}-byte limit")
    return out


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is None:
        json_part, binary = body, b""
    else:
        if not header_length.isdigit() or int(header_length) > len(body):
            raise V2Error(400, f"{HEADER_LENGTH} {header_length!r} does not fit a {len(body)}-byte body")
        json_part, binary = body[: int(header_length)], body[int(header_length) :]
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise V2Error(400, f"inference request header is not JSON: {exc}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise V2Error(400, "inference request must be a JSON object with an 'inputs' list")
    return request, binary


def _shape(tensor: dict[str, Any]) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise V2Error(400, f"input {tensor.get('name')!r}: 'shape' must be a list of non-negative integers")
    return shape


def _bytes_elements(raw: bytes, count: int, name: str) -> list[bytes]:
    """Triton's BYTES serialisation: each element is a 4-byte little-endian length, then the bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise V2Error(400, f"input {name!r}: BYTES data ends inside a length prefix")
        n = int.from_bytes(raw[offset : offset + 4], "little")
        offset += 4
        if offset + n > len(raw):
            raise V2Error(
                400,
                f"input {name!r}: BYTES element {len(elements) + 1} claims {n} bytes, "
                f"{len(raw) - offset} remain",
            )
        elements.append(raw[offset : offset + n])
        offset += n
    if len(elements) != count:
        raise V2Error(400, f"input {name!r}: shape says {count} elements, the data holds {len(elements)}")
    return elements


def _read_input(
    request: dict[str, Any], binary: bytes, contract_size: int, max_items: int
) -> tuple[str, np.ndarray | list[bytes]]:
    inputs = request["inputs"]
    if len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise V2Error(400, f"send exactly one input: {TENSOR_INPUT!r} (FP32) or {IMAGE_INPUT!r} (BYTES)")
    tensor = inputs[0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), _shape(tensor)
    params = tensor.get("parameters") or {}
    size = params.get("binary_data_size")
    raw = None
    if size is not None:
        if not isinstance(size, int) or size < 0 or size > len(binary):
            raise V2Error(
                400, f"input {name!r}: binary_data_size {size!r} exceeds the {len(binary)} binary bytes"
            )
        raw = binary[:size]
    elif "data" not in tensor:
        raise V2Error(400, f"input {name!r} has neither 'data' nor a binary_data_size parameter")

    count = int(np.prod(shape)) if shape else 0
    if name == TENSOR_INPUT:
        s = contract_size
        if datatype != "FP32":
            raise V2Error(400, f"input {name!r} must be FP32, not {datatype!r}")
        if len(shape) != 4 or shape[1:] != [3, s, s]:
            raise V2Error(400, f"input {name!r} must have shape [N, 3, {s}, {s}], not {shape}")
        if raw is not None:
            if len(raw) != count * 4:
                raise V2Error(400, f"input {name!r}: {len(raw)} bytes for {count} FP32 values")
            array = np.frombuffer(raw, dtype="<f4")
        else:
            try:
                array = np.asarray(tensor["data"], dtype=np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise V2Error(400, f"input {name!r}: 'data' must be numbers") from None
            if array.size != count:
                raise V2Error(
                    400, f"input {name!r}: shape {shape} needs {count} values, 'data' has {array.size}"
                )
        if shape[0] > max_items:
            raise V2Error(400, f"{shape[0]} images in one request; at most {max_items} (WBC_MAX_FILES)")
        batch = array.astype(np.float32).reshape(shape)
        if not np.isfinite(batch).all():
            raise V2Error(400, f"input {name!r} holds NaN or infinite values")
        return name, batch
    if name == IMAGE_INPUT:
        if datatype != "BYTES":
            raise V2Error(400, f"input {name!r} must be BYTES, not {datatype!r}")
        if len(shape) != 1:
            raise V2Error(400, f"input {name!r} must have shape [N], not {shape}")
        if count > max_items:
            raise V2Error(400, f"{count} images in one request; at most {max_items} (WBC_MAX_FILES)")
        if raw is not None:
            return name, _bytes_elements(raw, count, name)
        data = tensor["data"]
        if not isinstance(data, list) or len(data) != count or not all(isinstance(d, str) for d in data):
            raise V2Error(
                400,
                f"input {name!r}: JSON 'data' must be {count} strings; send images with the "
                "binary tensor data extension",
            )
        return name, [d.encode("utf-8") for d in data]
    raise V2Error(
        400,
        f"unknown input {name!r}; this model takes {TENSOR_INPUT!r} (FP32 [N, 3, S, S]) "
        f"or {IMAGE_INPUT!r} (BYTES [N])",
    )


def _serialise_bytes(values: list[str]) -> bytes:
    return b"".join(len(b).to_bytes(4, "little") + b for b in (v.encode() for v in values))


def _response(
    request: dict[str, Any], model: LoadedModel, probs: np.ndarray, labels: list[str], ids: list[Any]
) -> Response:
    wanted = request.get("outputs")
    all_binary = bool((request.get("parameters") or {}).get("binary_data_output", False))
    if wanted is None:
        wanted = [{"name": PROBABILITIES}, {"name": LABEL}]
    if not isinstance(wanted, list) or not all(isinstance(o, dict) for o in wanted):
        raise V2Error(400, "'outputs' must be a list of objects")
    available = {
        PROBABILITIES: (
            "FP32",
            list(probs.shape),
            lambda: probs.astype("<f4").tobytes(),
            lambda: probs.reshape(-1).tolist(),
        ),
        LABEL: ("BYTES", [len(labels)], lambda: _serialise_bytes(labels), lambda: labels),
    }
    outputs, blobs = [], []
    for spec in wanted:
        name = spec.get("name")
        if name not in available:
            raise V2Error(400, f"unknown output {name!r}; outputs are {PROBABILITIES!r} and {LABEL!r}")
        datatype, shape, as_binary, as_json = available[name]
        out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if (spec.get("parameters") or {}).get("binary_data", all_binary):
            blob = as_binary()
            out["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            out["data"] = as_json()
        outputs.append(out)
    body: dict[str, Any] = {"model_name": model.name, "model_version": str(model.version), "outputs": outputs}
    if "id" in request:
        body["id"] = request["id"]
    if any(i is not None for i in ids):
        body["parameters"] = {"prediction_ids": json.dumps(ids)}
    header = json.dumps(body).encode()
    if not blobs:
        return Response(header, media_type="application/json")
    return Response(
        header + b"".join(blobs),
        media_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


@router.post("/models/{name}/infer")
@router.post("/models/{name}/versions/{version}/infer")
async def infer(
    name: str,
    request: Request,
    slot: ModelSlotDep,
    settings: SettingsDep,
    pipeline: PipelineDep,
    sink: PredictionSinkDep,
    requester: RequesterDep,
    version: str | None = None,
) -> Response:
    try:
        model = await _served(slot, name, version)
        body = _decompress(
            await request.body(), request.headers.get("content-encoding"), settings.max_request_bytes
        )
        infer_request, binary = _split_body(body, request.headers.get(HEADER_LENGTH.lower()))
        kind, data = _read_input(infer_request, binary, model.contract.input_size, settings.max_files)
        route = f"/v2/models/{name}/infer"
        if kind == TENSOR_INPUT:
            predictions = await pipeline.classify_arrays(model, data)
            cells_data: list[bytes | None] = [None] * len(predictions)
            formats, uids = ["tensor"] * len(predictions), [None] * len(predictions)
        else:
            outcomes = await pipeline.classify_bytes(model, data)
            refused = [(i, o.error) for i, o in enumerate(outcomes) if o.error is not None]
            if refused:
                detail = "; ".join(f"image {i}: {e.code}: {e.message}" for i, e in refused)
                raise V2Error(
                    400, f"{len(refused)} of {len(outcomes)} images could not be classified ({detail})"
                )
            predictions = [o.prediction for o in outcomes]
            cells_data, formats = list(data), [o.format or "" for o in outcomes]
            uids = [o.sop_instance_uid for o in outcomes]
        cells = [
            ClassifiedCell(
                filename=f"{IMAGE_INPUT if kind == IMAGE_INPUT else TENSOR_INPUT}[{i}]",
                data=d,
                format=f,
                sop_instance_uid=u,
                label=p.label,
                confidence=p.confidence,
                probabilities=p.probabilities,
                model_name=model.name,
                model_version=model.version,
                model_precision=model.precision,
                requested_by=requester,
                route=route,
            )
            for i, (p, d, f, u) in enumerate(zip(predictions, cells_data, formats, uids))
        ]
        ids = await deliver(sink, cells)
        names = model.contract.class_names
        probs = np.asarray([[p.probabilities[c] for c in names] for p in predictions], dtype=np.float32)
        probs = probs.reshape(len(predictions), len(names))
        return _response(infer_request, model, probs, [p.label for p in predictions], ids)
    except V2Error as exc:
        return _error(exc)
    except QueueFullError as exc:
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": "1"})
    except (BatcherClosedError, SinkError) as exc:
        return JSONResponse({"error": str(exc)}, status_code=503)
