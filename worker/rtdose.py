"""RT Dose (RTDOSE) of a predicted dose on a CT series' frame of reference.

Public API::

    from rtcontour.worker.rtdose import build_rtdose, rtdose_uids, save_rtdose

    dataset = build_rtdose(
        dose_gy,                        # float (slices, rows, columns) in Gy on the dose grid
        affine,                         # 4x4: dose voxel (slice, row, column, 1) -> LPS mm
        series,                         # common.volume.CtSeries: patient, study, frame, axes
        structure_set_uid="1.2...",     # SOP Instance UID of the RTSTRUCT it was predicted from
        model_name="rtcontour-hn-dose", model_version="1.0.0",
        prescriptions_gy={"PTV70": 70.0, "PTV56": 56.0},
        dvhs=[cumulative_dvh(dose_on_ct, mask, roi_number=3, voxel_volume_cc=0.0025), ...],
    )
    save_rtdose(dataset, path)          # Part 10 file, Explicit VR Little Endian

The grid must be axial in the CT's orientation: its row and column axes run along the CT's
Image Orientation (Patient), its slice axis along the image normal (either way: a grid whose
slices run against the normal is stored reversed, so that the Grid Frame Offset Vector
starts at 0 and increases). Doses are stored as 32-bit unsigned integers times Dose Grid
Scaling. Dose Units GY, Dose Type PHYSICAL, Dose Summation Type PLAN.

There is no RT Plan behind a prediction; the Referenced RT Plan Sequence, which PS3.3
C.8.8.3 requires for Dose Summation Type PLAN, names a plan of a deterministic UID that
exists nowhere (a planning system that insists on loading the plan will not find it; see the
README). The Referenced Structure Set Sequence names the structure set the dose came from; it
belongs to the RT DVH Module, whose DVH Sequence is then Type 1, so the RTDOSE carries the
cumulative DVH of at least one of its ROIs (``dvhs``, by ROI Number).
Series and SOP Instance UIDs are derived from (structure set UID, model, prescriptions), so a
repeated job yields the same object. Patient and study attributes are copied from the CT.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import RTDoseStorage, RTPlanStorage, RTStructureSetStorage

from rtcontour.common import __version__
from rtcontour.common.volume import CtSeries
from rtcontour.worker.instance_header import derived_instance_header

logger = logging.getLogger(__name__)

SERIES_NUMBER = 902
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:rtcontour:rtdose")
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_ORIENTATION_TOLERANCE = 1e-4
_MAX_COORDINATE_MM = 1e8
_MAX_DOSE_GY = 1e4
_MAX_PIXEL = 4_000_000_000  # below 2**32 - 1, so the rounded Dose Grid Scaling cannot overflow
@dataclass(frozen=True)
class DoseVolumeHistogram:
    """A cumulative DVH of one ROI of the referenced structure set.

    ``roi_number``: its ROI Number there; ``bin_width_gy``: width of every dose bin;
    ``volumes_cc``: volume receiving at least the lower edge of each bin (non-increasing);
    ``minimum_gy``, ``maximum_gy``, ``mean_gy``: of the ROI's voxels.
    """

    roi_number: int
    bin_width_gy: float
    volumes_cc: tuple[float, ...]
    minimum_gy: float
    maximum_gy: float
    mean_gy: float

    def __post_init__(self) -> None:
        if isinstance(self.roi_number, bool) or not isinstance(self.roi_number, int) \
                or self.roi_number < 0:
            raise ValueError(f"roi_number {self.roi_number!r} must be a non-negative integer")
        if not self.bin_width_gy > 0:
            raise ValueError(f"bin_width_gy {self.bin_width_gy!r} must be positive")
        if not self.volumes_cc:
            raise ValueError(f"volumes_cc of ROI {self.roi_number} must hold at least one bin")


def cumulative_dvh(dose_gy: np.ndarray, mask: np.ndarray, roi_number: int,
                   voxel_volume_cc: float, bin_width_gy: float = 0.1) -> DoseVolumeHistogram:
    """Cumulative DVH of the voxels of bool ``mask`` in ``dose_gy`` (same grid, Gy), each of
    ``voxel_volume_cc``."""
    if mask.shape != dose_gy.shape:
        raise ValueError(f"mask has shape {mask.shape}, dose_gy {dose_gy.shape}")
    values = np.asarray(dose_gy, dtype=np.float64)[np.asarray(mask, dtype=bool)]
    if values.size == 0:
        raise ValueError(f"mask of ROI {roi_number} is empty: it has no DVH")
    n_bins = int(np.floor(values.max() / bin_width_gy)) + 1
    counts = np.bincount(np.minimum((values / bin_width_gy).astype(np.int64), n_bins - 1),
                         minlength=n_bins)
    at_least = np.cumsum(counts[::-1])[::-1] * float(voxel_volume_cc)
    return DoseVolumeHistogram(roi_number, float(bin_width_gy),
                               tuple(float(v) for v in at_least), float(values.min()),
                               float(values.max()), float(values.mean()))


@dataclass(frozen=True)
class RtdoseUids:
    """The deterministic UIDs of the RTDOSE for one (structure set, model, prescriptions)."""

    series_instance_uid: str
    sop_instance_uid: str
    referenced_plan_uid: str


def _uuid5_uid(name: str) -> str:
    """A 2.25 UID (PS3.5 B.2) from a name-based UUID: same name, same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _prescription_text(prescriptions_gy: Mapping[str, float]) -> str:
    return ", ".join(f"{name} {float(dose):g} Gy"
                     for name, dose in sorted(prescriptions_gy.items()))


# Dose Comment is LO: 64 characters at most (PS3.5 6.2); a TPS shows it as the dose's name.
_LO_MAX = 64


def _dose_comment(model_name: str, model_version: str,
                  prescriptions_gy: Mapping[str, float],
                  normalised: bool = False) -> tuple[str, str]:
    """(Dose Comment within 64 characters, the whole sentence). The sentence names the model
    and the prescriptions; the comment drops what does not fit (the prescriptions, then the
    model), so it never says less than "PREDICTED, no plan" (", NORMALISED" when the dose was
    scaled to a prescription)."""
    mark = ", NORMALISED" if normalised else ""
    base = f"PREDICTED by {model_name} {model_version}, no plan{mark}"
    sentence = base + (f": {_prescription_text(prescriptions_gy)}" if prescriptions_gy else "")
    for candidate in (sentence, base):
        if len(candidate) <= _LO_MAX:
            return candidate, sentence
    return f"PREDICTED, no plan{mark}", sentence


def rtdose_uids(
    structure_set_uid: str,
    model_name: str,
    model_version: str,
    prescriptions_gy: Mapping[str, float] | None = None,
) -> RtdoseUids:
    """The RTDOSE's Series, SOP Instance and (placeholder) plan UIDs, 2.25.<hash> of the
    arguments: the same inputs give the same UIDs, so re-running a job replaces its RTDOSE."""
    for argument, value in (("structure_set_uid", structure_set_uid),
                            ("model_name", model_name), ("model_version", model_version)):
        if not value:
            raise ValueError(f"{argument} {value!r} must not be empty")
    name = "\\".join([structure_set_uid, model_name, model_version,
                      _prescription_text(prescriptions_gy or {})])
    return RtdoseUids(
        series_instance_uid=_uuid5_uid(f"series\\{name}"),
        sop_instance_uid=_uuid5_uid(f"instance\\{name}"),
        referenced_plan_uid=_uuid5_uid(f"plan\\{name}"),
    )


def format_ds(value: float) -> str:
    """``value`` as a DICOM DS string of at most 16 characters (as precise as fits)."""
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{value!r} cannot be a DS value")
    if value == 0.0:
        return "0"
    for digits in range(15, 0, -1):
        for text in (f"{value:.{digits}g}", f"{value:.{digits}e}"):
            if len(text) <= 16:
                return text.replace("e+", "e")
    raise ValueError(f"{value!r} does not fit a 16-character DS")


@dataclass(frozen=True)
class _Grid:
    """The dose grid as DICOM describes it: frames along +normal."""

    dose_gy: np.ndarray  # (frames, rows, columns)
    position_mm: np.ndarray  # LPS of voxel (0, 0, 0)
    row_cosines: np.ndarray
    column_cosines: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # (between rows, between columns)
    frame_spacing_mm: float


def _check_grid(dose_gy: np.ndarray, affine: np.ndarray, series: CtSeries) -> _Grid:
    if not isinstance(series, CtSeries):
        raise ValueError(f"series must be a CtSeries from load_series, got {type(series)!r}")
    dose = np.asarray(dose_gy)
    if dose.ndim != 3 or min(dose.shape) < 1:
        raise ValueError(f"dose_gy must be 3-D (slices, rows, columns), got shape {dose.shape}")
    if not np.issubdtype(dose.dtype, np.floating) and not np.issubdtype(dose.dtype, np.integer):
        raise ValueError(f"dose_gy must be numeric, got dtype {dose.dtype}")
    if not np.isfinite(dose).all():
        raise ValueError("dose_gy holds NaN or infinite values")
    if dose.min() < 0:
        raise ValueError(f"dose_gy must be >= 0 Gy, its minimum is {float(dose.min()):.4g}")
    if dose.max() > _MAX_DOSE_GY:
        raise ValueError(f"dose_gy reaches {float(dose.max()):.4g} Gy; doses are in Gy, not cGy")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {matrix.shape}")
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    if not (spacing > 0).all():
        raise ValueError(f"affine has a zero-length axis (spacings {spacing.tolist()} mm)")
    slice_dir, row_dir, col_dir = (matrix[:3, a] / spacing[a] for a in range(3))
    orientation = np.asarray(series.header.ImageOrientationPatient, dtype=np.float64)
    ct_row_cosines, ct_column_cosines = orientation[:3], orientation[3:]
    if (np.abs(col_dir - ct_row_cosines).max() > _ORIENTATION_TOLERANCE
            or np.abs(row_dir - ct_column_cosines).max() > _ORIENTATION_TOLERANCE):
        raise ValueError(
            f"affine's column and row axes {np.round(col_dir, 4).tolist()}, "
            f"{np.round(row_dir, 4).tolist()} are not the CT's ImageOrientationPatient "
            f"{orientation.tolist()}: the dose grid must be axial in the CT's orientation")
    normal = np.cross(ct_row_cosines, ct_column_cosines)
    along = float(slice_dir @ normal)
    if abs(abs(along) - 1.0) > _ORIENTATION_TOLERANCE:
        raise ValueError(f"affine's slice axis {np.round(slice_dir, 4).tolist()} is not along "
                         f"the CT's image normal {normal.tolist()}")
    position = matrix[:3, 3].copy()
    if along < 0:  # frames must run along +normal for an increasing Grid Frame Offset Vector
        position = position + (dose.shape[0] - 1) * matrix[:3, 0]
        dose = dose[::-1]
    extent = np.abs(position).max() + spacing.max() * max(dose.shape)
    if extent > _MAX_COORDINATE_MM:
        raise ValueError(f"the dose grid reaches {extent:.3g} mm, too far for DS values")
    return _Grid(np.ascontiguousarray(dose, dtype=np.float64), position, ct_row_cosines,
                 ct_column_cosines, (float(spacing[1]), float(spacing[2])), float(spacing[0]))


def _check_names(structure_set_uid: str, model_name: str, model_version: str,
                 prescriptions_gy: Mapping[str, float]) -> None:
    if not isinstance(structure_set_uid, str) or len(structure_set_uid) > 64 or not \
            _UID_PATTERN.match(structure_set_uid):
        raise ValueError(f"structure_set_uid {structure_set_uid!r} is not a DICOM UID")
    for argument, value in (("model_name", model_name), ("model_version", model_version)):
        if not value or not re.fullmatch(r"[^\\\x00-\x1f]{1,64}", value):
            raise ValueError(f"{argument} {value!r} must be 1 to 64 characters, no backslash")
    for name, dose in prescriptions_gy.items():
        if not 0 < float(dose) <= 150:
            raise ValueError(f"prescriptions_gy[{name!r}] {dose!r} must be in (0, 150] Gy")


def build_rtdose(
    dose_gy: np.ndarray,
    affine: np.ndarray,
    series: CtSeries,
    *,
    structure_set_uid: str,
    model_name: str,
    model_version: str,
    dvhs: Sequence[DoseVolumeHistogram],
    prescriptions_gy: Mapping[str, float] | None = None,
    normalisation: str | None = None,
    software_version: str = __version__,
    created_at: dt.datetime | None = None,
) -> Dataset:
    """Return an RT Dose dataset (with file meta) of a predicted dose.

    Args:
        dose_gy: (slices, rows, columns) dose in Gy, >= 0, on the grid of ``affine``.
        affine: 4x4 float, dose voxel index (slice, row, column, 1) -> patient LPS mm on the
            CT's frame of reference; axial in the CT's orientation (see the module doc).
        series: the CT the dose was predicted on (patient, study, frame of reference).
        structure_set_uid: SOP Instance UID of the RTSTRUCT holding the OARs and PTVs.
        model_name, model_version: the dose package (Manufacturer's Model Name, Software
            Versions, Series Description).
        dvhs: cumulative DVHs (:func:`cumulative_dvh`) of ROIs of that structure set, at
            least one (the RT DVH Module holds the Referenced Structure Set Sequence).
        prescriptions_gy: PTV name -> prescription in Gy the prediction used (Dose Comment;
            part of the UIDs).
        created_at: local time of creation (default: now).
    """
    prescriptions = dict(prescriptions_gy or {})
    grid = _check_grid(dose_gy, affine, series)
    _check_names(structure_set_uid, model_name, model_version, prescriptions)
    if not dvhs:
        raise ValueError("dvhs [] must hold the DVH of at least one ROI of the structure set")
    numbers = [dvh.roi_number for dvh in dvhs]
    if len(set(numbers)) != len(numbers):
        raise ValueError(f"dvhs has ROI numbers {numbers}, with duplicates")
    uids = rtdose_uids(structure_set_uid, model_name, model_version, prescriptions)
    maximum = float(grid.dose_gy.max())
    if maximum == 0.0:
        warnings.warn("dose_gy is 0 Gy everywhere; the RTDOSE is written all zero",
                      UserWarning, stacklevel=2)
    scaling_text = format_ds(maximum / _MAX_PIXEL if maximum > 0 else 1e-6)
    scaling = float(scaling_text)
    pixels = np.clip(np.rint(grid.dose_gy / scaling), 0, 2**32 - 1).astype("<u4")

    when = created_at or dt.datetime.now()
    dataset = _header(series, uids, model_name, model_version, software_version, when)
    frames, rows, columns = pixels.shape
    dataset.ImagePositionPatient = [format_ds(v) for v in grid.position_mm]
    dataset.ImageOrientationPatient = [format_ds(v) for v in
                                       (*grid.row_cosines, *grid.column_cosines)]
    dataset.PixelSpacing = [format_ds(v) for v in grid.pixel_spacing_mm]
    dataset.SliceThickness = format_ds(grid.frame_spacing_mm) if frames > 1 else ""
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.NumberOfFrames = frames
    dataset.FrameIncrementPointer = 0x3004000C
    dataset.Rows, dataset.Columns = rows, columns
    dataset.BitsAllocated = 32
    dataset.BitsStored = 32
    dataset.HighBit = 31
    dataset.PixelRepresentation = 0
    dataset.DoseUnits = "GY"
    dataset.DoseType = "PHYSICAL"
    dataset.DoseSummationType = "PLAN"
    dataset.DoseComment, comment = _dose_comment(model_name, model_version, prescriptions,
                                                 normalisation is not None)
    if normalisation is not None:
        comment += f"; {normalisation}"
    if comment != dataset.DoseComment:
        dataset.ImageComments = comment  # LT: the whole sentence, prescriptions included
    dataset.GridFrameOffsetVector = [format_ds(k * grid.frame_spacing_mm)
                                     for k in range(frames)]
    dataset.DoseGridScaling = scaling_text
    plan = Dataset()
    plan.ReferencedSOPClassUID = RTPlanStorage
    plan.ReferencedSOPInstanceUID = uids.referenced_plan_uid
    dataset.ReferencedRTPlanSequence = DicomSequence([plan])
    structure_set = Dataset()
    structure_set.ReferencedSOPClassUID = RTStructureSetStorage
    structure_set.ReferencedSOPInstanceUID = structure_set_uid
    dataset.ReferencedStructureSetSequence = DicomSequence([structure_set])
    dataset.DVHSequence = DicomSequence([_dvh_item(dvh) for dvh in dvhs])
    dataset.PixelData = pixels.tobytes()
    logger.info("built RTDOSE %s for structure set %s: %d x %d x %d voxels, max %.2f Gy",
                uids.sop_instance_uid, structure_set_uid, frames, rows, columns, maximum)
    return dataset


def _dvh_item(dvh: DoseVolumeHistogram) -> Dataset:
    roi = Dataset()
    roi.ReferencedROINumber = dvh.roi_number
    roi.DVHROIContributionType = "INCLUDED"
    item = Dataset()
    item.DVHReferencedROISequence = DicomSequence([roi])
    item.DVHType = "CUMULATIVE"
    item.DoseUnits = "GY"
    item.DoseType = "PHYSICAL"
    item.DVHDoseScaling = "1"
    item.DVHVolumeUnits = "CM3"
    item.DVHNumberOfBins = len(dvh.volumes_cc)
    width = format_ds(dvh.bin_width_gy)
    item.DVHData = [value for volume in dvh.volumes_cc for value in (width, format_ds(volume))]
    item.DVHMinimumDose = format_ds(dvh.minimum_gy)
    item.DVHMaximumDose = format_ds(dvh.maximum_gy)
    item.DVHMeanDose = format_ds(dvh.mean_gy)
    return item


def save_rtdose(dataset: Dataset, path: Path) -> Path:
    """Write ``dataset`` as a DICOM Part 10 file; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _header(series: CtSeries, uids: RtdoseUids, model_name: str, model_version: str,
            software_version: str, when: dt.datetime) -> Dataset:
    dataset = derived_instance_header(
        series,
        sop_class_uid=RTDoseStorage,
        sop_instance_uid=uids.sop_instance_uid,
        series_instance_uid=uids.series_instance_uid,
        modality="RTDOSE",
        series_number=SERIES_NUMBER,
        series_description=f"PREDICTED DOSE {model_name} {model_version} (not a plan)",
        model_name=model_name,
        model_version=model_version,
        software_version=software_version,
        when=when,
    )
    dataset.ContentDate = dataset.InstanceCreationDate
    dataset.ContentTime = dataset.InstanceCreationTime
    dataset.PatientOrientation = ""
    return dataset
