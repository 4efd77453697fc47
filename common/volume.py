"""A CT series as geometry-carrying values: ``Volume`` and ``CtSeries``, and ``load_series``.

``Volume.array`` has shape (slices, rows, columns); ``Volume.affine`` maps a voxel index
(slice, row, column, 1) to patient LPS millimetres. The stored order of a loaded series is
by position along the slice normal (never InstanceNumber or file name); ``to_canonical``
flips/permutes it into the model's canonical orientation (axis 0 superior->inferior, axis 1
anterior->posterior, axis 2 patient right->left) without interpolation, and
``reoriented_like`` / ``array_from_canonical`` map masks back.

Series that must not be contoured are refused with ``InvalidSeries`` or
``UnsupportedGeometry`` whose message is a sentence naming the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID

from rtcontour.common.errors import IncompleteSeries, InvalidSeries, UnsupportedGeometry

logger = logging.getLogger(__name__)

# LPS direction of each canonical array axis (slice, row, column).
CANONICAL_DIRECTIONS: np.ndarray = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

_AXIS_ALIGNED_TOLERANCE = 1e-4  # max deviation of a direction cosine from 0 or +-1
_SAME_VALUE_TOLERANCE_MM = 1e-3
_TILT_TOLERANCE_DEG = 1e-3


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image on a regular grid in patient space.

    ``array``: shape (slices, rows, columns), any dtype (HU as float32 for CT, bool masks).
    ``affine``: 4x4 float64, voxel index (slice, row, column, 1) -> patient LPS mm.
    ``frame_of_reference_uid``: the DICOM Frame of Reference of the LPS coordinates.
    ``sop_instance_uids``: the CT image of each slice, in array order (empty if none).
    Treat ``array`` as read-only; derive new volumes with ``with_array``.
    """

    array: np.ndarray
    affine: np.ndarray
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"array must be 3-D (slices, rows, columns), got {self.array.shape}")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
        affine.setflags(write=False)
        object.__setattr__(self, "affine", affine)
        if self.sop_instance_uids and len(self.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                f"sop_instance_uids has {len(self.sop_instance_uids)} entries for "
                f"{self.array.shape[0]} slices"
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """(slices, rows, columns)."""
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size in mm along (slice, row, column)."""
        norms = np.linalg.norm(self.affine[:3, :3], axis=0)
        return (float(norms[0]), float(norms[1]), float(norms[2]))

    @property
    def directions(self) -> np.ndarray:
        """3x3 array: row ``a`` is the LPS unit vector along array axis ``a``."""
        return (self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)).T

    def with_array(self, array: np.ndarray) -> Volume:
        """Return a volume on the same grid holding ``array`` (same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the grid's {self.shape}")
        return Volume(array, self.affine, self.frame_of_reference_uid, self.sop_instance_uids)

    def index_to_lps(self, indices: np.ndarray) -> np.ndarray:
        """Map (n, 3) voxel indices (slice, row, column; fractional allowed) to (n, 3) LPS mm."""
        return np.asarray(indices, float) @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """Map (n, 3) LPS mm to (n, 3) fractional voxel indices (slice, row, column)."""
        inverse = np.linalg.inv(self.affine)
        return np.asarray(points_mm, float) @ inverse[:3, :3].T + inverse[:3, 3]

    def reoriented(self, target_directions: np.ndarray) -> Volume:
        """Return this volume with its axes flipped/permuted to run along ``target_directions``.

        ``target_directions``: 3x3, row ``a`` the LPS unit vector wanted for axis ``a``. The
        voxels stay where they are in space; only the array order changes (no interpolation).
        Raises ``UnsupportedGeometry`` if an axis is not parallel to one of the targets.
        """
        source_axes, flips = _axis_mapping(self.directions, np.asarray(target_directions))
        array = np.transpose(self.array, source_axes)
        flip_axes = tuple(a for a in range(3) if flips[a])
        if flip_axes:
            array = np.flip(array, axis=flip_axes)
        shape = self.array.shape
        corner = np.zeros(3)
        for target_axis, source_axis in enumerate(source_axes):
            if flips[target_axis]:
                corner[source_axis] = shape[source_axis] - 1
        affine = np.eye(4)
        signs = np.where(flips, -1.0, 1.0)
        affine[:3, :3] = self.affine[:3, :3][:, list(source_axes)] * signs
        affine[:3, 3] = self.index_to_lps(corner[None, :])[0]
        uids = self.sop_instance_uids
        if uids:
            if source_axes[0] != 0:
                raise UnsupportedGeometry(
                    "The slice axis would change under reorientation, so the images of the "
                    "slices could not be referenced."
                )
            uids = tuple(reversed(uids)) if flips[0] else uids
        return Volume(np.ascontiguousarray(array), affine, self.frame_of_reference_uid, uids)

    def to_canonical(self) -> Volume:
        """Return the model's canonical orientation (S->I, A->P, R->L), a pure flip/permute."""
        return self.reoriented(CANONICAL_DIRECTIONS)

    def reoriented_like(self, other: Volume) -> Volume:
        """Return this volume's voxels in ``other``'s array order (e.g. a canonical mask back).

        Raises ``ValueError`` if the two grids do not coincide after reorientation.
        """
        result = self.reoriented(other.directions)
        if result.shape != other.shape or not np.allclose(
            result.affine, other.affine, atol=_SAME_VALUE_TOLERANCE_MM
        ):
            raise ValueError(
                "the volume's grid does not coincide with the target grid after reorientation"
            )
        return Volume(
            result.array, other.affine, other.frame_of_reference_uid, other.sop_instance_uids
        )

    def array_from_canonical(self, canonical_array: np.ndarray) -> np.ndarray:
        """Map an array on this volume's canonical grid back to this volume's array order."""
        canonical = self.to_canonical()
        return canonical.with_array(canonical_array).reoriented_like(self).array


def _axis_mapping(
    source_directions: np.ndarray, target_directions: np.ndarray
) -> tuple[tuple[int, int, int], tuple[bool, bool, bool]]:
    """For each target axis, the source axis along it and whether it runs against it."""
    dots = target_directions @ source_directions.T  # [target, source]
    source_axes = tuple(int(np.argmax(np.abs(row))) for row in dots)
    if sorted(source_axes) != [0, 1, 2] or np.any(
        np.abs(np.abs(dots[range(3), source_axes]) - 1.0) > _AXIS_ALIGNED_TOLERANCE
    ):
        raise UnsupportedGeometry(
            "The image axes are not parallel to the patient axes (oblique orientation); only "
            "axial series are contoured."
        )
    flips = tuple(bool(dots[t, s] < 0) for t, s in enumerate(source_axes))
    return source_axes, flips  # type: ignore[return-value]


@dataclass(frozen=True, eq=False)
class CtSeries:
    """A loaded CT series: its ``volume`` (HU, float32, stored order) and what references it.

    ``header`` is the first slice's dataset without pixel data: the source of the patient,
    study and equipment attributes an RTSTRUCT copies. ``sop_class_uid`` is that of every image.
    """

    volume: Volume
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    header: Dataset

    @property
    def frame_of_reference_uid(self) -> str:
        return self.volume.frame_of_reference_uid

    @property
    def n_instances(self) -> int:
        return self.volume.shape[0]


def load_series(
    sources: Sequence[Path | str | Dataset],
    *,
    min_slices: int = 10,
    gap_tolerance: float = 0.1,
) -> CtSeries:
    """Read one axial CT series (files or datasets) into a ``CtSeries``.

    Slices are sorted by position along the normal; pixels become float32 HU (rescale
    applied). ``gap_tolerance`` is the allowed deviation of any slice gap from the median gap,
    as a fraction of it. Raises ``InvalidSeries`` / ``UnsupportedGeometry``
    (``IncompleteSeries``: a missing slice, too few slices) naming the reason
    for: non-CT modality, mixed series/frame of reference/size/spacing/orientation, oblique
    or non-axial orientation, gantry tilt, slices off the normal, duplicate positions,
    uneven spacing (a missing slice), or fewer than ``min_slices`` slices.
    """
    if not sources:
        raise InvalidSeries("The series has no instances.")
    datasets = [_read(source) for source in sources]
    _check_modality(datasets)
    first = datasets[0]
    _check_same(datasets, "SeriesInstanceUID", "series instance UID")
    _check_same(datasets, "FrameOfReferenceUID", "frame of reference")
    _check_same(datasets, "Rows", "number of rows")
    _check_same(datasets, "Columns", "number of columns")
    pixel_spacing = _check_close(datasets, "PixelSpacing", "pixel spacing", 2)
    orientation = _check_close(datasets, "ImageOrientationPatient", "image orientation", 6)
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = _check_axial(row_cosines, column_cosines)
    _check_tilt(datasets)
    positions = np.array([_floats(ds, "ImagePositionPatient", 3) for ds in datasets])
    distances = positions @ normal
    order = np.argsort(distances, kind="stable")
    distances, positions = distances[order], positions[order]
    datasets = [datasets[i] for i in order]
    _check_along_normal(positions, distances, normal, pixel_spacing)
    slice_spacing = _check_spacing(distances, gap_tolerance, first)
    if len(datasets) < min_slices:
        raise IncompleteSeries(
            f"The series has {len(datasets)} slices, fewer than the {min_slices} required. "
            + SEND_WHOLE_SERIES
        )

    affine = np.eye(4)
    affine[:3, 0] = normal * slice_spacing
    affine[:3, 1] = column_cosines * pixel_spacing[0]
    affine[:3, 2] = row_cosines * pixel_spacing[1]
    affine[:3, 3] = positions[0]
    volume = Volume(
        array=_hounsfield(datasets),
        affine=affine,
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in datasets),
    )
    header = Dataset(datasets[0])
    header.file_meta = getattr(datasets[0], "file_meta", FileMetaDataset())
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in header:
            delattr(header, keyword)
    sop_classes = {str(ds.SOPClassUID) for ds in datasets}
    logger.info(
        "loaded series %s: %d slices, spacing %s mm",
        first.SeriesInstanceUID,
        len(datasets),
        ", ".join(f"{s:.3g}" for s in volume.spacing_mm),
    )
    return CtSeries(
        volume=volume,
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        sop_class_uid=sop_classes.pop(),
        header=header,
    )


def _read(source: Path | str | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source)
    except (OSError, pydicom.errors.InvalidDicomError) as error:
        raise InvalidSeries(f"An instance of the series could not be read: {error}.") from error


def _check_modality(datasets: Sequence[Dataset]) -> None:
    for ds in datasets:
        modality = str(ds.get("Modality", ""))
        if modality != "CT":
            raise InvalidSeries(
                f"The series has modality {modality or 'unknown'}, not CT; only CT is contoured."
            )
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise InvalidSeries("The series holds multi-frame images; only single-frame CT.")
    sop_classes = {str(ds.get("SOPClassUID", "")) for ds in datasets}
    if len(sop_classes) != 1:
        raise InvalidSeries("The series mixes images of different SOP classes.")


def _check_same(datasets: Sequence[Dataset], keyword: str, what: str) -> None:
    values = {str(ds.get(keyword, "")) for ds in datasets}
    if "" in values:
        raise InvalidSeries(f"An instance of the series has no {what} ({keyword}).")
    if len(values) > 1:
        raise InvalidSeries(f"The instances do not share one {what}: {len(values)} differ.")


def _floats(ds: Dataset, keyword: str, count: int) -> np.ndarray:
    value = ds.get(keyword)
    if value is None:
        raise InvalidSeries(f"An instance of the series has no {keyword}.")
    values = np.array([float(v) for v in (value if count > 1 else [value])], dtype=np.float64)
    if values.shape != (count,):
        raise InvalidSeries(f"{keyword} has {values.size} values where {count} are required.")
    return values


def _check_close(datasets: Sequence[Dataset], keyword: str, what: str, count: int) -> np.ndarray:
    values = np.array([_floats(ds, keyword, count) for ds in datasets])
    if np.any(np.abs(values - values[0]) > _AXIS_ALIGNED_TOLERANCE):
        raise InvalidSeries(f"The instances do not share one {what}: the series mixes {what}s.")
    return values[0]


def _check_axial(row_cosines: np.ndarray, column_cosines: np.ndarray) -> np.ndarray:
    normal = np.cross(row_cosines, column_cosines)
    axis_aligned = all(
        np.sum(np.abs(np.abs(v) - 1.0) < _AXIS_ALIGNED_TOLERANCE) == 1
        and np.sum(np.abs(v) < _AXIS_ALIGNED_TOLERANCE) == 2
        for v in (row_cosines, column_cosines)
    )
    if not axis_aligned:
        raise UnsupportedGeometry(
            "The images are oblique (ImageOrientationPatient "
            f"{', '.join(f'{v:.4g}' for v in (*row_cosines, *column_cosines))}); "
            "only axial series are contoured."
        )
    if abs(abs(normal[2]) - 1.0) > _AXIS_ALIGNED_TOLERANCE:
        plane = "sagittal" if abs(normal[0]) > 0.5 else "coronal"
        raise UnsupportedGeometry(
            f"The images are {plane}, not axial; only axial series are contoured."
        )
    return np.round(normal)


def _check_tilt(datasets: Sequence[Dataset]) -> None:
    for ds in datasets:
        tilt = ds.get("GantryDetectorTilt")
        if tilt not in (None, "") and abs(float(tilt)) > _TILT_TOLERANCE_DEG:
            raise UnsupportedGeometry(
                f"The series was acquired with a gantry tilt of {float(tilt):g} degrees; "
                "tilted series are not contoured."
            )


def _check_along_normal(
    positions: np.ndarray, distances: np.ndarray, normal: np.ndarray, pixel_spacing: np.ndarray
) -> None:
    in_plane = positions - distances[:, None] * normal
    drift = np.max(np.linalg.norm(in_plane - in_plane[0], axis=1)) if len(positions) else 0.0
    if drift > max(_SAME_VALUE_TOLERANCE_MM * 10, 0.01 * float(np.min(pixel_spacing))):
        raise UnsupportedGeometry(
            f"The slice positions drift {drift:.3g} mm sideways from the slice normal (gantry "
            "tilt or shear); tilted series are not contoured."
        )


# The input itself is wrong: running the job again cannot help. What is sent again is merged
# with this job's instances while they are held (service.intake), so the missing slices
# alone do; once they were deleted, only the whole series does.
SEND_WHOLE_SERIES = ("Retrying will not help: send the missing slices, or the whole series, "
                     "again from the planning system; while this job's files are kept "
                     "(RTCONTOUR_RETENTION_DAYS) they are merged with what is sent, after that "
                     "send the whole series.")


def _check_spacing(distances: np.ndarray, gap_tolerance: float, first: Dataset) -> float:
    if len(distances) < 2:
        thickness = first.get("SliceThickness")
        return float(thickness) if thickness not in (None, "") else 1.0
    gaps = np.diff(distances)
    duplicate = np.flatnonzero(gaps < _SAME_VALUE_TOLERANCE_MM)
    if duplicate.size:
        raise InvalidSeries(
            f"Two instances share the slice position {distances[duplicate[0]]:.2f} mm "
            "(duplicate slice)."
        )
    median = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - median) > gap_tolerance * median)
    if uneven.size:
        index = int(uneven[0])
        raise IncompleteSeries(
            f"The slice spacing is uneven: a gap of {gaps[index]:.3g} mm after position "
            f"{distances[index]:.2f} mm where {median:.3g} mm is usual (a missing slice?). "
            + SEND_WHOLE_SERIES
        )
    return float((distances[-1] - distances[0]) / (len(distances) - 1))


def _hounsfield(datasets: Sequence[Dataset]) -> np.ndarray:
    """Stack the slices' pixels as float32 HU, shape (slices, rows, columns)."""
    first = datasets[0]
    array = np.empty((len(datasets), int(first.Rows), int(first.Columns)), dtype=np.float32)
    for index, ds in enumerate(datasets):
        try:
            pixels = _native_pixels(ds)
            if pixels is None:
                pixels = ds.pixel_array
        except Exception as error:  # any decoder failure refuses the series, with its reason
            syntax = getattr(ds, "file_meta", Dataset()).get("TransferSyntaxUID", "unknown")
            raise InvalidSeries(
                f"The pixel data of an instance could not be decoded ({syntax}): {error}."
            ) from error
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        np.multiply(pixels, slope, out=array[index], casting="unsafe")
        array[index] += intercept
    return array


_NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """The stored values of uncompressed 16-bit pixels without a copy, or None (use pydicom).

    Only when every allocated bit is stored, so no sign extension or masking is needed.
    """
    file_meta = getattr(ds, "file_meta", None)
    syntax = str(file_meta.get("TransferSyntaxUID", "")) if file_meta is not None else ""
    if (
        syntax not in _NATIVE_SYNTAXES
        or ds.get("BitsAllocated") != 16
        or ds.get("BitsStored") != 16
        or ds.get("SamplesPerPixel", 1) != 1
        or "PixelData" not in ds
    ):
        return None
    dtype = "<i2" if ds.get("PixelRepresentation") == 1 else "<u2"
    rows, columns = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * columns * 2:
        return None
    return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
