"""RT Structure Set (RTSTRUCT) from masks on a CT series' grid, in highdicom's style.

Public API (used by the worker pipeline)::

    series = load_series(paths)                          # common.volume, stored order
    canonical = series.volume.to_canonical()             # the model's orientation
    masks = segmenter.predict(canonical.array, canonical.spacing_mm)   # canonical grid
    masks = {name: series.volume.array_from_canonical(m) for name, m in masks.items()}

    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, rtstruct_uids, save_rtstruct

    dataset = build_rtstruct(
        series,                       # common.volume.CtSeries (from load_series)
        {"Brainstem": mask, ...},     # roi_name -> bool (slices, rows, columns) on series.volume
        [RoiSpec("Brainstem", (0, 255, 0), "ORGAN"), ...],  # names, colours, types, in order
        model_name="hn-unet", model_version="1.2.0",
        min_area_mm2=2.0, smoothing=False,
    )
    save_rtstruct(dataset, path)      # Part 10 file, Implicit VR Little Endian
    rtstruct_uids(series.series_instance_uid, "hn-unet", "1.2.0")  # the UIDs it will carry

``build_rtstruct`` validates its arguments (``ValueError`` naming the argument and value) and
warns (``UserWarning``, stacklevel 2) on legal but suspicious input such as an empty ROI,
which is left out of the RTSTRUCT (every reader opens it; the job reports it "not found").
Its Series and SOP Instance UIDs are derived from (CT series UID, model name, model version),
so a repeated job yields the same object, never a second one. Patient and study attributes
are copied from the CT; every CT image is referenced, and each contour references its slice.
Contours follow the pixel edges (``worker.contours``), so filling them at the CT's pixel
centres gives back the masks exactly (inner contours are holes: the even-odd/XOR rule that
planning systems apply; plastimatch needs ``--xor-contours``).

Files are Implicit VR Little Endian: Explicit VR's 16-bit value lengths cannot hold the Contour
Data of a long contour. The Contour Sequences are pre-encoded (see ``_contour_sequence``).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import struct
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.charset import convert_encodings
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import RTStructureSetStorage

from rtcontour.common import __version__
from rtcontour.common.volume import CtSeries
from rtcontour.worker.contours import Contour, mask_to_contours
from rtcontour.worker.instance_header import MANUFACTURER, derived_instance_header

logger = logging.getLogger(__name__)

STRUCTURE_SET_LABEL = "AUTO"
# RT ROI Interpreted Type defined terms (PS3.3 C.8.8.8.1).
INTERPRETED_TYPES = frozenset(
    {
        "",
        "EXTERNAL",
        "PTV",
        "CTV",
        "GTV",
        "TREATED_VOLUME",
        "IRRAD_VOLUME",
        "OAR",
        "BOLUS",
        "AVOIDANCE",
        "ORGAN",
        "MARKER",
        "REGISTRATION",
        "ISOCENTER",
        "CONTRAST_AGENT",
        "CAVITY",
        "BRACHY_CHANNEL",
        "BRACHY_ACCESSORY",
        "BRACHY_SRC_APP",
        "BRACHY_CHNL_SHLD",
        "SUPPORT",
        "FIXATION",
        "DOSE_REGION",
        "CONTROL",
        "DOSE_MEASUREMENT",
    }
)
_DETACHED_STUDY_MANAGEMENT = "1.2.840.10008.3.1.2.3.1"  # referenced "study" SOP class by custom
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:rtcontour:rtstruct")
_CONTOUR_SEQUENCE = Tag(0x3006, 0x0040)
_CONTOUR_IMAGE_SEQUENCE = 0x30060016
_CONTOUR_GEOMETRIC_TYPE = 0x30060042
_NUMBER_OF_CONTOUR_POINTS = 0x30060046
_CONTOUR_NUMBER = 0x30060048
_CONTOUR_DATA = 0x30060050
_REFERENCED_SOP_CLASS_UID = 0x00081150
_REFERENCED_SOP_INSTANCE_UID = 0x00081155
# pydicom gives sequence items their parent's default text encoding when writing; marking
# items with the same keeps their pre-encoded elements from being decoded and re-encoded.
_ITEM_CHARACTER_SET = "iso8859"
_MAX_COORDINATE_MM = 1e8  # keeps every formatted coordinate within DS's 16 characters
@dataclass(frozen=True)
class RoiSpec:
    """What to call a structure and how to show it: TG-263 ``name``, ``colour_rgb`` 0-255 and
    ``interpreted_type`` (RT ROI Interpreted Type, e.g. "ORGAN", "PTV")."""

    name: str
    colour_rgb: tuple[int, int, int]
    interpreted_type: str = "ORGAN"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 64:
            raise ValueError(f"name {self.name!r} must be 1 to 64 characters (DICOM LO)")
        if "\\" in self.name or any(ord(ch) < 32 for ch in self.name):
            raise ValueError(f"name {self.name!r} must not contain a backslash or control codes")
        colour = tuple(self.colour_rgb)
        if len(colour) != 3 or not all(
            isinstance(v, int | np.integer) and 0 <= v <= 255 for v in colour
        ):
            raise ValueError(
                f"colour_rgb {self.colour_rgb!r} of ROI {self.name!r} must be 3 integers 0-255"
            )
        object.__setattr__(self, "colour_rgb", tuple(int(v) for v in colour))
        if self.interpreted_type not in INTERPRETED_TYPES:
            raise ValueError(
                f"interpreted_type {self.interpreted_type!r} of ROI {self.name!r} is not an RT "
                f"ROI Interpreted Type ({', '.join(sorted(t for t in INTERPRETED_TYPES if t))})"
            )


@dataclass(frozen=True)
class RtstructUids:
    """The deterministic UIDs of the RTSTRUCT for one (CT series, model) pair."""

    series_instance_uid: str
    sop_instance_uid: str


def rtstruct_uids(series_uid: str, model_name: str, model_version: str) -> RtstructUids:
    """Return the RTSTRUCT's Series and SOP Instance UIDs (2.25.<hash>) for a CT series and model.

    The same arguments give the same UIDs, so re-running a job replaces, not duplicates.
    """
    for argument, value in (
        ("series_uid", series_uid),
        ("model_name", model_name),
        ("model_version", model_version),
    ):
        if not value:
            raise ValueError(f"{argument} {value!r} must not be empty")
    name = "\\".join([series_uid, model_name, model_version])
    return RtstructUids(
        series_instance_uid=_uuid5_uid(f"series\\{name}"),
        sop_instance_uid=_uuid5_uid(f"instance\\{name}"),
    )


def _uuid5_uid(name: str) -> str:
    """A 2.25 UID (PS3.5 B.2) from a name-based UUID: same name, same UID."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def build_rtstruct(
    series: CtSeries,
    masks_by_roi: Mapping[str, np.ndarray],
    rois: Sequence[RoiSpec],
    *,
    model_name: str,
    model_version: str,
    min_area_mm2: float = 2.0,
    smoothing: bool = False,
    software_version: str = __version__,
    created_at: dt.datetime | None = None,
    observation_notes: Mapping[str, str] | None = None,
) -> Dataset:
    """Return an RT Structure Set dataset (with file meta) for masks on ``series.volume``.

    ``masks_by_roi``: roi name -> bool array (slices, rows, columns) on the series' stored
    grid (``series.volume``), one per entry of ``rois``; ``rois`` gives the order, names,
    colours and types. ``min_area_mm2``: contours enclosing less are dropped (see
    ``worker.contours.mask_to_contours``). ``software_version`` (rtcontour's by default) and
    ``model_version`` go to Software Versions. ``created_at`` (local time) defaults to now.
    ``observation_notes``: roi name -> ROI Observation Description (e.g. a review flag).
    """
    _check_arguments(series, masks_by_roi, rois, model_name, model_version, min_area_mm2)
    contours_by_roi: dict[str, list[Contour]] = {}
    for roi in rois:
        contours = mask_to_contours(
            np.asarray(masks_by_roi[roi.name], dtype=bool),
            series.volume,
            min_area_mm2=min_area_mm2,
            smoothing=smoothing,
        )
        contours_by_roi[roi.name] = contours
    # An ROI without contours is left out (rt-utils needs a ContourSequence on every ROI and
    # dciodvfy refuses an empty one); ROI Numbers keep their places in ``rois``.
    written = [(n, roi) for n, roi in enumerate(rois, start=1) if contours_by_roi[roi.name]]
    empty = [roi.name for roi in rois if not contours_by_roi[roi.name]]
    if empty:
        kept = "written without contours, since no ROI has one" if not written else "left out"
        warnings.warn(
            f"ROI {', '.join(map(repr, empty))} has no contour (empty mask, or only specks "
            f"below {min_area_mm2} mm2): {kept}",
            UserWarning,
            stacklevel=2,
        )
    if not written:  # the Structure Set ROI and ROI Contour Sequences need one item at least
        written = list(enumerate(rois, start=1))
    uids = rtstruct_uids(series.series_instance_uid, model_name, model_version)
    when = created_at or dt.datetime.now()
    dataset = _header(series, uids, model_name, model_version, software_version, when)
    dataset.ReferencedFrameOfReferenceSequence = DicomSequence([_referenced_frame(series)])
    dataset.StructureSetROISequence = DicomSequence(
        [
            _structure_set_roi(number, roi, series, model_name, model_version)
            for number, roi in written
        ]
    )
    dataset.ROIContourSequence = DicomSequence(
        [
            _roi_contour(number, roi, contours_by_roi[roi.name], series)
            for number, roi in written
        ]
    )
    notes = observation_notes or {}
    dataset.RTROIObservationsSequence = DicomSequence(
        [_observation(number, roi, notes.get(roi.name)) for number, roi in written]
    )
    dataset.ApprovalStatus = "UNAPPROVED"
    logger.info(
        "built RTSTRUCT %s for series %s: %d ROIs, %d contours",
        uids.sop_instance_uid,
        series.series_instance_uid,
        len(written),
        sum(len(c) for c in contours_by_roi.values()),
    )
    return dataset


def save_rtstruct(dataset: Dataset, path: Path) -> Path:
    """Write ``dataset`` as a DICOM Part 10 file; return the path.

    The file is Implicit VR Little Endian: Explicit VR's 16-bit lengths cannot hold the
    Contour Data of a long contour (more than ~2,000 points).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _check_arguments(
    series: CtSeries,
    masks_by_roi: Mapping[str, np.ndarray],
    rois: Sequence[RoiSpec],
    model_name: str,
    model_version: str,
    min_area_mm2: float,
) -> None:
    if not isinstance(series, CtSeries):
        raise ValueError(f"series must be a CtSeries from load_series, got {type(series)!r}")
    if not series.volume.sop_instance_uids:
        raise ValueError("series.volume has no sop_instance_uids: contours cannot be referenced")
    if not rois:
        raise ValueError("rois [] must name at least one ROI")
    names = [roi.name for roi in rois]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"rois has duplicate names {duplicates!r}")
    missing = [name for name in names if name not in masks_by_roi]
    if missing:
        raise ValueError(f"masks_by_roi has no mask for ROI {missing!r}")
    unknown = sorted(set(masks_by_roi) - set(names))
    if unknown:
        raise ValueError(f"masks_by_roi has masks {unknown!r} that no entry of rois describes")
    for name in names:
        mask = masks_by_roi[name]
        if mask.shape != series.volume.shape:
            raise ValueError(
                f"masks_by_roi[{name!r}] has shape {mask.shape}, not the series grid "
                f"{series.volume.shape} (slices, rows, columns)"
            )
        if mask.dtype != bool:
            raise ValueError(f"masks_by_roi[{name!r}] has dtype {mask.dtype}, not bool")
    for argument, value in (("model_name", model_name), ("model_version", model_version)):
        if not value or not re.fullmatch(r"[^\\\x00-\x1f]{1,64}", value):
            raise ValueError(f"{argument} {value!r} must be 1 to 64 characters, no backslash")
    if not min_area_mm2 >= 0:
        raise ValueError(f"min_area_mm2 {min_area_mm2!r} must be >= 0")
    extent = np.abs(series.volume.affine[:3, 3]).max() + np.abs(series.volume.affine[:3, :3]).sum(
        axis=1
    ).max() * max(series.volume.shape)
    if extent > _MAX_COORDINATE_MM:
        raise ValueError(f"series geometry reaches {extent:.3g} mm, too far for DS values")


def _header(
    series: CtSeries,
    uids: RtstructUids,
    model_name: str,
    model_version: str,
    software_version: str,
    when: dt.datetime,
) -> Dataset:
    dataset = derived_instance_header(
        series,
        sop_class_uid=RTStructureSetStorage,
        sop_instance_uid=uids.sop_instance_uid,
        series_instance_uid=uids.series_instance_uid,
        modality="RTSTRUCT",
        series_number=901,
        series_description=f"AUTO {model_name} {model_version}",
        model_name=model_name,
        model_version=model_version,
        software_version=software_version,
        when=when,
    )
    dataset.set_original_encoding(
        True, True, convert_encodings(series.header.get("SpecificCharacterSet", "ISO_IR 100"))
    )
    dataset.StructureSetLabel = STRUCTURE_SET_LABEL
    dataset.StructureSetName = f"AUTO {model_name}"[:64]
    dataset.StructureSetDescription = (
        f"Automatic contours by {MANUFACTURER}, model {model_name} {model_version}; "
        "not approved: review before clinical use"
    )[:1024]
    dataset.StructureSetDate = dataset.InstanceCreationDate
    dataset.StructureSetTime = dataset.InstanceCreationTime
    return dataset


def _referenced_frame(series: CtSeries) -> Dataset:
    class_uid = _encoded(_REFERENCED_SOP_CLASS_UID, _padded(series.sop_class_uid, b"\0"))
    images = b"".join(
        _encoded_item(class_uid + _encoded(_REFERENCED_SOP_INSTANCE_UID, _padded(uid, b"\0")))
        for uid in series.volume.sop_instance_uids
    )
    referenced_series = _item()
    referenced_series.SeriesInstanceUID = series.series_instance_uid
    referenced_series[_CONTOUR_IMAGE_SEQUENCE] = RawDataElement(  # type: ignore[assignment]
        Tag(_CONTOUR_IMAGE_SEQUENCE), "SQ", len(images), images, 0, True, True
    )
    referenced_study = _item()
    referenced_study.ReferencedSOPClassUID = _DETACHED_STUDY_MANAGEMENT
    referenced_study.ReferencedSOPInstanceUID = series.study_instance_uid
    referenced_study.RTReferencedSeriesSequence = DicomSequence([referenced_series])
    frame = _item()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    frame.RTReferencedStudySequence = DicomSequence([referenced_study])
    return frame


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = _item()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _structure_set_roi(
    number: int, roi: RoiSpec, series: CtSeries, model_name: str, model_version: str
) -> Dataset:
    item = _item()
    item.ROINumber = number
    item.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
    item.ROIName = roi.name
    item.ROIGenerationAlgorithm = "AUTOMATIC"
    item.ROIGenerationDescription = f"{MANUFACTURER} {model_name} {model_version}"[:64]
    algorithm = _item()
    algorithm.AlgorithmFamilyCodeSequence = DicomSequence(
        [_code("123110", "DCM", "Artificial Intelligence")]
    )
    algorithm.AlgorithmName = model_name[:64]
    algorithm.AlgorithmVersion = model_version[:64]
    algorithm.AlgorithmSource = MANUFACTURER
    item.ROIDerivationAlgorithmIdentificationSequence = DicomSequence([algorithm])
    return item


def _roi_contour(
    number: int, roi: RoiSpec, contours: Sequence[Contour], series: CtSeries
) -> Dataset:
    item = _item()
    item.ROIDisplayColor = list(roi.colour_rgb)
    if contours:
        item[_CONTOUR_SEQUENCE] = _contour_sequence(  # type: ignore[assignment]
            contours, series.sop_class_uid, series.volume.sop_instance_uids
        )
    item.ReferencedROINumber = number
    return item


def _contour_sequence(
    contours: Sequence[Contour], sop_class_uid: str, sop_uids: Sequence[str]
) -> RawDataElement:
    """Contour Sequence, encoded once (Implicit VR Little Endian) as pydicom would write it.

    Building one pydicom item per contour and one DS object per coordinate (10^5-10^6 of
    them) dominates writing an RTSTRUCT; the pre-encoded element is written as it is and
    parsed on access like any element read from a file. Coordinates are rounded to 0.1 um
    and printed in their shortest form (always within DS's 16 characters).
    """
    class_uid = _encoded(_REFERENCED_SOP_CLASS_UID, _padded(sop_class_uid, b"\0"))
    items = []
    for number, contour in enumerate(contours, start=1):
        image = class_uid + _encoded(
            _REFERENCED_SOP_INSTANCE_UID, _padded(sop_uids[contour.slice_index], b"\0")
        )
        text = "\\".join(map(repr, np.round(contour.points_mm, 4).ravel().tolist()))
        content = b"".join(
            (
                _encoded(_CONTOUR_IMAGE_SEQUENCE, _encoded_item(image)),
                _encoded(_CONTOUR_GEOMETRIC_TYPE, b"CLOSED_PLANAR "),
                _encoded(_NUMBER_OF_CONTOUR_POINTS, _padded(str(len(contour.points_mm)))),
                _encoded(_CONTOUR_NUMBER, _padded(str(number))),
                _encoded(_CONTOUR_DATA, _padded(text)),
            )
        )
        items.append(_encoded_item(content))
    value = b"".join(items)
    return RawDataElement(_CONTOUR_SEQUENCE, "SQ", len(value), value, 0, True, True)


def _padded(text: str, pad: bytes = b" ") -> bytes:
    value = text.encode("ascii")
    return value + pad if len(value) % 2 else value


def _encoded(tag: int, value: bytes) -> bytes:
    """An Implicit VR Little Endian element: tag, 32-bit length, value."""
    return struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value)) + value


def _encoded_item(content: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(content)) + content


def _item() -> Dataset:
    """A sequence item marked as Implicit VR Little Endian, so writing keeps raw elements."""
    item = Dataset()
    item.set_original_encoding(True, True, _ITEM_CHARACTER_SET)
    return item


def _observation(number: int, roi: RoiSpec, note: str | None = None) -> Dataset:
    item = _item()
    item.ObservationNumber = number
    item.ReferencedROINumber = number
    item.ROIObservationLabel = roi.name[:16]
    if note:  # e.g. "check: low confidence (0.42)", seen in the TPS beside the structure
        item.ROIObservationDescription = note[:1024]
    item.RTROIInterpretedType = roi.interpreted_type
    item.ROIInterpreter = ""
    return item
