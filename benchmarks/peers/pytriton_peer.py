"""Peer (c): NVIDIA Triton Inference Server through PyTriton, serving the same ONNX model with the same
preprocessing, Triton's dynamic batcher in front.

    var/pytriton-venv/bin/python benchmarks/peers/pytriton_peer.py --registry R --model M --version N --port P

Run it from its own environment (nvidia-pytriton pins NumPy 1.x; benchmarks/peers/requirements-pytriton.txt).
Triton's Python backend on this machine loads the system libpython instead of the interpreter's:
`benchmarks/serve.py` starts this file with LD_LIBRARY_PATH = the interpreter's sysconfig LIBDIR.

Clients send KServe v2 infer requests with one encoded image per request (`image`, BYTES [1, 1]);
Triton batches them (max 32, queue delay `--queue-delay-us`) and calls `infer` with the batch, which
decodes + preprocesses each image and runs one ONNX Runtime batch (one intra-op thread per core,
no spinning).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from pytriton.decorators import batch  # noqa: E402
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor  # noqa: E402
from pytriton.triton import Triton, TritonConfig  # noqa: E402

from benchmarks.peers.common import contract_of, model_path, prepare, probabilities  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--registry", "--model"):
        parser.add_argument(name, required=True)
    parser.add_argument("--version", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--queue-delay-us", type=int, default=2000)  # the registry's config.pbtxt value
    args = parser.parse_args()

    options = ort.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(
        str(model_path(args.registry, args.model, args.version)), options, providers=["CPUExecutionProvider"]
    )
    contract = contract_of(session)

    @batch
    def infer(image: np.ndarray) -> dict[str, np.ndarray]:
        arrays = np.stack([prepare(bytes(row[0]), contract) for row in image])
        logits = session.run(None, {"input": arrays})[0]
        return {"probabilities": probabilities(logits, contract)}

    base = args.port
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=base,
        grpc_port=base + 1,
        metrics_port=base + 2,
        allow_grpc=False,
        allow_metrics=False,
        log_verbose=0,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name=args.model,
            infer_func=infer,
            inputs=[Tensor(name="image", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="probabilities", dtype=np.float32, shape=(contract.num_classes,))],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.queue_delay_us),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
