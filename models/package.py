"""Model packages: ``models/packages/<name>-<version>/`` with ``model.onnx``,
``manifest.json`` (:class:`ModelManifest`) and ``MODEL_CARD.md``. No torch import.

Loading never guesses: :func:`load_package` validates the manifest schema and the sha256 of
the weights and raises :class:`ModelPackageError` with a sentence saying what is wrong.

A package is of ``kind`` ``segmentation`` (the default, for manifests written before kinds
existed: CT in, one sigmoid channel per label out) or ``dose`` (CT and structure channels in,
dose in Gy out; its ``dose`` section says how the input channels are built, and its ``labels``
are the OARs it takes as input channels, in order).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from rtcontour.common.errors import ModelPackageError

__all__ = [
    "SCHEMA_VERSION",
    "ModelPackageError",
    "LabelSpec",
    "IntensityNormalisation",
    "ValidationMetric",
    "DoseValidation",
    "DoseSpec",
    "TrainingData",
    "SiteMetric",
    "FineTuneReport",
    "ModelManifest",
    "ModelPackage",
    "sha256_file",
    "load_package",
    "find_latest_package",
    "default_packages_root",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.onnx"
CARD_NAME = "MODEL_CARD.md"
OPENKBP_CITATION = (
    "Babier A, Zhang B, Mahmood R, et al. OpenKBP: The open-access knowledge-based planning "
    "grand challenge and dataset. Medical Physics 48(9):5549-5561, 2021. doi:10.1002/mp.14845"
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LabelSpec(_Strict):
    """One output channel."""

    index: int = Field(ge=0)
    roi_name: str = Field(min_length=1, max_length=16)
    colour_rgb: tuple[int, int, int]
    interpreted_type: Literal["ORGAN", "EXTERNAL", "PTV", "CTV", "GTV", "AVOIDANCE"] = "ORGAN"
    single_component: bool = True

    @field_validator("colour_rgb")
    @classmethod
    def _colour_in_range(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError(f"colour_rgb components must be 0..255, got {value}")
        return value


class IntensityNormalisation(_Strict):
    """``x = (clip(hu, clip_hu) - mean) / std`` applied before the network."""

    clip_hu: tuple[float, float]
    mean: float
    std: float = Field(gt=0)


class ValidationMetric(_Strict):
    """Per-structure validation result (mean over patients that have the structure and a
    reference contour passing ``models.reference_qa``)."""

    dice: float = Field(ge=0, le=1)
    hd95_mm: float | None = Field(default=None, ge=0)
    n_cases: int = Field(default=0, ge=0)


class DoseValidation(_Strict):
    """OpenKBP challenge scores of a dose package on the CT grid (Gy): the dose score (mean
    absolute error over the possible-dose mask) and the DVH score (mean absolute error of
    D_0.1cc and mean dose of each OAR, D99, D95 and D1 of each PTV)."""

    dose_score_gy: float = Field(ge=0)
    dvh_score_gy: float = Field(ge=0)
    n_cases: int = Field(ge=0)
    split: str = "validation"


class DoseSpec(_Strict):
    """How a dose package's input channels are built (see ``models.dose.features``)."""

    input_channels: list[str] = Field(min_length=3)
    ptv_channel_scale_gy: float = Field(gt=0)
    body_margin_mm: float = Field(ge=0)
    body_threshold_hu: float = -400.0
    output_units: Literal["Gy"] = "Gy"
    validation: DoseValidation | None = None


class TrainingData(_Strict):
    description: str
    citation: str = OPENKBP_CITATION
    n_train_cases: int = Field(ge=0)
    n_validation_cases: int = Field(ge=0)


class SiteMetric(_Strict):
    """One structure of a fine-tuning report: base and new package on the same patients."""

    base_dice: float | None = None
    new_dice: float | None = None
    base_hd95_mm: float | None = None
    new_hd95_mm: float | None = None
    n_cases: int = Field(default=0, ge=0)
    worse: bool = False


class FineTuneReport(_Strict):
    """How a fine-tuned package was made and how it compares with its base (issue 23)."""

    base_package: str  # name-version
    site: str
    recommended: bool
    worse_structures: list[str] = Field(default_factory=list)
    n_train_sets: int = Field(ge=0)
    n_held_back_sets: int = Field(ge=0)
    held_back_patients: list[str] = Field(default_factory=list)  # patient keys (sha256)
    steps: int = Field(ge=0)
    site_metrics: dict[str, SiteMetric] = Field(default_factory=dict)
    openkbp_metrics: dict[str, SiteMetric] = Field(default_factory=dict)
    openkbp_note: str = ""


class ModelManifest(_Strict):
    """Everything inference needs to run a package, and where it came from."""

    schema_version: Literal[1] = 1
    kind: Literal["segmentation", "dose"] = "segmentation"
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]*$")
    # x.y.z, or a site's fine-tuned x.y.z+<site>.<n> (models.finetune), which is never taken
    # as "the newest package": a route names it exactly
    version: str = Field(pattern=r"^\d+\.\d+\.\d+(\+[a-z0-9][a-z0-9-]{0,23}\.\d+)?$")
    created: datetime
    architecture: str
    input_axes: str = "batch, channel, slice (S->I), row (A->P), column (R->L)"
    target_spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]
    spatial_divisor: int = Field(default=16, ge=1)
    intensity: IntensityNormalisation
    labels: list[LabelSpec] = Field(min_length=1)
    output_activation: Literal["sigmoid", "linear"] = "sigmoid"
    mirror_axes: tuple[int, ...] = ()
    mirror_channel_swaps: list[tuple[int, int]] = Field(default_factory=list)
    training_data: TrainingData
    validation_metrics: dict[str, ValidationMetric] = Field(default_factory=dict)
    training_command: list[str] = Field(default_factory=list)
    export_command: str = ""
    onnx_opset: int = 17
    dose: DoseSpec | None = None
    # a package fine-tuned on a site's approved structure sets (models.finetune)
    finetune: FineTuneReport | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @model_validator(mode="after")
    def _kind_matches_sections(self) -> ModelManifest:
        if self.kind == "dose":
            if self.dose is None:
                raise ValueError("a package of kind 'dose' needs a 'dose' section")
            if self.output_activation != "linear":
                raise ValueError("a package of kind 'dose' has output_activation 'linear'")
        elif self.dose is not None:
            raise ValueError(f"a package of kind {self.kind!r} has no 'dose' section")
        elif self.output_activation != "sigmoid":
            raise ValueError("a segmentation package has output_activation 'sigmoid'")
        return self

    @field_validator("labels")
    @classmethod
    def _indices_are_channels(cls, value: list[LabelSpec]) -> list[LabelSpec]:
        if [label.index for label in value] != list(range(len(value))):
            raise ValueError("label indices must be 0..n-1 in order")
        names = [label.roi_name for label in value]
        if len(set(names)) != len(names):
            raise ValueError(f"label roi_names must be unique, got {names}")
        return value

    @field_validator("mirror_axes")
    @classmethod
    def _mirror_axes_spatial(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(axis not in (0, 1, 2) for axis in value):
            raise ValueError(f"mirror_axes must be spatial axes 0, 1 or 2, got {value}")
        return value


@dataclass(frozen=True)
class ModelPackage:
    """A validated package on disk."""

    path: Path
    manifest: ModelManifest

    @property
    def onnx_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def roi_names(self) -> list[str]:
        return [label.roi_name for label in self.manifest.labels]


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_package(path: Path | str) -> ModelPackage:
    """Validate and return the package in folder ``path``."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelPackageError(f"Model package folder {folder} does not exist.")
    manifest_path, weights_path = folder / MANIFEST_NAME, folder / WEIGHTS_NAME
    for required in (manifest_path, weights_path):
        if not required.is_file():
            raise ModelPackageError(f"Model package {folder} has no {required.name}.")
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelPackageError(f"Manifest {manifest_path} is not readable JSON: {exc}.") from exc
    if isinstance(raw, dict) and raw.get("schema_version") != SCHEMA_VERSION:
        raise ModelPackageError(
            f"Manifest {manifest_path} has schema_version {raw.get('schema_version')!r}; "
            f"this rtcontour reads schema_version {SCHEMA_VERSION}."
        )
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ModelPackageError(f"Manifest {manifest_path} is invalid: {problems}.") from exc
    actual = sha256_file(weights_path)
    if actual != manifest.sha256:
        raise ModelPackageError(
            f"Checksum mismatch for {weights_path}: manifest says sha256 {manifest.sha256} "
            f"but the file has {actual}; the package is corrupt or was modified."
        )
    return ModelPackage(path=folder, manifest=manifest)


_VERSIONED = re.compile(r"^(?P<name>.+)-(?P<version>\d+\.\d+\.\d+)$")


def default_packages_root() -> Path:
    return Path(__file__).resolve().parent / "packages"


def _manifest_kind(manifest_path: Path) -> str | None:
    """The ``kind`` a manifest declares (``segmentation`` when absent), None if unreadable."""
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    kind = raw.get("kind", "segmentation") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else None


def find_latest_package(
    root: Path | str | None = None,
    name: str | None = None,
    kind: str | None = "segmentation",
) -> Path:
    """Folder of the highest-version package under ``root`` (optionally of one ``name``) of
    ``kind`` (``segmentation``, ``dose``, or None for any kind)."""
    folder = Path(root) if root is not None else default_packages_root()
    candidates: list[tuple[tuple[int, ...], Path]] = []
    if folder.is_dir():
        for child in folder.iterdir():
            match = _VERSIONED.match(child.name)
            if not match or not (child / MANIFEST_NAME).is_file():
                continue
            if name is not None and match["name"] != name:
                continue
            if kind is not None and _manifest_kind(child / MANIFEST_NAME) != kind:
                continue
            version = tuple(int(part) for part in match["version"].split("."))
            candidates.append((version, child))
    if not candidates:
        what = f"{kind} model package" if kind is not None else "model package"
        raise ModelPackageError(f"No {what} found under {folder}.")
    return max(candidates)[1]
