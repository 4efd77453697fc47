"""OpenKBP patients for the dose model: raw canonical arrays and cached model-grid cases.

OpenKBP (Babier et al., Medical Physics 48:5549-5561, 2021) stores ``ct_hu[i, j, k]`` with i
anterior->posterior, j right->left, k superior->inferior; canonical is the transpose (k, i, j).
``label_bits`` bits 0-6 are the OARs, bits 7-9 PTV56, PTV63, PTV70 (the number is the
prescription in Gy), bit 15 the possible-dose mask; ``dose_cgy`` is the planned dose in cGy.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtcontour.models.dose.features import (
    DOSE_SPACING_MM,
    input_channels,
    make_model_grid,
    point_sampled_dose,
    prefiltered_resample,
)
from rtcontour.models.labels import ORGANS

__all__ = [
    "PTV_PRESCRIPTIONS_GY",
    "POSSIBLE_DOSE_BIT",
    "OpenKbpPatient",
    "DoseCase",
    "load_openkbp_patient",
    "build_dose_case",
    "load_dose_split",
    "list_cases",
]

log = logging.getLogger(__name__)

PTV_PRESCRIPTIONS_GY: dict[str, float] = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
POSSIBLE_DOSE_BIT = 15
CACHE_VERSION = 1


@dataclass(frozen=True)
class OpenKbpPatient:
    """One OpenKBP patient in canonical orientation on its own (128^3) grid.

    ``hu``: int16 HU; ``oar_masks``: one bool mask per :data:`OAR_NAMES` entry or None when
    the structure is not in ``rois_present``; ``ptv_masks``: PTV name -> bool mask (present,
    non-empty PTVs only); ``possible_dose_mask``: bool; ``dose_gy``: float32 planned dose;
    ``spacing_mm``: (slice, row, column) in mm.
    """

    case_id: str
    hu: np.ndarray
    oar_masks: tuple[np.ndarray | None, ...]
    ptv_masks: dict[str, np.ndarray]
    possible_dose_mask: np.ndarray
    dose_gy: np.ndarray
    spacing_mm: tuple[float, float, float]

    @property
    def ptvs(self) -> list[tuple[np.ndarray, float]]:
        """(mask, prescription in Gy) per PTV."""
        return [(mask, PTV_PRESCRIPTIONS_GY[name]) for name, mask in self.ptv_masks.items()]


def load_openkbp_patient(path: Path) -> OpenKbpPatient:
    """Read one OpenKBP ``pt_N.npz`` (see the data README) into canonical arrays."""
    with np.load(path) as npz:
        hu = np.ascontiguousarray(npz["ct_hu"].transpose(2, 0, 1))
        bits = np.ascontiguousarray(npz["label_bits"].transpose(2, 0, 1))
        dose_gy = np.ascontiguousarray(npz["dose_cgy"].transpose(2, 0, 1)).astype(np.float32)
        voxel_mm = npz["voxel_mm"].astype(float)
        roi_names = [str(name) for name in npz["roi_names"]]
        present = {str(name) for name in npz["rois_present"]}
    dose_gy /= 100.0
    oars: list[np.ndarray | None] = []
    for organ in ORGANS:
        bit = roi_names.index(organ.openkbp_name)
        oars.append(((bits >> bit) & 1).astype(bool) if organ.openkbp_name in present else None)
    ptvs = {}
    for name in PTV_PRESCRIPTIONS_GY:
        mask = ((bits >> roi_names.index(name)) & 1).astype(bool)
        if name in present and mask.any():
            ptvs[name] = mask
    return OpenKbpPatient(
        case_id=path.stem,
        hu=hu,
        oar_masks=tuple(oars),
        ptv_masks=ptvs,
        possible_dose_mask=((bits >> POSSIBLE_DOSE_BIT) & 1).astype(bool),
        dose_gy=dose_gy,
        spacing_mm=(float(voxel_mm[2]), float(voxel_mm[0]), float(voxel_mm[1])),
    )


@dataclass
class DoseCase:
    """One patient on the model grid (unpadded, ``shape``), ready for training.

    ``inputs``: float16 (N_CHANNELS, *shape) (see :func:`models.dose.features.input_channels`;
    the last channel is the possible-dose occupancy, which weights the loss);
    ``target_gy``: float32 (*shape) point-sampled planned dose; ``ptv_occupancy``: float16
    (3, *shape) of PTV56, PTV63, PTV70 (zeros where absent), for the DVH-aware loss term.
    """

    case_id: str
    inputs: np.ndarray
    target_gy: np.ndarray
    ptv_occupancy: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.target_gy.shape  # type: ignore[return-value]


def build_dose_case(patient: OpenKbpPatient,
                    target_spacing_mm: Sequence[float] = DOSE_SPACING_MM) -> DoseCase:
    """Model-grid arrays of ``patient`` over its possible-dose mask (unpadded: divisor 1)."""
    grid = make_model_grid(patient.possible_dose_mask, patient.spacing_mm, target_spacing_mm,
                           divisor=1)
    inputs = input_channels(patient.hu, patient.oar_masks, patient.ptvs,
                            patient.possible_dose_mask, grid)
    target = point_sampled_dose(patient.dose_gy, patient.possible_dose_mask, grid)
    ptv = np.zeros((len(PTV_PRESCRIPTIONS_GY), *grid.shape), dtype=np.float32)
    for index, name in enumerate(PTV_PRESCRIPTIONS_GY):
        if name in patient.ptv_masks:
            ptv[index] = prefiltered_resample(patient.ptv_masks[name], grid)
    return DoseCase(patient.case_id, inputs.astype(np.float16), target,
                    ptv.astype(np.float16))


def _case_sort_key(path: Path) -> tuple[int, str]:
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return (int(digits) if digits else 0, path.stem)


def list_cases(data_dir: Path, split: str) -> list[Path]:
    """npz files of a split (``train`` or ``validation``) in patient-number order."""
    folder = Path(data_dir) / split
    if not folder.is_dir():
        raise FileNotFoundError(f"OpenKBP split folder {folder} does not exist")
    return sorted(folder.glob("*.npz"), key=_case_sort_key)


def _cache_path(cache_dir: Path, split: str, case_id: str,
                target_spacing_mm: Sequence[float]) -> Path:
    tag = "x".join(f"{s:g}" for s in target_spacing_mm)
    return Path(cache_dir) / f"dose-v{CACHE_VERSION}-{tag}" / split / f"{case_id}.npz"


def _load_or_build(job: tuple[Path, Path, str, tuple[float, float, float]]) -> DoseCase:
    path, cache_dir, split, target = job
    cached = _cache_path(cache_dir, split, path.stem, target)
    if cached.exists():
        with np.load(cached) as npz:
            return DoseCase(path.stem, npz["inputs"], npz["target_gy"], npz["ptv_occupancy"])
    case = build_dose_case(load_openkbp_patient(path), target)
    cached.parent.mkdir(parents=True, exist_ok=True)
    partial = cached.with_name(cached.stem + f".{os.getpid()}.tmp.npz")
    np.savez(partial, inputs=case.inputs, target_gy=case.target_gy,
             ptv_occupancy=case.ptv_occupancy)
    os.replace(partial, cached)
    return case


def load_dose_split(
    data_dir: Path,
    split: str,
    cache_dir: Path,
    target_spacing_mm: Sequence[float] = DOSE_SPACING_MM,
    limit: int | None = None,
    workers: int = 2,
) -> list[DoseCase]:
    """Model-grid cases of an OpenKBP split, built once and cached under ``cache_dir``."""
    paths = list_cases(data_dir, split)[:limit]
    target = (float(target_spacing_mm[0]), float(target_spacing_mm[1]),
              float(target_spacing_mm[2]))
    jobs = [(path, Path(cache_dir), split, target) for path in paths]
    missing = sum(not _cache_path(Path(cache_dir), split, p.stem, target).exists() for p in paths)
    if missing:
        log.info("preprocessing %d of %d %s cases into %s", missing, len(paths), split, cache_dir)
    if missing > 4 and workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(_load_or_build, jobs, chunksize=4))
    return [_load_or_build(job) for job in jobs]

