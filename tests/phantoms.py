"""Synthetic CT series as real DICOM files, for tests everywhere in rtcontour.

Every array here is in the model's **canonical orientation** (docs/ARCHITECTURE.md):
shape (slices, rows, columns), axis 0 superior->inferior (LPS -z), axis 1
anterior->posterior (LPS +y), axis 2 patient right->left (LPS +x). ``write_ct_series``
stores such an array as the scanner would for any patient position, so that reading the
series back and reorienting it to canonical must give the same array.

This module is deliberately independent of ``common.volume`` (it is the reference the loader
is tested against), and uses pydicom and numpy only.

Examples
--------
>>> phantom = head_phantom()
>>> paths = write_ct_series(tmp_path, phantom.hu, phantom.spacing_mm, patient_position="FFS")
"""

from __future__ import annotations

import datetime as _dt
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

# Row and column direction cosines (LPS) of an axial image, per DICOM Patient Position,
# as scanners write them (the image as seen from the patient's feet, anterior up).
ORIENTATION_BY_POSITION: dict[
    str, tuple[tuple[float, float, float], tuple[float, float, float]]
] = {
    "HFS": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "HFP": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "FFS": ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "FFP": ((1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),
    "HFDL": ((0.0, -1.0, 0.0), (1.0, 0.0, 0.0)),
    "HFDR": ((0.0, 1.0, 0.0), (-1.0, 0.0, 0.0)),
    "FFDL": ((0.0, 1.0, 0.0), (1.0, 0.0, 0.0)),
    "FFDR": ((0.0, -1.0, 0.0), (-1.0, 0.0, 0.0)),
}
PATIENT_POSITIONS: tuple[str, ...] = tuple(ORIENTATION_BY_POSITION)

# LPS direction of each canonical array axis (slice, row, column).
CANONICAL_DIRECTIONS = np.array([[0.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])

AIR_HU = -1000.0
_LOSSLESS_ENCODABLE = {
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
}


@dataclass(frozen=True)
class HeadPhantom:
    """A head-like CT in canonical orientation with an asymmetric marker.

    ``hu``: float32 HU, shape (slices, rows, columns); ``spacing_mm``: (slice, row, column)
    in mm; ``marker``: bool, same shape, a bright cube in the patient's **left, anterior,
    superior** octant of the head; ``body``: bool, the head (skin inwards).
    """

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    marker: np.ndarray
    body: np.ndarray


def head_phantom(
    shape: tuple[int, int, int] = (24, 64, 64),
    spacing_mm: tuple[float, float, float] = (2.5, 1.0, 1.0),
) -> HeadPhantom:
    """Return an ellipsoidal head (water, bone shell) in air with a left-anterior-superior marker.

    ``shape`` is (slices, rows, columns) in canonical orientation; ``spacing_mm`` likewise.
    """
    n_slices, n_rows, n_cols = shape
    z, y, x = np.meshgrid(
        (np.arange(n_slices) + 0.5) / n_slices * 2 - 1,
        (np.arange(n_rows) + 0.5) / n_rows * 2 - 1,
        (np.arange(n_cols) + 0.5) / n_cols * 2 - 1,
        indexing="ij",
    )
    radius = np.sqrt((z / 1.1) ** 2 + (y / 0.85) ** 2 + (x / 0.75) ** 2)
    body = radius <= 1.0
    hu = np.full(shape, AIR_HU, dtype=np.float32)
    hu[body] = 20.0
    hu[body & (radius > 0.85)] = 900.0
    marker = np.zeros(shape, dtype=bool)
    # Left = high column index, anterior = low row index, superior = low slice index.
    s0, r0, c0 = n_slices // 4, n_rows * 3 // 10, n_cols * 6 // 10
    size_s, size_r, size_c = max(2, n_slices // 6), max(2, n_rows // 8), max(2, n_cols // 8)
    marker[s0 : s0 + size_s, r0 : r0 + size_r, c0 : c0 + size_c] = True
    hu[marker] = 1500.0
    return HeadPhantom(hu=hu, spacing_mm=spacing_mm, marker=marker, body=body)


def openkbp_ct(npz_path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Return an OpenKBP patient's CT as canonical float32 HU and its spacing (slice, row, col) mm.

    OpenKBP stores ``ct_hu[i, j, k]`` with i anterior->posterior, j right->left and k
    superior->inferior, so canonical is the transpose (k, i, j).
    """
    with np.load(npz_path) as npz:
        hu = np.ascontiguousarray(npz["ct_hu"].transpose(2, 0, 1)).astype(np.float32)
        voxel = npz["voxel_mm"].astype(float)
    return hu, (float(voxel[2]), float(voxel[0]), float(voxel[1]))


def openkbp_masks(npz_path: Path) -> dict[str, np.ndarray]:
    """Return each structure the OpenKBP patient has contoured as a canonical bool mask."""
    with np.load(npz_path) as npz:
        bits = npz["label_bits"].transpose(2, 0, 1)
        names = [str(name) for name in npz["roi_names"]]
        present = {str(name) for name in npz["rois_present"]}
    return {
        name: np.ascontiguousarray((bits >> index) & 1).astype(bool)
        for index, name in enumerate(names)
        if name in present
    }


@dataclass(frozen=True)
class StoredGeometry:
    """How a canonical array is laid out in a stored series for one patient position.

    ``permutation[a]`` is the canonical axis that stored axis ``a`` (slice, row, column) runs
    along, ``flipped[a]`` whether it runs against it; ``spacing_mm`` is per stored axis.
    """

    row_cosines: tuple[float, float, float]
    column_cosines: tuple[float, float, float]
    permutation: tuple[int, int, int]
    flipped: tuple[bool, bool, bool]
    spacing_mm: tuple[float, float, float]


def stored_geometry(
    patient_position: str, canonical_spacing_mm: tuple[float, float, float]
) -> StoredGeometry:
    """Return the stored layout of a canonical array for ``patient_position`` (e.g. "FFS")."""
    if patient_position not in ORIENTATION_BY_POSITION:
        raise ValueError(
            f"patient_position {patient_position!r} is not one of {', '.join(PATIENT_POSITIONS)}"
        )
    row_cos, col_cos = (np.array(v) for v in ORIENTATION_BY_POSITION[patient_position])
    normal = np.cross(row_cos, col_cos)
    # Stored axes: slice along the normal, row index along the column cosines, column index
    # along the row cosines (DICOM's naming).
    stored_dirs = [normal, col_cos, row_cos]
    permutation: list[int] = []
    flipped: list[bool] = []
    for direction in stored_dirs:
        dots = CANONICAL_DIRECTIONS @ direction
        axis = int(np.argmax(np.abs(dots)))
        permutation.append(axis)
        flipped.append(bool(dots[axis] < 0))
    return StoredGeometry(
        row_cosines=tuple(float(v) for v in row_cos),  # type: ignore[arg-type]
        column_cosines=tuple(float(v) for v in col_cos),  # type: ignore[arg-type]
        permutation=tuple(permutation),  # type: ignore[arg-type]
        flipped=tuple(flipped),  # type: ignore[arg-type]
        spacing_mm=tuple(float(canonical_spacing_mm[a]) for a in permutation),  # type: ignore[arg-type]
    )


def canonical_to_stored(array: np.ndarray, geometry: StoredGeometry) -> np.ndarray:
    """Return the stored-order array (slice by position along the normal, row, column)."""
    stored = np.transpose(array, geometry.permutation)
    flips = tuple(axis for axis, flip in enumerate(geometry.flipped) if flip)
    return np.flip(stored, axis=flips) if flips else stored


def default_origin_mm(
    shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]
) -> tuple[float, float, float]:
    """LPS mm of canonical voxel (0, 0, 0) that centres the volume on x=0, y=0, top at z=0."""
    n_slices, n_rows, n_cols = shape
    return (
        -0.5 * (n_cols - 1) * spacing_mm[2],
        -0.5 * (n_rows - 1) * spacing_mm[1],
        0.0,
    )


def ct_datasets(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float] = (2.5, 1.0, 1.0),
    *,
    patient_position: str = "HFS",
    patient_id: str = "RTC-PHANTOM-001",
    patient_name: str = "Phantom^Head",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "Synthetic head CT",
    origin_mm: Sequence[float] | None = None,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    seed: int | None = None,
) -> list[Dataset]:
    """Return CT Image Storage datasets (uncompressed) for a canonical HU array.

    ``hu``: (slices, rows, columns) in canonical orientation, HU; ``spacing_mm``: (slice,
    row, column) mm; ``origin_mm``: LPS mm of canonical voxel (0, 0, 0) (default: centred
    in x and y, top slice at z=0). Datasets come in a shuffled order, with InstanceNumbers
    that do not follow position. Each has ``file_meta`` set (Explicit VR Little Endian).
    """
    if hu.ndim != 3:
        raise ValueError(f"hu must be 3-D (slices, rows, columns), got shape {hu.shape}")
    geometry = stored_geometry(patient_position, spacing_mm)
    stored = canonical_to_stored(np.asarray(hu, dtype=np.float64), geometry)
    origin = np.array(
        default_origin_mm(hu.shape, spacing_mm) if origin_mm is None else origin_mm, float
    )
    # LPS of stored voxel (0, 0, 0): the canonical corner that the flips bring to index 0.
    canonical_corner = np.zeros(3)
    for stored_axis, canonical_axis in enumerate(geometry.permutation):
        if geometry.flipped[stored_axis]:
            canonical_corner[canonical_axis] = hu.shape[canonical_axis] - 1
    first_position = origin + (CANONICAL_DIRECTIONS.T * np.array(spacing_mm)) @ canonical_corner
    normal = np.cross(geometry.row_cosines, geometry.column_cosines)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    rng = np.random.default_rng(seed)
    n_slices = stored.shape[0]
    instance_numbers = rng.permutation(n_slices) + 1
    stored_values = np.round((stored - rescale_intercept) / rescale_slope)
    stored_values = np.clip(stored_values, 0, 65535).astype(np.uint16)
    now = _dt.datetime(2024, 1, 15, 9, 30, 0)

    datasets = []
    for index in range(n_slices):
        position = first_position + index * geometry.spacing_mm[0] * normal
        ds = _ct_header(
            study_uid=study_uid,
            series_uid=series_uid,
            frame_of_reference_uid=frame_of_reference_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            patient_position=patient_position,
            series_description=series_description,
            when=now,
        )
        ds.InstanceNumber = int(instance_numbers[index])
        ds.ImageOrientationPatient = [*geometry.row_cosines, *geometry.column_cosines]
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.SliceLocation = _ds_number(float(position @ normal))
        ds.PixelSpacing = [_ds_number(geometry.spacing_mm[1]), _ds_number(geometry.spacing_mm[2])]
        ds.SliceThickness = _ds_number(geometry.spacing_mm[0])
        ds.RescaleIntercept = _ds_number(rescale_intercept)
        ds.RescaleSlope = _ds_number(rescale_slope)
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.PixelData = np.ascontiguousarray(stored_values[index]).tobytes()
        datasets.append(ds)
    order = rng.permutation(n_slices)
    return [datasets[i] for i in order]


def write_ct_series(
    out_dir: Path,
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float] = (2.5, 1.0, 1.0),
    *,
    patient_position: str = "HFS",
    patient_id: str = "RTC-PHANTOM-001",
    patient_name: str = "Phantom^Head",
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_description: str = "Synthetic head CT",
    origin_mm: Sequence[float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    seed: int | None = None,
) -> list[Path]:
    """Write a canonical HU array as a CT series of one file per slice; return the paths.

    See ``ct_datasets`` for the arguments. File names are random (``<uuid>.dcm``), so their
    order says nothing about position. ``transfer_syntax`` may be Explicit/Implicit VR
    Little Endian or a lossless syntax pydicom can encode (RLE, JPEG-LS, JPEG 2000 lossless).
    """
    datasets = ct_datasets(
        hu,
        spacing_mm,
        patient_position=patient_position,
        patient_id=patient_id,
        patient_name=patient_name,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        series_description=series_description,
        origin_mm=origin_mm,
        rescale_intercept=rescale_intercept,
        rescale_slope=rescale_slope,
        seed=seed,
    )
    return write_datasets(out_dir, datasets, transfer_syntax=transfer_syntax)


def write_datasets(
    out_dir: Path, datasets: Sequence[Dataset], *, transfer_syntax: str = ExplicitVRLittleEndian
) -> list[Path]:
    """Write datasets (e.g. from ``ct_datasets``, possibly altered) under random file names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    syntax = UID(transfer_syntax)
    paths = []
    for ds in datasets:
        if syntax.is_compressed:
            if syntax not in _LOSSLESS_ENCODABLE:
                raise ValueError(f"transfer_syntax {syntax.name} cannot be encoded by pydicom")
            ds = _copy(ds)
            ds.compress(syntax)
        elif syntax != ds.file_meta.TransferSyntaxUID:
            ds = _copy(ds)
            ds.file_meta.TransferSyntaxUID = syntax
        path = out_dir / f"{uuid.uuid4().hex}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _copy(ds: Dataset) -> Dataset:
    copy = Dataset(ds)
    copy.file_meta = FileMetaDataset(ds.file_meta)
    return copy


def _ds_number(value: float) -> str:
    """A DS string of at most 16 characters (shortest round-trip form when it fits)."""
    text = repr(float(value))
    if text.endswith(".0"):
        text = text[:-2]
    if text == "-0":
        text = "0"
    if len(text) <= 16:
        return text
    return f"{value:.10g}"[:16]


def _ct_header(
    *,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    patient_id: str,
    patient_name: str,
    patient_position: str,
    series_description: str,
    when: _dt.datetime,
) -> Dataset:
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = "RTC_PHANTOM"
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")

    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = date, date, date, date
    ds.StudyTime, ds.SeriesTime, ds.AcquisitionTime, ds.ContentTime = time, time, time, time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "rtcontour test phantom"
    ds.InstitutionName = "rtcontour"
    ds.ReferringPhysicianName = ""
    ds.StationName = "PHANTOM"
    ds.StudyDescription = "Synthetic study"
    ds.SeriesDescription = series_description
    ds.ManufacturerModelName = "phantoms.py"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "HEAD"
    ds.KVP = "120"
    ds.ConvolutionKernel = "STANDARD"
    ds.PatientPosition = patient_position
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleType = "HU"
    return ds
