"""ONNX Runtime classifier built from the contract inside the ONNX file, and the slot the app serves from.

`Classifier` owns one `InferenceSession`. It reads the contract from the file's metadata (never from a
second copy), refuses a graph whose input or output does not match that contract (models.export's
checks, plus the tensor names the registry's Triton config declares), and turns batches of
preprocessed arrays into per-class probabilities with the contract's temperature and abstain threshold.

`ModelSlot` holds the model the service answers with. Loading happens off the event loop; a failed or
impossible load leaves the slot empty with a reason (the service stays up, `ready` says 503 and why),
and while it is empty the registry is tried again at most every `model_retry_seconds`.

Swapping (`ModelSlot.refresh` / `activate`): the new version is loaded and warmed beside the old one,
then `ModelSlot.current` is replaced in one assignment. Every request takes `slot.current` once at its
start and carries that `LoadedModel` through preprocessing and the batcher, so requests in flight finish
on the session they started with; the old session is freed when the last of them lets go of it.

Device policy (`WBC_DEVICE`): `cpu`; `auto` = TensorRT, else CUDA, when this ONNX Runtime offers them
and the session really runs on them, else CPU; `cuda` = a GPU provider or `DeviceUnavailableError`,
which stops start-up (never a silent CPU fallback).
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


class DeviceUnavailableError(ModelLoadError):
    """WBC_DEVICE=cuda but no GPU provider can run the model: the service must not start on the CPU."""


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
INT8 = "int8"


# ---- session options ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SessionConfig:
    """What the session is built with; recorded so /v2/health/ready and the log can say it.

    Defaults suit a small CPU box (2 cores here): one intra-op thread per usable core, no inter-op
    parallelism (CNN graphs are a chain), all graph optimisations, and no spin-waiting so idle
    inference threads do not steal the cores that decode and preprocess the next request.
    `providers` is what is asked for, in preference order; `Classifier.provider` is what ORT granted.
    """

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"
    allow_spinning: bool = False
    device: str = "cpu"  # the policy the providers came from: cpu | auto | cuda
    trt_cache: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SessionConfig:
        return cls(
            providers=providers_for(settings.device),
            intra_op_threads=settings.onnx_intra_op_threads,
            inter_op_threads=settings.inter_op_threads,
            graph_optimization=settings.graph_optimization,
            allow_spinning=settings.ort_spinning,
            device=settings.device,
            trt_cache=str(settings.trt_cache),
        )

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = _OPTIMIZATION_LEVELS[self.graph_optimization]
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.log_severity_level = 3  # errors only: ORT's warnings about unused initialisers are noise
        return options

    def provider_options(self) -> list[tuple[str, dict[str, str]]]:
        """Providers with their options: TensorRT caches its engines (building one takes minutes)."""
        chosen = []
        for name in self.providers:
            options: dict[str, str] = {}
            if name == "TensorrtExecutionProvider" and self.trt_cache:
                Path(self.trt_cache).mkdir(parents=True, exist_ok=True)
                options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": self.trt_cache,
                           "trt_timing_cache_enable": "True"}
            chosen.append((name, options))
        return chosen

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
    """Execution providers to ask for under the device policy, best first (CPU last as ORT requires).

    Whether a GPU really answers is known only when a session is built (onnxruntime-gpu lists CUDA even
    on a machine without one); `Classifier` checks what it was granted against the policy.
    """
    available = ort.get_available_providers()
    if device == "cpu":
        return ("CPUExecutionProvider",)
    gpu = tuple(p for p in GPU_PROVIDERS if p in available)
    if not gpu and device == "cuda":
        raise DeviceUnavailableError(
            f"WBC_DEVICE=cuda but this ONNX Runtime offers only {available}: install the gpu extra "
            "(onnxruntime-gpu), or set WBC_DEVICE=auto or cpu"
        )
    return (*gpu, "CPUExecutionProvider")


# ---- the classifier ----------------------------------------------------------------------------------------
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
        self.session = self._open(source)
        self.provider = self.session.get_providers()[0]
        if self.config.device == "cuda" and self.provider not in GPU_PROVIDERS:
            raise DeviceUnavailableError(
                f"{source}: WBC_DEVICE=cuda but ONNX Runtime granted only {self.session.get_providers()} "
                "(no usable GPU, or its CUDA/cuDNN libraries are missing)"
            )
        self.contract = read_contract(self.session, source)
        self.static_batch = check_graph(self.session, self.contract, source)
        self._check_output_width(source)

    def _open(self, source: str) -> ort.InferenceSession:
        options = self.config.session_options()
        providers = self.config.provider_options()
        try:
            return ort.InferenceSession(source, options, providers=providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            first_error = exc
        # TensorRT is offered by onnxruntime-gpu even where libnvinfer is missing: try without it.
        if any(name == "TensorrtExecutionProvider" for name, _ in providers):
            try:
                session = ort.InferenceSession(
                    source, options, providers=[p for p in providers if p[0] != "TensorrtExecutionProvider"]
                )
                log.warning("%s: TensorRT refused the model (%s); using %s", source, first_error,
                            session.get_providers()[0])
                return session
            except Exception:
                pass
        raise ModelLoadError(f"{source}: ONNX Runtime cannot load it: {first_error}") from None

    @property
    def input_type(self) -> str:
        return self.session.get_inputs()[0].type  # 'tensor(float)'

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

    def warm(self, max_batch_size: int) -> None:
        """Run the batch sizes the batcher will form first, so the first requests do not pay for
        allocations (and, on a GPU, kernel selection)."""
        s = self.contract.input_size
        for n in sorted({1, min(2, max_batch_size), max_batch_size}):
            self.logits(np.zeros((n, 3, s, s), dtype=np.float32))

    def predict(self, arrays: Sequence[np.ndarray] | np.ndarray) -> list[Prediction]:
        """Preprocessed images (each (3, S, S), or one (N, 3, S, S) array) → one Prediction each, in order."""
        if len(arrays) == 0:
            return []
        batch = arrays if isinstance(arrays, np.ndarray) else np.stack(arrays)
        return self.predictions_from(self.probabilities(batch))

    def predictions_from(self, probs: np.ndarray) -> list[Prediction]:
        """Probability rows → Predictions, abstaining below the contract's threshold."""
        names = self.contract.class_names
        threshold = self.contract.abstain_threshold
        predictions = []
        for row in probs:
            top = int(np.argmax(row))
            confidence = float(row[top])
            label = names[top] if confidence >= threshold else UNIDENTIFIED
            predictions.append(Prediction(label, confidence, {n: float(p) for n, p in zip(names, row)}))
        return predictions


# ---- what the app serves -----------------------------------------------------------------------------------
def variant_of(info: VersionInfo) -> str:
    """'int8' for a quantized variant registered by models.quantize, else 'fp32'."""
    return str(info.metadata.get("variant", "fp32"))


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

    @property
    def provider(self) -> str:
        return self.classifier.provider

    @property
    def precision(self) -> str:
        return variant_of(self.info)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "version": self.version,
            "architecture": self.contract.architecture,
            "classes": list(self.contract.class_names),
            "input_size": self.contract.input_size,
            "abstain_threshold": self.contract.abstain_threshold,
            "precision": self.precision,
            "provider": self.provider,
            "path": str(self.info.onnx_path),
            "sha256": self.info.sha256,
            "loaded_at": self.loaded_at,
            "session": self.classifier.config.describe(),
        }


def resolve_target(registry: Registry, reference: str | None, precision: str) -> VersionInfo:
    """The version to serve: `reference` as Registry.resolve reads it, then the precision policy.

    'latest' (and an unset reference without a production alias) means the newest fp32 version, never
    an INT8 variant that happens to be newer; with precision int8 the newest INT8 variant quantized
    from the resolved version is served (a reference that names a variant directly is served as it is).
    """
    try:
        aliases = registry.aliases()
        follows_latest = reference == "latest" or (reference is None and aliases.get("production") is None)
        if follows_latest:
            plain = [v for v in registry.versions() if variant_of(v) == "fp32"]
            if not plain:
                raise RegistryError(f"{registry.model_name}: no versions in {registry.root}")
            info = plain[-1]
        else:
            info = registry.resolve(reference)
    except RegistryError as exc:
        raise ModelLoadError(str(exc)) from None
    return apply_precision(registry, info, precision)


def apply_precision(registry: Registry, info: VersionInfo, precision: str) -> VersionInfo:
    if precision != INT8 or variant_of(info) == INT8:
        return info
    variants = [
        v for v in registry.versions()
        if variant_of(v) == INT8 and v.metadata.get("quantization", {}).get("source_version") == info.version
    ]
    if not variants:
        raise ModelLoadError(
            f"{registry.model_name} v{info.version}: WBC_PRECISION=int8 but no INT8 variant of it is "
            f"registered (python -m models.quantize --registry {registry.root} --version {info.version})"
        )
    return variants[-1]


def load_version(info: VersionInfo, settings: Settings) -> LoadedModel:
    """Check the checksum, build the session, cross-check contracts, warm it."""
    if settings.verify_sha256:
        try:
            info.verify()
        except RegistryError as exc:  # IntegrityError
            raise ModelLoadError(str(exc)) from None
    classifier = Classifier(info.onnx_path, SessionConfig.from_settings(settings))
    recorded = info.contract
    if classifier.contract != recorded:
        raise ContractMismatchError(
            f"{info.onnx_path}: the contract in the file differs from the one in "
            f"{info.path / 'metadata.json'}"
        )
    classifier.warm(settings.max_batch_size)
    return LoadedModel(classifier, info)


def load_from_registry(settings: Settings, reference: str | None = None) -> LoadedModel:
    """Resolve the configured version (or `reference`) under the precision policy and load it."""
    registry = Registry(settings.registry, settings.model_name)
    reference = reference if reference is not None else settings.version
    info = resolve_target(registry, reference, settings.precision)
    return load_version(info, settings)


@dataclass(frozen=True)
class SwapResult:
    changed: bool
    previous: dict[str, Any] | None  # {"version", "sha256"} of what was served before
    current: dict[str, Any]
    reason: str
    seconds: float  # load + warm time

    def as_dict(self) -> dict[str, Any]:
        return {"changed": self.changed, "previous": self.previous, "current": self.current,
                "reason": self.reason, "load_seconds": round(self.seconds, 3)}


def _identity(model: LoadedModel | None) -> dict[str, Any] | None:
    if model is None:
        return None
    return {"version": model.version, "precision": model.precision, "sha256": model.info.sha256}


class ModelSlot:
    """The model being served (or None, with the reason), loaded from the registry on demand.

    `reference` is what the slot follows: None (the production alias, else the latest version), an
    alias, 'latest' or a pinned number (WBC_VERSION). `refresh()` re-resolves it and swaps when the
    answer changed: the registry watch and the admin endpoints both go through it.
    """

    def __init__(self, settings: Settings, on_load: Callable[[LoadedModel], None] | None = None):
        self.settings = settings
        self.on_load = on_load
        self.reference: str | None = settings.version
        self.registry = Registry(settings.registry, settings.model_name)
        self.current: LoadedModel | None = None
        self.last_error: str | None = "not loaded yet"
        self.swaps: list[dict[str, Any]] = []  # this process's swaps, newest last (bounded)
        self._last_attempt = float("-inf")
        self._lock = threading.Lock()  # one load or swap at a time

    @property
    def pinned(self) -> bool:
        """True when the slot follows a fixed version number rather than an alias or 'latest'."""
        return self.reference is not None and self.reference.isdigit()

    def load(self) -> LoadedModel | None:
        """Blocking; call from a worker thread. Keeps the slot empty (with the reason) when it fails.

        A DeviceUnavailableError propagates: with WBC_DEVICE=cuda the process must not start on the CPU."""
        with self._lock:
            self._last_attempt = time.monotonic()
            try:
                loaded = load_from_registry(self.settings, self.reference)
            except DeviceUnavailableError:
                self.last_error = "WBC_DEVICE=cuda and no GPU provider"
                raise
            except ModelLoadError as exc:
                self.last_error = str(exc)
                log.error("no model served: %s", exc)
                return None
            except Exception as exc:  # e.g. a metadata.json without a valid contract: stay up, say why
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("no model served: unexpected error while loading")
                return None
            self._install(loaded, "start")
            return loaded

    def ensure_loaded(self) -> LoadedModel | None:
        """The current model; when there is none, retry the registry if the retry interval has passed."""
        if self.current is not None:
            return self.current
        if time.monotonic() - self._last_attempt >= self.settings.model_retry_seconds:
            return self.load()
        return None

    def follows(self, alias: str) -> bool:
        """Whether moving `alias` changes what this slot serves."""
        return self.reference == alias or (self.reference is None and alias == "production")

    def refresh(self, reason: str = "refresh") -> SwapResult:
        """Re-resolve the reference; load, warm and switch to it if it is not what is served.

        Raises ModelLoadError (the served model stays) when the target cannot be loaded."""
        with self._lock:
            info = resolve_target(self.registry, self.reference, self.settings.precision)
            return self._swap_to(info, reason)

    def move_alias(self, alias: str, version: int, *, reason: str, actor: str) -> SwapResult:
        """Point `alias` at `version` (promotion, rollback) and serve it if this slot follows the alias.

        The version is loaded and warmed before the alias moves: a version that cannot be served
        leaves both the alias and the served model as they were (ModelLoadError). RegistryError when
        the version does not exist."""
        with self._lock:
            info = self.registry.get(version)
            follows = self.follows(alias)
            target = apply_precision(self.registry, info, self.settings.precision) if follows else None
            loaded = None
            start = time.perf_counter()
            if target is not None and not self._is_current(target):
                loaded = load_version(target, self.settings)
            self.registry.set_alias(alias, version, reason=reason, actor=actor)
            current = self.current
            if loaded is None:
                return SwapResult(False, _identity(current), _identity(current), reason, 0.0)
            self._install(loaded, reason)
            seconds = time.perf_counter() - start
            return SwapResult(True, _identity(current), _identity(loaded), reason, seconds)

    def previous_production(self) -> int | None:
        """The version production pointed at before its current one (for a rollback without a version)."""
        aliases = self.registry.aliases()
        now = aliases.get("production")
        for entry in reversed(aliases.get("history", [])):
            if entry.get("alias") != "production" or entry.get("from") is None:
                continue
            if entry.get("to") == now:
                return int(entry["from"])
        return None

    def _is_current(self, info: VersionInfo) -> bool:
        current = self.current
        return current is not None and current.version == info.version and current.info.sha256 == info.sha256

    def _swap_to(self, info: VersionInfo, reason: str) -> SwapResult:
        current = self.current
        if self._is_current(info):
            return SwapResult(False, _identity(current), _identity(current), reason, 0.0)
        start = time.perf_counter()
        loaded = load_version(info, self.settings)
        self._install(loaded, reason)
        return SwapResult(True, _identity(current), _identity(loaded), reason, time.perf_counter() - start)

    def _install(self, loaded: LoadedModel, reason: str) -> None:
        previous = self.current
        self.current, self.last_error = loaded, None  # the switch: one assignment
        if self.on_load is not None:
            self.on_load(loaded)
        self.swaps = [*self.swaps[-49:], {"at": loaded.loaded_at, "reason": reason,
                                          "from": _identity(previous), "to": _identity(loaded)}]
        log.info("serving %s v%d (%s, %s on %s) [%s] with %s", loaded.name, loaded.version,
                 loaded.contract.architecture, loaded.precision, loaded.provider, reason,
                 loaded.classifier.config.describe())
