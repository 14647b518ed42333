"""The service's settings: one `Settings(BaseSettings)`, read from `WBC_*` environment variables and
validated once at start-up (a bad value stops the process before it binds a port)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import ALIASES, DEFAULT_MODEL_NAME

MiB = 1024 * 1024


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow), not the host's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WBC_", env_file=".env", extra="ignore")

    # ---- which model -------------------------------------------------------------------------
    registry: Path = Field(Path("var/registry"), description="Registry root (Triton layout)")
    model_name: str = Field(DEFAULT_MODEL_NAME, description="Model name inside the registry")
    version: str | None = Field(
        None,
        description="A version number, 'latest', 'production' or 'candidate'; "
        "unset = the 'production' alias when set, else the latest version",
    )
    verify_sha256: bool = Field(True, description="Refuse a model.onnx whose checksum changed")
    model_retry_seconds: float = Field(
        10.0, ge=0.0, description="While no model is loaded, try the registry again at most this often"
    )

    # ---- where ----------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)

    # ---- ONNX Runtime ----------------------------------------------------------------------------
    # Placeholder for the device policy: 'cpu' now; 'auto' takes CUDA when the installed ONNX Runtime
    # offers it; 'cuda' refuses to start without it.
    device: Literal["cpu", "auto", "cuda"] = "cpu"
    intra_op_threads: int = Field(0, ge=0, description="0 = one per usable core")
    inter_op_threads: int = Field(1, ge=1, description="Parallelism between graph nodes; 1 for CNNs")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"

    # ---- input limits -----------------------------------------------------------------------------
    max_files: int = Field(32, ge=1, description="Files per request")
    max_file_bytes: int = Field(16 * MiB, ge=1, description="Bytes per uploaded file")
    max_request_bytes: int = Field(64 * MiB, ge=1, description="Bytes per request body, all files together")
    max_pixels: int = Field(25_000_000, ge=1, description="Width x height per image, checked before decoding")

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value: object) -> object:
        if isinstance(value, int):
            return str(value)
        if isinstance(value, str):
            value = value.strip()
            if not value:
                return None
            if not (value.isdigit() or value in ("latest", *ALIASES)):
                raise ValueError(f"version {value!r}: a number, 'latest' or one of {ALIASES}")
        return value

    @model_validator(mode="after")
    def _request_holds_a_file(self) -> Settings:
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError("max_request_bytes must be at least max_file_bytes")
        return self

    @property
    def onnx_intra_op_threads(self) -> int:
        return self.intra_op_threads or usable_cores()
