"""A dose predicted for a CT series from its structure set, and the RTDOSE holding it.

::

    prediction = predict_dose_for_series(series, structure_set, predictor, prescriptions)
    dataset = rtdose_for_prediction(series, structure_set, prediction, predictor)

The structure set and prescriptions come from ``rtcontour.worker.structure_sets``; the dose
job (``rtcontour.worker.dose_pipeline``) and ``rtcontour dose``
(``rtcontour.worker.dose_offline``) both use these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from rtcontour.common.volume import CtSeries
from rtcontour.models.dose.features import OAR_NAMES
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.worker.rtdose import DoseVolumeHistogram, build_rtdose, cumulative_dvh
from rtcontour.worker.structure_sets import StructureSet, UnusableStructureSet, match_oars

__all__ = [
    "DosePrediction",
    "predict_dose_for_series",
    "dose_grid",
    "rtdose_for_prediction",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DosePrediction:
    """Predicted dose on the CT's stored grid (``series.volume``), and what went in."""

    dose_gy: np.ndarray
    oars: dict[str, str]  # TG-263 name -> structure set ROI name
    prescriptions_gy: dict[str, float]  # PTV ROI name -> Gy
    missing_oars: tuple[str, ...]


def predict_dose_for_series(
    series: CtSeries,
    structure_set: StructureSet,
    predictor: DosePredictor,
    prescriptions_gy: Mapping[str, float],
) -> DosePrediction:
    """Predict the dose of ``series`` from its structure set; dose on ``series.volume``.

    Raises :class:`UnusableStructureSet` when no PTV with a prescription has contours.
    """
    ptv_names = [name for name in prescriptions_gy if name in structure_set.masks]
    if not ptv_names:
        raise UnusableStructureSet(
            "The structure set has no PTV with a prescription and contours (names such as "
            "PTV70, PTV_70Gy or PTV7000, or a configured table); there is nothing to "
            "predict a dose for.")
    oars = match_oars(structure_set.masks)
    missing = tuple(name for name in OAR_NAMES if name not in oars)
    if missing:
        log.info("structure set %s lacks OARs %s: they are empty input channels",
                 structure_set.sop_instance_uid, ", ".join(missing))
    volume = series.volume
    canonical = volume.to_canonical()

    def to_canonical(mask: np.ndarray) -> np.ndarray:
        return volume.with_array(mask).to_canonical().array

    dose_canonical = predictor.predict(
        canonical.array.astype(np.float32, copy=False),
        canonical.spacing_mm,
        {oar: to_canonical(structure_set.masks[name]) for oar, name in oars.items()},
        [(to_canonical(structure_set.masks[name]), float(prescriptions_gy[name]))
         for name in ptv_names],
    )
    return DosePrediction(
        dose_gy=volume.array_from_canonical(dose_canonical),
        oars=oars,
        prescriptions_gy={name: float(prescriptions_gy[name]) for name in ptv_names},
        missing_oars=missing,
    )


def dose_grid(dose_gy: np.ndarray, affine: np.ndarray, spacing_mm: Sequence[float],
              in_plane_mm: float = 2.5) -> tuple[np.ndarray, np.ndarray]:
    """The RTDOSE grid: every k-th CT row and column (k = round(in_plane_mm / pixel
    spacing), so dose points are CT voxel centres), every slice, cropped to the box of
    non-zero dose. Returns (dose (slices, rows, columns), 4x4 affine)."""
    steps = [1] + [max(1, int(round(in_plane_mm / float(s)))) for s in spacing_mm[1:]]
    nonzero = np.argwhere(dose_gy > 0)
    if nonzero.size:
        low, high = nonzero.min(axis=0), nonzero.max(axis=0) + 1
    else:
        low, high = np.zeros(3, dtype=int), np.array(dose_gy.shape)
    window = tuple(slice(int(a), int(b), k) for a, b, k in zip(low, high, steps, strict=True))
    grid_affine = np.array(affine, dtype=np.float64)
    grid_affine[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    grid_affine[:3, :3] = affine[:3, :3] * np.asarray(steps, dtype=np.float64)
    return np.ascontiguousarray(dose_gy[window]), grid_affine


def rtdose_for_prediction(series: CtSeries, structure_set: StructureSet,
                          prediction: DosePrediction, predictor: DosePredictor) -> Dataset:
    """The RTDOSE of ``prediction`` with the DVHs of its PTVs and OARs (computed on the CT
    grid)."""
    volume = series.volume
    voxel_cc = float(np.prod(volume.spacing_mm)) / 1000.0
    used = [*prediction.prescriptions_gy, *prediction.oars.values()]
    dvhs: list[DoseVolumeHistogram] = [
        cumulative_dvh(prediction.dose_gy, structure_set.masks[name],
                       structure_set.roi_numbers[name], voxel_cc)
        for name in used
    ]
    grid, affine = dose_grid(prediction.dose_gy, volume.affine, volume.spacing_mm)
    manifest = predictor.manifest
    return build_rtdose(grid, affine, series, structure_set_uid=structure_set.sop_instance_uid,
                        model_name=manifest.name, model_version=manifest.version, dvhs=dvhs,
                        prescriptions_gy=prediction.prescriptions_gy)
