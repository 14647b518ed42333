"""Accepted round → ONNX (contract inside) → parity on real images → next registry version.

A version is registered only when ONNX Runtime agrees with PyTorch on real images within `atol` on every
class probability; otherwise the outcome says why and nothing is written to the registry.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from federation.sites import MANIFEST, DataRoot
from models.contract import ModelContract
from models.registry import WEIGHTS_FILE

PARITY_ATOL = 1e-4
PARITY_IMAGE_COUNT = 8
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def find_parity_images(
    source: str | Path, contract: ModelContract, limit: int = PARITY_IMAGE_COUNT
) -> list[Path]:
    """A few images from a data root (spread over the contract's classes) or from a plain folder."""
    root = Path(source)
    if (root / MANIFEST).is_file():
        samples = DataRoot(root).select(classes=contract.class_names)
        groups: dict[tuple[str, str], list[Path]] = {}
        for s in samples:
            groups.setdefault((s.label, s.site), []).append(s.path)
        picked: list[Path] = []
        # Round-robin over (class, site) so the check sees several kinds of cell and of camera.
        while len(picked) < limit and any(groups.values()):
            for key in sorted(groups):
                if groups[key] and len(picked) < limit:
                    picked.append(groups[key].pop(0))
        return picked
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
        return files[:limit]
    raise FileNotFoundError(f"parity images: {root} is neither a data root nor a folder")


def load_images(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as img:
            img.load()
            images.append(img)
    return images


@dataclass
class PublishOutcome:
    status: str  # "registered" | "parity-failed" | "export-failed" | "register-failed"
    reason: str
    version: int | None = None
    path: str | None = None
    sha256: str | None = None
    parity: dict[str, Any] = field(default_factory=dict)

    @property
    def registered(self) -> bool:
        return self.status == "registered"

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "version": self.version,
            "path": self.path,
            "sha256": self.sha256,
            "parity": self.parity,
        }


class Publisher:
    """Exports a global model and registers it; one instance per run (holds the model skeleton)."""

    def __init__(
        self,
        *,
        registry_root: str | Path,
        model_name: str,
        contract: ModelContract,
        model: Any,  # torch.nn.Module built from the contract; weights are replaced per call
        parity_images: list[Path],
        work_dir: str | Path,
        atol: float = PARITY_ATOL,
    ):
        from models.registry import Registry

        self.registry = Registry(registry_root, model_name)
        self.contract = contract
        self.model = model
        self.parity_paths = list(parity_images)
        self.images = load_images(self.parity_paths)
        self.work_dir = Path(work_dir)
        self.atol = atol

    def publish(
        self, state_dict: dict[str, Any], metadata: dict[str, Any], contract: ModelContract | None = None
    ) -> PublishOutcome:
        """`contract`: this version's contract when it differs from the run's (the fitted temperature and
        abstain threshold); the network input and classes must be the run's."""
        from models.export import check_parity, export_onnx

        contract = contract or self.contract
        self.model.load_state_dict(state_dict, strict=True)
        self.model.eval()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="export-", dir=self.work_dir))
        try:
            onnx_path = tmp / "model.onnx"
            try:
                export_onnx(self.model, contract, onnx_path)
            except Exception as exc:  # noqa: BLE001 - recorded in the round record; the run goes on
                return PublishOutcome("export-failed", f"ONNX export failed: {type(exc).__name__}: {exc}")
            report = check_parity(self.model, onnx_path, self.images, contract, atol=self.atol)
            parity = {**report.as_dict(), "images": [str(p) for p in self.parity_paths]}
            if not report.ok:
                why = "; ".join(report.problems) or f"max |Δprob| {report.max_abs_diff:.2e} > {self.atol:g}"
                return PublishOutcome("parity-failed", f"parity check failed: {why}", parity=parity)
            try:
                info = self.registry.register(
                    onnx_path, contract, {**metadata, "parity": parity}, {WEIGHTS_FILE: self._weights_bytes()}
                )
            except Exception as exc:  # noqa: BLE001 - the same: recorded, not fatal
                return PublishOutcome(
                    "register-failed", f"registry refused: {type(exc).__name__}: {exc}", parity=parity
                )
            return PublishOutcome(
                "registered",
                f"registered as {info.model_name} v{info.version}",
                version=info.version,
                path=str(info.path),
                sha256=info.sha256,
                parity=parity,
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _weights_bytes(self) -> bytes:
        from safetensors.torch import save

        return save({k: v.detach().contiguous() for k, v in self.model.state_dict().items()})  # copied into bytes
