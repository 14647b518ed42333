"""ONNX export with the model contract inside the file, and the checks that the graph honours it.

    path = export_onnx(model, contract, "model.onnx")
    report = check_parity(model, path, images, contract)   # report.ok
    contract = read_contract(path)                          # from metadata_props only
    validate_graph_against_contract(session, contract)      # the service calls this before serving

The graph takes `input` float32 [N, 3, S, S] (N dynamic) and answers `logits` [N, C]; preprocessing and
softmax stay outside it, in `models.preprocess`, so training, parity and serving share one implementation.
When the contract names test views, the graph is the model averaged over them (`models.test_views`):
export and parity both wrap the bare model, so the file always does what its contract says.

Import-light on purpose: torch is imported only by `export_onnx` and `check_parity`, onnx only where a
function needs it, so the service (onnxruntime, no torch, maybe no onnx) can use the read/validate half.
"""

from __future__ import annotations

import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from models.contract import ONNX_METADATA_KEY, ModelContract
from models.preprocess import preprocess, softmax

if TYPE_CHECKING:
    import onnx
    import onnxruntime
    import torch

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PRODUCER_KEY = "wbc.producer"  # JSON: who exported the file, with which library versions
DEFAULT_OPSET = 20  # the torch.export-based exporter's own default in torch 2.14; ORT ≥ 1.17 runs it


class ContractMismatch(ValueError):
    """An ONNX graph that does not honour its contract; `problems` lists every disagreement."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("graph does not match its contract: " + "; ".join(problems))


# --- export ------------------------------------------------------------------------------------------


def _producer_info() -> dict[str, str]:
    import importlib.metadata as md

    info = {"python": platform.python_version()}
    for dist in ("wbc-federated", "torch", "timm", "onnx", "onnxscript"):
        try:
            info[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return info


def export_onnx(
    model: torch.nn.Module, contract: ModelContract, path: str | Path, *, opset: int | None = None
) -> Path:
    """Export `model` (eval mode) with the torch.export-based exporter and write the contract into the file.

    Raises ValueError when the model's output does not have `contract.num_classes` logits at
    `contract.input_size`, and onnx.checker's error when the graph is invalid.
    """
    import onnx
    import torch

    from models.test_views import with_test_views

    model = with_test_views(model, contract)
    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        size = contract.input_size
        example = torch.zeros(2, 3, size, size, device=device)  # batch 2: torch.export specialises 0 and 1
        try:
            with torch.no_grad():
                out = model(example)
        except Exception as exc:
            raise ValueError(f"model does not accept [N, 3, {size}, {size}] input: {exc}") from exc
        if tuple(out.shape) != (2, contract.num_classes):
            raise ValueError(
                f"model answers {tuple(out.shape)[1:]} per image, "
                f"the contract has {contract.num_classes} classes"
            )
        arch = getattr(model, "pretrained_cfg", {}).get("architecture")
        if arch and arch != contract.architecture:
            raise ValueError(f"model is {arch!r}, the contract says {contract.architecture!r}")

        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes=({0: batch},),
            opset_version=opset or DEFAULT_OPSET,
            verbose=False,
        )
    finally:
        model.train(was_training)

    program.model.metadata_props[ONNX_METADATA_KEY] = contract.to_json()
    program.model.metadata_props[PRODUCER_KEY] = json.dumps(_producer_info(), sort_keys=True)
    program.model.doc_string = f"{contract.architecture}: {', '.join(contract.class_names)}"
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return path


# --- reading the contract back -----------------------------------------------------------------------


def _contract_from_metadata(metadata: dict[str, str], where: str) -> ModelContract:
    text = metadata.get(ONNX_METADATA_KEY)
    if text is None:
        raise ValueError(
            f"{where}: no {ONNX_METADATA_KEY!r} in the ONNX metadata (not exported by models.export?)"
        )
    return ModelContract.from_json(text)


def read_contract(path_or_bytes: str | Path | bytes) -> ModelContract:
    """The contract stored in an ONNX file's metadata_props (the graph's weights are not loaded)."""
    try:
        import onnx
    except ImportError:  # a serving image without onnx: let onnxruntime read the metadata
        import onnxruntime as ort

        source = path_or_bytes if isinstance(path_or_bytes, bytes) else str(path_or_bytes)
        return contract_from_session(ort.InferenceSession(source, providers=["CPUExecutionProvider"]))
    if isinstance(path_or_bytes, bytes):
        proto, where = onnx.load_model_from_string(path_or_bytes), "<bytes>"
    else:
        proto, where = onnx.load(str(path_or_bytes), load_external_data=False), str(path_or_bytes)
    return _contract_from_metadata({p.key: p.value for p in proto.metadata_props}, where)


def contract_from_session(session: onnxruntime.InferenceSession) -> ModelContract:
    """The contract of a loaded ONNX Runtime session (custom_metadata_map holds metadata_props)."""
    return _contract_from_metadata(session.get_modelmeta().custom_metadata_map, "session")


# --- does the graph honour the contract? -------------------------------------------------------------


@dataclass(frozen=True)
class _Port:
    name: str
    dtype: str  # "float32", ...
    shape: tuple[int | str | None, ...]


def _ports(graph: Any) -> tuple[list[_Port], list[_Port]]:
    """Inputs and outputs of an ORT session, an onnx ModelProto or a path to an ONNX file."""
    if hasattr(graph, "get_inputs"):  # onnxruntime.InferenceSession
        dtypes = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}

        def port(arg: Any) -> _Port:
            return _Port(arg.name, dtypes.get(arg.type, arg.type), tuple(arg.shape))

        return [port(a) for a in graph.get_inputs()], [port(a) for a in graph.get_outputs()]

    import onnx

    proto = graph if isinstance(graph, onnx.ModelProto) else onnx.load(str(graph), load_external_data=False)
    initializers = {t.name for t in proto.graph.initializer}

    def port(value: Any) -> _Port:
        tensor = value.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim
        )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name if tensor.elem_type else "?"
        return _Port(value.name, dtype, dims)

    inputs = [port(v) for v in proto.graph.input if v.name not in initializers]
    return inputs, [port(v) for v in proto.graph.output]


def graph_problems(graph: Any, contract: ModelContract) -> list[str]:
    """Every way the graph's signature disagrees with the contract (empty when it honours it)."""
    inputs, outputs = _ports(graph)
    problems: list[str] = []
    if len(inputs) != 1:
        problems.append(f"expected one input, found {[p.name for p in inputs]}")
    else:
        inp, size = inputs[0], contract.input_size
        if inp.dtype != "float32":
            problems.append(f"input {inp.name!r} is {inp.dtype}, expected float32")
        if len(inp.shape) != 4:
            problems.append(f"input {inp.name!r} has shape {inp.shape}, expected [N, 3, {size}, {size}]")
        else:
            if inp.shape[1] != 3:
                problems.append(f"input {inp.name!r} has {inp.shape[1]} channels, expected 3")
            if tuple(inp.shape[2:]) != (size, size):
                problems.append(
                    f"input {inp.name!r} is {inp.shape[2]}×{inp.shape[3]}, the contract says {size}×{size}"
                )
            if isinstance(inp.shape[0], int) and inp.shape[0] != 1:
                problems.append(f"input {inp.name!r} has a fixed batch of {inp.shape[0]}")
    if not outputs:
        problems.append("the graph has no output")
    else:
        out = outputs[0]
        if len(out.shape) != 2 or out.shape[-1] != contract.num_classes:
            problems.append(
                f"output {out.name!r} has shape {out.shape}, expected [N, {contract.num_classes}]"
            )
    return problems


def validate_graph_against_contract(session_or_model: Any, contract: ModelContract) -> None:
    """Raise ContractMismatch when the graph's input/output signature disagrees with the contract.

    Takes an onnxruntime.InferenceSession, an onnx.ModelProto or a path to an ONNX file.
    """
    problems = graph_problems(session_or_model, contract)
    if problems:
        raise ContractMismatch(problems)


# --- parity between PyTorch and ONNX Runtime ---------------------------------------------------------


@dataclass(frozen=True)
class ParityReport:
    """PyTorch vs ONNX Runtime (CPU) on the same preprocessed images; `ok` when within `atol`."""

    n_images: int
    atol: float
    max_abs_diff: float = float("nan")  # max |Δ probability| over images and classes
    max_abs_logit_diff: float = float("nan")
    top1_agreement: float = float("nan")  # fraction of images with the same arg-max
    batch_sizes: tuple[int, ...] = ()
    problems: tuple[str, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.problems and self.n_images > 0 and self.max_abs_diff <= self.atol

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "n_images": self.n_images,
            "atol": self.atol,
            "max_abs_diff": self.max_abs_diff,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "top1_agreement": self.top1_agreement,
            "batch_sizes": list(self.batch_sizes),
            "problems": list(self.problems),
        }


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | Path,
    images: Sequence[Image.Image],
    contract: ModelContract,
    atol: float = 1e-4,
) -> ParityReport:
    """Max |Δ probability| between PyTorch and ONNX Runtime CPU on real images; reports, never raises.

    The images go through the contract's own preprocessing; ORT runs them as one batch and one at a
    time, so a graph whose batch axis is not truly dynamic shows up as a problem too.
    """
    n = len(images)
    if n == 0:
        return ParityReport(0, atol, problems=("no images to compare",))
    try:
        import onnxruntime as ort
        import torch

        from models.test_views import with_test_views

        model = with_test_views(model, contract)
        batch = np.stack([preprocess(image, contract) for image in images]).astype(np.float32)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        problems = graph_problems(session, contract)
        if problems:
            return ParityReport(n, atol, problems=tuple(problems))
        input_name = session.get_inputs()[0].name
        onnx_logits = session.run(None, {input_name: batch})[0]
        single = np.concatenate([session.run(None, {input_name: batch[i : i + 1]})[0] for i in range(n)])

        was_training = model.training
        model.eval()
        try:
            device = next((p.device for p in model.parameters()), torch.device("cpu"))
            with torch.no_grad():
                torch_logits = model(torch.from_numpy(batch).to(device)).float().cpu().numpy()
        finally:
            model.train(was_training)

        p_torch = softmax(torch_logits, contract.temperature)
        diffs = [np.abs(softmax(o, contract.temperature) - p_torch) for o in (onnx_logits, single)]
        return ParityReport(
            n_images=n,
            atol=atol,
            max_abs_diff=float(max(d.max() for d in diffs)),
            max_abs_logit_diff=float(max(np.abs(o - torch_logits).max() for o in (onnx_logits, single))),
            top1_agreement=float(np.mean(onnx_logits.argmax(-1) == torch_logits.argmax(-1))),
            batch_sizes=(n, 1),
        )
    except Exception as exc:  # a report, not an exception: the caller decides what a failure means
        return ParityReport(n, atol, problems=(f"{type(exc).__name__}: {exc}",))
