"""ONNX Runtime classifier built from the contract inside the ONNX file, and the slot the app serves from.

`Classifier` owns one `InferenceSession`. It reads the contract from the file's metadata (never from a
second copy), refuses a graph whose input or output does not match that contract (models.export's
checks, plus the tensor names the registry's Triton config declares), and turns batches of
preprocessed arrays into per-class probabilities with the contract's temperature and abstain threshold.

`ModelSlot` holds the model the service answers with. Loading happens off the event loop; a failed or
impossible load leaves the slot empty with a reason (the service stays up, `ready` says 503 and why),
and while it is empty the registry is tried again at most every `model_retry_seconds`. The later
hot-swap on promotion replaces `ModelSlot.current` in one assignment, so requests in flight keep the
`LoadedModel` they started with.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import onnxruntime as ort

from models.contract import UNIDENTIFIED, ModelContract
from models.export import INPUT_NAME, OUTPUT_NAME, contract_from_session, graph_problems
from models.preprocess import softmax
from models.registry import Registry, RegistryError, VersionInfo
from service.config import Settings

log = logging.getLogger(__name__)

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class ModelLoadError(RuntimeError):
    """A model that cannot be served; the message says which file and why."""


class ContractMismatchError(ModelLoadError):
    """The contract in the file does not describe its graph (or disagrees with the registry's record)."""


# ---- session options -------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionConfig:
    """What the session is built with; recorded so /v2/health/ready and the log can say it.

    Defaults suit a small CPU box (2 cores here): one intra-op thread per usable core, no inter-op
    parallelism (CNN graphs are a chain), all graph optimisations, and no spin-waiting so idle
    inference threads do not steal the cores that decode and preprocess the next request.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    allow_spinning: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionConfig:
        return cls(
            providers=providers_for(settings.device),
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            graph_optimization=settings.graph_optimization,
        )

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.allow_spinning else "0")
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
        return options

    def describe(self) -> dict[str, Any]:
        return {
            "providers": list(self.providers),
            "intra_op_threads": self.intra_op_threads,
            "inter_op_threads": self.inter_op_threads,
            "execution_mode": "sequential",
            "graph_optimization": self.graph_optimization,
            "allow_spinning": self.allow_spinning,
        }


def providers_for(device: str) -> tuple[str, ...]:
    """Execution providers for the device policy (placeholder until the CUDA policy lands)."""
    available = ort.get_available_providers()
    if device == "cpu":
        return ("CPUExecutionProvider",)
    if "CUDAExecutionProvider" in available:
        return ("CUDAExecutionProvider", "CPUExecutionProvider")
    if device == "cuda":
        raise ModelLoadError(
            f"WBC_DEVICE=cuda but this ONNX Runtime offers only {available} (install onnxruntime-gpu)"
        )
    return ("CPUExecutionProvider",)


# ---- the classifier -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prediction:
    label: str  # a class name, or "unidentified" when confidence is below the abstain threshold
    confidence: float  # the top class's probability
    probabilities: dict[str, float]  # every class name → probability, summing to 1


def read_contract(session: ort.InferenceSession, source: str) -> ModelContract:
    """The contract from the file's own metadata (models.export wrote it there)."""
    try:
        return contract_from_session(session)
    except ValueError as exc:  # missing key, bad JSON, or a contract that fails validation
        raise ModelLoadError(f"{source}: {exc}") from None


def check_graph(session: ort.InferenceSession, contract: ModelContract, source: str) -> int | None:
    """Refuse a graph the contract does not describe; returns the static batch size, if the graph has one."""
    problems = graph_problems(session, contract)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    # Names too: the registry's Triton config declares them, so Triton/KServe would refuse other names.
    if len(inputs) == 1 and inputs[0].name != INPUT_NAME:
        problems.append(f"input is named {inputs[0].name!r}, expected {INPUT_NAME!r}")
    if outputs and outputs[0].name != OUTPUT_NAME:
        problems.append(f"first output is named {outputs[0].name!r}, expected {OUTPUT_NAME!r}")
    if problems:
        raise ContractMismatchError(f"{source}: graph does not match its contract: " + "; ".join(problems))
    batch = inputs[0].shape[0]
    return batch if isinstance(batch, int) and batch > 0 else None


class Classifier:
    """One ONNX Runtime session and the contract it was exported with."""

    def __init__(self, onnx_path: str | Path, config: SessionConfig | None = None):
        self.path = Path(onnx_path)
        self.config = config or SessionConfig()
        source = str(self.path)
        try:
            self.session = ort.InferenceSession(
                source, self.config.session_options(), providers=list(self.config.providers)
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise ModelLoadError(f"{source}: ONNX Runtime cannot load it: {exc}") from None
        self.contract = read_contract(self.session, source)
        self.static_batch = check_graph(self.session, self.contract, source)
        self._check_output_width(source)

    def _check_output_width(self, source: str) -> None:
        """Run one blank input: proves the graph executes and that its output width is the class count."""
        s = self.contract.input_size
        try:
            out = self.logits(np.zeros((1, 3, s, s), dtype=np.float32))
        except Exception as exc:  # ORT's runtime errors: an op it cannot run, a shape it cannot infer
            raise ModelLoadError(f"{source}: a test run on a blank image failed: {exc}") from None
        if out.shape != (1, self.contract.num_classes):
            raise ContractMismatchError(
                f"{source}: a 1-image batch gave logits of shape {out.shape}; the contract expects "
                f"(1, {self.contract.num_classes})"
            )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 → (N, C) logits."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if len(batch) == 0:
            return np.zeros((0, self.contract.num_classes), dtype=np.float32)
        if self.static_batch == 1 and len(batch) > 1:  # a graph exported with a fixed batch of one
            return np.concatenate([self._run(batch[i : i + 1]) for i in range(len(batch))])
        return self._run(batch)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.logits(batch), self.contract.temperature)

    def predict(self, arrays: Sequence[np.ndarray]) -> list[Prediction]:
        """Preprocessed images (each (3, S, S)) → one Prediction each, in order."""
        if not arrays:
            return []
        probs = self.probabilities(np.stack(arrays))
        names = self.contract.class_names
        threshold = self.contract.abstain_threshold
        predictions = []
        for row in probs:
            top = int(np.argmax(row))
            confidence = float(row[top])
            label = names[top] if confidence >= threshold else UNIDENTIFIED
            predictions.append(Prediction(label, confidence, {n: float(p) for n, p in zip(names, row)}))
        return predictions


# ---- what the app serves ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadedModel:
    classifier: Classifier
    info: VersionInfo
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def name(self) -> str:
        return self.info.model_name

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def contract(self) -> ModelContract:
        return self.classifier.contract

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "architecture": self.contract.architecture,
            "classes": list(self.contract.class_names),
            "input_size": self.contract.input_size,
            "path": str(self.info.onnx_path),
            "sha256": self.info.sha256,
            "loaded_at": self.loaded_at,
            "session": self.classifier.config.describe(),
        }


def load_from_registry(settings: Settings) -> LoadedModel:
    """Resolve the configured version, check its checksum, build the session, cross-check contracts."""
    try:
        info = Registry(settings.registry, settings.model_name).resolve(settings.version)
        if settings.verify_sha256:
            info.verify()
    except RegistryError as exc:  # includes IntegrityError
        raise ModelLoadError(str(exc)) from None
    classifier = Classifier(info.onnx_path, SessionConfig.from_settings(settings))
    recorded = info.contract
    if classifier.contract != recorded:
        raise ContractMismatchError(
            f"{info.onnx_path}: the contract in the file differs from the one in {info.path / 'metadata.json'}"
        )
    return LoadedModel(classifier, info)


class ModelSlot:
    """The model being served (or None, with the reason), loaded from the registry on demand."""

    def __init__(self, settings: Settings, on_load: Callable[[LoadedModel], None] | None = None):
        self.settings = settings
        self.on_load = on_load
        self.current: LoadedModel | None = None
        self.last_error: str | None = "not loaded yet"
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()

    def load(self) -> LoadedModel | None:
        """Blocking; call from a worker thread. Keeps the slot empty (with the reason) when it fails."""
        with self._lock:
            self._last_attempt = time.monotonic()
            try:
                loaded = load_from_registry(self.settings)
            except ModelLoadError as exc:
                self.last_error = str(exc)
                log.error("no model served: %s", exc)
                return None
            except Exception as exc:  # e.g. a metadata.json without a valid contract: stay up, say why
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("no model served: unexpected error while loading")
                return None
            self.current, self.last_error = loaded, None
            if self.on_load is not None:
                self.on_load(loaded)
            log.info("serving %s v%d (%s) with %s", loaded.name, loaded.version,
                     loaded.contract.architecture, loaded.classifier.config.describe())
            return loaded

    def ensure_loaded(self) -> LoadedModel | None:
        """The current model; when there is none, retry the registry if the retry interval has passed."""
        if self.current is not None:
            return self.current
        if time.monotonic() - self._last_attempt >= self.settings.model_retry_seconds:
            return self.load()
        return None
