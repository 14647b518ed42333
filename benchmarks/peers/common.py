"""What every peer shares with the service: the registered ONNX file, its contract, its preprocessing.

Peers import only NumPy, Pillow and `models.*` from this repository (plus their own framework), so
the PyTriton peer can run in its own virtual environment (PyTriton pins NumPy 1.x).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from models.contract import ONNX_METADATA_KEY, ModelContract
from models.preprocess import preprocess, softmax


def model_path(registry: str, model: str, version: int) -> Path:
    return Path(registry) / model / str(version) / "model.onnx"


def contract_of(session) -> ModelContract:
    """The contract from an onnxruntime session's metadata (as the service reads it)."""
    return ModelContract.from_json(session.get_modelmeta().custom_metadata_map[ONNX_METADATA_KEY])


def prepare(data: bytes, contract: ModelContract) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return preprocess(image, contract)


def answer(probs: np.ndarray, contract: ModelContract) -> list[dict]:
    out = []
    for row in probs:
        top = int(np.argmax(row))
        out.append(
            {
                "label": contract.class_names[top],
                "confidence": float(row[top]),
                "probabilities": dict(zip(contract.class_names, map(float, row))),
            }
        )
    return out


def probabilities(logits: np.ndarray, contract: ModelContract) -> np.ndarray:
    return softmax(logits, contract.temperature)


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode()
