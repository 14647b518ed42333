"""The service's settings: one `Settings(BaseSettings)`, read from `WBC_*` environment variables and
validated once at start-up (a bad value stops the process before it binds a port)."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import ALIASES, DEFAULT_MODEL_NAME

MiB = 1024 * 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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

    precision: Literal["fp32", "int8"] = Field(
        "fp32",
        description="int8: serve the INT8 variant registered for the resolved version (models.quantize); "
        "a version that is itself a variant is served as it is",
    )
    watch_seconds: float = Field(
        0.0, ge=0.0, description="Poll the registry this often and swap when the resolved version changes; 0 = off"
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token for /v1/admin/*; unset = admin endpoints answer 403"
    )

    # ---- ONNX Runtime ----------------------------------------------------------------------------
    # auto: TensorRT, else CUDA, when the installed ONNX Runtime offers them and a GPU answers; else CPU.
    # cuda: a GPU provider or the process refuses to start (never a silent CPU fallback).
    device: Literal["auto", "cuda", "cpu"] = "auto"
    trt_cache: Path = Field(Path("var/trt-cache"), description="TensorRT engine cache (device=auto/cuda)")
    # Measured on 2 cores under 32 clients (docs/performance.md): one inference thread and three
    # preprocessing workers beat two + two (preprocessing costs more CPU per image than inference).
    intra_op_threads: int = Field(0, ge=0, description="0 = a third of the usable cores, at least 1")
    inter_op_threads: int = Field(1, ge=1, description="Parallelism between graph nodes; 1 for CNNs")
    graph_optimization: Literal["disable", "basic", "extended", "all"] = "all"
    ort_spinning: bool = Field(
        False, description="Let idle ONNX Runtime threads spin-wait (lower latency, burns the cores "
        "that preprocess the next images)"
    )

    # ---- the size opinion (models.size_prior) ---------------------------------------------------------
    site_cell_diameter: float | None = Field(
        None, gt=0.0,
        description="This site's reference cell diameter in pixels of its images: the median of the cells the "
        "served version calls neutrophils (`wbc data site-scale DIR --version V` measures it, no labels "
        "needed); with it, a model whose contract carries a size prior combines the cell's relative size "
        "with the network's answer. Unset = the network's answer alone",
    )
    # ---- the granule opinion (models.granule_prior) ---------------------------------------------------
    site_granule_reference: float | None = Field(
        None, ge=-10.0, le=10.0,
        description="This site's reference granule density: the median over the cells the served version "
        "calls neutrophils (`wbc data site-scale` measures it with the diameter); with it, a model whose "
        "contract carries a granule prior weighs the cell's granule density too. Unset = no granule opinion",
    )

    # ---- dynamic batching -------------------------------------------------------------------------
    # 4: on a 2-core x86 CPU, EfficientNet-Lite0 at 224 px costs 4.9-5.2 ms of CPU per image at batch
    # 1-4 and 7.3 ms at 32 (docs/performance.md); on a GPU use 32 or more.
    max_batch_size: int = Field(4, ge=1, le=1024, description="Images per ONNX Runtime run")
    max_queue_delay_ms: float = Field(
        0.0, ge=0.0, le=1000.0,
        description="How long a batch may wait for more images once the runner is free; 0 = run what is "
        "queued at once (images pile up while a batch runs, so batches still form under load)",
    )
    max_queue_images: int = Field(512, ge=1, description="Images waiting for inference before requests get 503")
    preprocess_threads: int = Field(0, ge=0, description="Decode + preprocess workers; 0 = usable cores + 1")

    # ---- input limits -----------------------------------------------------------------------------
    max_files: int = Field(32, ge=1, description="Files per request")
    max_file_bytes: int = Field(16 * MiB, ge=1, description="Bytes per uploaded file")
    max_request_bytes: int = Field(64 * MiB, ge=1, description="Bytes per request body, all files together")
    max_pixels: int = Field(25_000_000, ge=1, description="Width x height per image, checked before decoding")
    rate_limit: str | None = Field(
        None,
        description="Requests per credential (per client address without one), e.g. '20/second;1000/minute'; "
        "over it: 429 + Retry-After (service.ratelimit). Unset = no limit; probes and /metrics never limited",
    )

    # ---- review loop: database, stored cells, accounts, audit (service/review, service/auth.py) ---------
    site: str = Field(
        "local",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="This site's name; cells are recorded under it (wbc review export --site)",
    )
    database_url: SecretStr = Field(
        SecretStr("sqlite:///var/wbc.db"),
        description="SQLAlchemy URL; postgresql://user:pw@host/db for deployments",
    )
    image_store: Path = Field(
        Path("var/cells"), description="Where classified images are kept (they never leave the site)"
    )
    record_predictions: bool = Field(True, description="Store every classified cell for review and audit")
    auth_required: bool | None = Field(
        None,
        description="Credentials on every API and page; unset = required unless bound to a loopback host",
    )
    session_hours: float = Field(12.0, gt=0, description="Lifetime of a reviewer's browser session")
    secure_cookies: bool = Field(False, description="Mark the session cookie Secure (set behind HTTPS)")
    audit_key: SecretStr | None = Field(
        None, description="HMAC key of the audit chain (keep it outside the database)"
    )
    low_confidence: float = Field(
        0.7, gt=0.0, le=1.0, description="Below this, a cell shows as low confidence"
    )
    review_extra_labels: str = Field(
        "",
        description="Comma-separated labels reviewers may give besides the model's classes "
        "(e.g. erythroblast,ig,platelet)",
    )

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

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_parses(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from service.ratelimit import parse_rate_limit

        parse_rate_limit(value)  # a bad value stops the start, with an example of a good one
        return value.strip()

    @model_validator(mode="after")
    def _request_holds_a_file(self) -> Settings:
        if self.max_request_bytes < self.max_file_bytes:
            raise ValueError("max_request_bytes must be at least max_file_bytes")
        return self

    @model_validator(mode="after")
    def _no_open_service_beyond_loopback(self) -> Settings:
        if self.auth_required is False and not is_loopback(self.host):
            raise ValueError(f"WBC_AUTH_REQUIRED=false is only allowed on a loopback host, not {self.host!r}")
        return self

    @property
    def auth_enabled(self) -> bool:
        return self.auth_required if self.auth_required is not None else not is_loopback(self.host)

    @property
    def extra_review_labels(self) -> tuple[str, ...]:
        return tuple(label.strip() for label in self.review_extra_labels.split(",") if label.strip())

    @property
    def onnx_intra_op_threads(self) -> int:
        return self.intra_op_threads or max(1, usable_cores() // 3)

    @property
    def preprocess_workers(self) -> int:
        return self.preprocess_threads or usable_cores() + 1
