"""Small but real ONNX classifiers built with onnx.helper, for tests that need a graph fast.

GlobalAveragePool → Flatten → Gemm: ONNX Runtime runs it like any exported network, and the contract
travels in its metadata exactly as `models.export` writes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.contract import ONNX_METADATA_KEY, ModelContract


def build_tiny_classifier(contract: ModelContract, path: Path, *, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    c, s = contract.num_classes, contract.input_size
    weight = numpy_helper.from_array(rng.normal(0, 3.0, (c, 3)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(0, 0.5, (c,)).astype(np.float32), "B")
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, s, s])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", c])],
        initializer=[weight, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.metadata_props.add(key=ONNX_METADATA_KEY, value=contract.to_json())
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, path)
    return path
