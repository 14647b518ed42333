"""Peer (b): FastAPI + ONNX Runtime, one `session.run` per request (no batching), ORT's default options.

python benchmarks/peers/ort_per_request.py --registry R --model M --version N --port P
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import onnxruntime as ort  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402

from benchmarks.peers.common import answer, contract_of, model_path, prepare, probabilities  # noqa: E402


def create_app(path: Path) -> FastAPI:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    contract = contract_of(session)
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(files: list[UploadFile] = File(...)) -> dict:  # sync: FastAPI's thread pool runs it
        arrays = [prepare(f.file.read(), contract) for f in files]
        import numpy as np

        logits = session.run(None, {"input": np.stack(arrays)})[0]
        return {"results": answer(probabilities(logits, contract), contract)}

    @app.get("/v2/health/ready")
    def ready() -> dict:
        return {"ready": True}

    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("--registry", "--model"):
        parser.add_argument(name, required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = create_app(model_path(args.registry, args.model, args.version))
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
