"""Versioned model registry laid out as a Triton model repository.

    <root>/<model>/config.pbtxt           Triton config (ONNX Runtime backend, dynamic batching)
    <root>/<model>/labels.txt             class names, one per line, in output order
    <root>/<model>/aliases.json           {"production": N, "candidate": M, "history": [...]}
    <root>/<model>/<N>/model.onnx         the graph, contract in its metadata
    <root>/<model>/<N>/metadata.json      lineage, metrics, contract, sha256, created time

A version is staged in `<root>/.staging/` and renamed into place only when complete (write, fsync,
rename), so a crash never leaves a half version: a folder counts as a version only if it holds both
files and its metadata parses.

metadata.json carries what the caller passes plus what the registry adds (`model_name`, `version`,
`contract`, `sha256`, `size_bytes`, `created`). The federation passes:
    lineage:  {run_id, round, strategy, strategy_params, sites: [{site, num_examples}],
               parent_version, weight_source, seed}
    metrics:  {pooled_val: <Metrics.as_dict()>, per_site_val: {site: <Metrics.as_dict()>}}
    gate:     {decision: "accepted", reason}
    parity:   {max_abs_diff, n_images}
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from models.contract import ONNX_METADATA_KEY, ModelContract

DEFAULT_MODEL_NAME = "wbc-classifier"
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# The trained network's state dict (safetensors) beside the ONNX file: what `wbc adapt` fine-tunes from.
# Triton and the service ignore it; versions registered before it existed simply lack it.
WEIGHTS_FILE = "weights.safetensors"
ALIASES_FILE = "aliases.json"
ALIASES = ("candidate", "production")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class RegistryError(RuntimeError):
    """The registry cannot do what was asked; the message says why."""


class IntegrityError(RegistryError):
    """A version's file does not match the checksum recorded when it was registered."""


def default_registry_root() -> Path:
    return Path(os.environ.get("WBC_REGISTRY", "var/registry")).expanduser().resolve()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file so that readers see either the old or the new content, never a mix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class VersionInfo:
    model_name: str
    version: int
    path: Path
    metadata: dict[str, Any]

    @property
    def onnx_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def contract(self) -> ModelContract:
        return ModelContract.model_validate(self.metadata["contract"])

    @property
    def sha256(self) -> str:
        return self.metadata["sha256"]

    @property
    def weights_path(self) -> Path | None:
        """The network weights registered with this version, if it has them (checked like the ONNX file)."""
        path = self.path / WEIGHTS_FILE
        return path if WEIGHTS_FILE in self.metadata.get("files", {}) else None

    def verify_weights(self) -> Path:
        path = self.weights_path
        if path is None:
            raise RegistryError(
                f"{self.model_name} v{self.version} was registered without its network weights "
                f"({WEIGHTS_FILE}); only versions registered since weights are kept can be adapted"
            )
        actual = sha256_file(path)
        if actual != self.metadata["files"][WEIGHTS_FILE]:
            raise IntegrityError(
                f"{self.model_name} v{self.version}: {WEIGHTS_FILE} sha256 {actual[:12]}… does not match the "
                f"registered {self.metadata['files'][WEIGHTS_FILE][:12]}…; refusing to use a modified file"
            )
        return path

    def verify(self) -> None:
        """Raise IntegrityError unless model.onnx still has the checksum recorded at registration."""
        actual = sha256_file(self.onnx_path)
        if actual != self.sha256:
            raise IntegrityError(
                f"{self.model_name} v{self.version}: model.onnx sha256 {actual[:12]}… does not match "
                f"the registered {self.sha256[:12]}…; refusing to load a modified file"
            )


def _config_pbtxt(model_name: str, contract: ModelContract, max_batch_size: int = 32) -> str:
    """Triton config for the same files, so ops can point Triton or KServe at this registry."""
    s = contract.input_size
    return f"""name: "{model_name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{ name: "input", data_type: TYPE_FP32, dims: [ 3, {s}, {s} ] }}
]
output [
  {{ name: "logits", data_type: TYPE_FP32, dims: [ {contract.num_classes} ], label_filename: "labels.txt" }}
]
dynamic_batching {{ max_queue_delay_microseconds: 2000 }}
version_policy: {{ all {{ }} }}
"""


def _stamp_contract(onnx_bytes: bytes, contract: ModelContract) -> bytes:
    """Rewrite the contract in the ONNX metadata so the file names its own model and version."""
    import onnx  # training-side dependency; the service only reads

    model = onnx.load_from_string(onnx_bytes)
    props = {p.key: p.value for p in model.metadata_props}
    props[ONNX_METADATA_KEY] = contract.to_json()
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


class Registry:
    def __init__(self, root: str | Path | None = None, model_name: str = DEFAULT_MODEL_NAME):
        if not _MODEL_NAME_RE.match(model_name):
            raise RegistryError(f"invalid model name {model_name!r} (letters, digits, . _ -; max 64)")
        self.root = Path(root).expanduser().resolve() if root else default_registry_root()
        self.model_name = model_name
        self.model_dir = self.root / model_name

    # ---- reading -------------------------------------------------------------------------------
    def _version_dirs(self) -> Iterator[tuple[int, Path]]:
        if not self.model_dir.is_dir():
            return
        for child in self.model_dir.iterdir():
            if child.is_dir() and child.name.isdigit() and not child.name.startswith("0"):
                yield int(child.name), child

    def versions(self) -> list[VersionInfo]:
        """Whole versions only, oldest first (a folder without both files or readable metadata is skipped)."""
        found = []
        for number, path in sorted(self._version_dirs()):
            meta_path, onnx_path = path / METADATA_FILE, path / MODEL_FILE
            if not (meta_path.is_file() and onnx_path.is_file()):
                continue
            try:
                metadata = json.loads(meta_path.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if metadata.get("version") != number or "sha256" not in metadata:
                continue
            found.append(VersionInfo(self.model_name, number, path, metadata))
        return found

    def latest(self) -> VersionInfo | None:
        versions = self.versions()
        return versions[-1] if versions else None

    def get(self, version: int) -> VersionInfo:
        for info in self.versions():
            if info.version == version:
                return info
        raise RegistryError(f"{self.model_name}: no version {version} in {self.root}")

    def aliases(self) -> dict[str, Any]:
        path = self.model_dir / ALIASES_FILE
        if not path.is_file():
            return {"history": []}
        return json.loads(path.read_text())

    def resolve(self, ref: str | int | None = None) -> VersionInfo:
        """A version by number, alias ('production', 'candidate') or 'latest' (None = production, else latest)."""
        if ref is None:
            production = self.aliases().get("production")
            ref = production if production is not None else "latest"
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return self.get(int(ref))
        if ref == "latest":
            info = self.latest()
            if info is None:
                raise RegistryError(f"{self.model_name}: no versions in {self.root}")
            return info
        if ref in ALIASES:
            number = self.aliases().get(ref)
            if number is None:
                raise RegistryError(f"{self.model_name}: alias {ref!r} is not set")
            return self.get(int(number))
        raise RegistryError(f"unknown version reference {ref!r} (a number, 'latest', or one of {ALIASES})")

    # ---- writing -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.model_dir.mkdir(parents=True, exist_ok=True)
        with (self.model_dir / ".lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def register(
        self,
        onnx_path: str | Path,
        contract: ModelContract,
        metadata: dict[str, Any],
        extra_files: dict[str, bytes] | None = None,
    ) -> VersionInfo:
        """Add the file as the next version, atomically; returns the new version. `extra_files` (name →
        bytes, e.g. WEIGHTS_FILE) are written into the same version folder, their checksums recorded."""
        extra_files = dict(extra_files or {})
        reserved = {MODEL_FILE, METADATA_FILE} & set(extra_files)
        if reserved or any("/" in n or n.startswith(".") for n in extra_files):
            raise RegistryError(f"extra files may not be named {sorted(extra_files)}")
        onnx_bytes = Path(onnx_path).read_bytes()
        staging_root = self.root / ".staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            existing = [n for n, _ in self._version_dirs()]
            number = max(existing, default=0) + 1
            stamped = contract.with_updates(model_name=self.model_name, version=number)
            final_bytes = _stamp_contract(onnx_bytes, stamped)
            record = {
                **metadata,
                "model_name": self.model_name,
                "version": number,
                "contract": stamped.model_dump(mode="json"),
                "sha256": hashlib.sha256(final_bytes).hexdigest(),
                "size_bytes": len(final_bytes),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if extra_files:
                record["files"] = {n: hashlib.sha256(b).hexdigest() for n, b in sorted(extra_files.items())}
            stage = staging_root / f"{self.model_name}-{number}-{uuid.uuid4().hex[:8]}"
            stage.mkdir()
            try:
                files = ((MODEL_FILE, final_bytes), *extra_files.items(), (METADATA_FILE, _json_bytes(record)))
                for name, data in files:
                    with (stage / name).open("wb") as fh:
                        fh.write(data)
                        fh.flush()
                        os.fsync(fh.fileno())
                _fsync_dir(stage)
                os.rename(stage, self.model_dir / str(number))
                _fsync_dir(self.model_dir)
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            write_atomic(self.model_dir / "config.pbtxt", _config_pbtxt(self.model_name, stamped).encode())
            write_atomic(self.model_dir / "labels.txt", ("\n".join(stamped.class_names) + "\n").encode())
        return self.get(number)

    def set_alias(
        self, alias: str, version: int, *, reason: str = "", actor: str = "system", action: str = "set"
    ) -> dict[str, Any]:
        """Point an alias at a version; every change is appended to the alias history (for rollback).

        `action` ("set", "candidate", "promote", "rollback") lets `models.lifecycle` replay the history.
        """
        if alias not in ALIASES:
            raise RegistryError(f"unknown alias {alias!r}; one of {ALIASES}")
        with self._lock():
            self.get(version)  # must exist
            state = self.aliases()
            previous = state.get(alias)
            state[alias] = version
            state.setdefault("history", []).append(
                {
                    "alias": alias,
                    "from": previous,
                    "to": version,
                    "reason": reason,
                    "actor": actor,
                    "action": action,
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                }
            )
            write_atomic(self.model_dir / ALIASES_FILE, _json_bytes(state))
        return state

    def delete_version(self, version: int, *, protected: set[int] | frozenset[int] = frozenset()) -> None:
        """Remove one version (moved out of the model folder first, so readers never see half of it).

        Refused for a version an alias points at (checked under the lock) or one listed in `protected`.
        """
        with self._lock():
            aliases = self.aliases()
            aliased = {int(aliases[a]) for a in ALIASES if aliases.get(a) is not None}
            if version in aliased or version in protected:
                raise RegistryError(f"{self.model_name} v{version} is aliased or protected; not deleted")
            path = self.get(version).path
            trash = self.root / ".staging" / f"{self.model_name}-deleted-{version}-{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, trash)
            _fsync_dir(self.model_dir)
        shutil.rmtree(trash, ignore_errors=True)

    def clean_staging(self) -> int:
        """Remove leftovers of interrupted registrations; returns how many."""
        staging_root = self.root / ".staging"
        if not staging_root.is_dir():
            return 0
        removed = 0
        with self._lock():
            for child in staging_root.iterdir():
                if child.name.startswith(f"{self.model_name}-"):
                    shutil.rmtree(child, ignore_errors=True)
                    removed += 1
        return removed


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()
