"""The model contract: the one object that must agree between training, export and serving.

Training builds its transforms only from it, export writes it into the ONNX file's metadata, and the
service rebuilds it from the ONNX file it loads. There is no second copy of class names or mean/std.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Key under which the contract travels inside ONNX `metadata_props` (JSON string).
ONNX_METADATA_KEY = "wbc.contract"
CONTRACT_SCHEMA_VERSION = 1

# The five leukocyte classes shared by every public site, in output order.
SHARED_CLASSES: tuple[str, ...] = ("basophil", "eosinophil", "lymphocyte", "monocyte", "neutrophil")

# The named sets of test-time views a contract may carry (defined in models.test_views.VIEW_SETS).
TestViews = Literal["none", "flips", "dihedral", "turns-zooms"]

# The label the service answers for a cell whose confidence is below the abstain threshold.
UNIDENTIFIED = "unidentified"


class CellCrop(BaseModel):
    """Find the white cell in the crop, centre it and bring it to one scale before the network sees it.

    Sites crop at very different magnifications; `scale` is the side of the output square as a multiple
    of the located cell's diameter.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["nucleus"] = "nucleus"
    scale: float = Field(1.3, gt=0.5, le=6.0)


class SizePrior(BaseModel):
    """Per-class Gaussian of one cell measure relative to its site's reference, pooled from the training
    sites' statistics: the log size (models.size_prior) or the granule density (models.granule_prior);
    `weight` scales its log-likelihood against the network's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mean: tuple[float, ...]
    sd: tuple[float, ...]
    weight: float = Field(2.0, ge=0.0, le=10.0)
    cells: int = Field(0, ge=0, description="training cells the statistics came from")
    # What a site's sizes are relative to: the median of its cells of this class (at a training site its
    # labelled ones, at a deployed site the ones the network calls so), or None: the median of all its cells.
    anchor: str | None = None

    @model_validator(mode="after")
    def _same_length(self) -> SizePrior:
        if len(self.mean) != len(self.sd) or min(self.sd, default=1.0) <= 0:
            raise ValueError("size prior: one positive sd per class mean")
        return self


class ModelContract(BaseModel):
    """Frozen, typed description of a classifier's inputs and outputs (think timm's pretrained_cfg)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: int = CONTRACT_SCHEMA_VERSION
    architecture: str = Field(..., min_length=1, description="timm model name")
    class_names: tuple[str, ...] = Field(..., min_length=2, description="class names in output order")
    input_size: int = Field(..., ge=16, le=1024, description="side of the square network input, pixels")
    resize: Literal["stretch", "pad", "center-crop"] = "stretch"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color: Literal["rgb", "gray"] = "rgb"
    # Colour normalisation on the located cell, before any augmentation: "white-balance" divides by the
    # slide background (removes a site's cast and exposure), "stain" also maps the nucleus to one colour.
    color_norm: Literal["none", "white-balance", "stain"] = "none"
    cell_crop: CellCrop | None = None
    # Low-pass: the framed cell is reduced to `detail` pixels a side (box filter) before the input resize,
    # so the finest texture, which differs with a scanner's optics more than with the cell type, is gone
    # for every site alike. Off by default: it helped full fine-tuning, not the frozen trunk (results.md).
    detail: int | None = Field(None, ge=8, le=1024, description="low-pass side in pixels (None: off)")
    # Test-time views (models.test_views): the exported graph answers the log of the mean softmax over
    # fixed mirrors, quarter turns and re-framings of the input, so every consumer of the file gets the
    # same average.
    test_views: TestViews = "none"
    # Calibration: logits are divided by `temperature` before the softmax; the service answers
    # "unidentified" when the top probability is below `abstain_threshold`.
    temperature: float = Field(1.0, gt=0.0)
    abstain_threshold: float = Field(0.0, ge=0.0, lt=1.0)
    # Relative cell size as a second opinion (models.size_prior); the service applies it when it knows its
    # site's median cell diameter, None: the network alone.
    size_prior: SizePrior | None = None
    # Cytoplasm granule density as a third opinion (models.granule_prior), applied when the service knows
    # its site's reference (the median over its neutrophils); None: not used.
    granule_prior: SizePrior | None = None
    # Set at registration.
    model_name: str | None = None
    version: int | None = None

    @field_validator("class_names")
    @classmethod
    def _unique_classes(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(names)) != len(names):
            raise ValueError(f"class names must be unique: {names}")
        if UNIDENTIFIED in names:
            raise ValueError(f"{UNIDENTIFIED!r} is reserved for abstentions")
        return names

    @field_validator("std")
    @classmethod
    def _positive_std(cls, std: tuple[float, float, float]) -> tuple[float, float, float]:
        if min(std) <= 0:
            raise ValueError("std must be positive")
        return std

    @model_validator(mode="after")
    def _abstain_below_certainty(self) -> ModelContract:
        if self.abstain_threshold and self.abstain_threshold <= 1.0 / len(self.class_names):
            raise ValueError("abstain_threshold at or below chance would never abstain")
        return self

    @model_validator(mode="after")
    def _priors_per_class(self) -> ModelContract:
        for name, prior in (("size", self.size_prior), ("granule", self.granule_prior)):
            if prior is not None and len(prior.mean) != len(self.class_names):
                raise ValueError(f"{name} prior: one Gaussian per class")
            if prior is not None and prior.anchor not in (None, *self.class_names):
                raise ValueError(f"{name} prior: anchor {prior.anchor!r} is not one of the classes")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> ModelContract:
        return cls.model_validate(json.loads(text))

    def with_updates(self, **changes: object) -> ModelContract:
        """A validated copy with some fields changed (the contract itself never mutates)."""
        return type(self).model_validate({**self.model_dump(), **changes})
