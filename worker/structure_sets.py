"""RT Structure Sets read for dose prediction, and what their structure names say.

::

    structure_set = read_structure_set(rs_path, series)              # masks on series.volume
    prescriptions = prescriptions_from_names(structure_set.roi_names, table, overrides)
    oars = match_oars(structure_set.roi_names)                        # TG-263 name -> ROI name

Used by the dose job (``rtcontour.worker.dose_pipeline``) and ``rtcontour dose``
(``rtcontour.worker.dose_offline``).

Structure sets are read tolerantly, as many writers make them (Eclipse, RayStation, MIM,
plastimatch, rt-utils): DS values over 16 characters, holes as nested contours (even-odd
rule across a structure's contours on a slice), a structure spread over several ROI Contour
items, structures without contours. Only what cannot be used is refused
(:class:`UnusableStructureSet`, a sentence saying why): not an RTSTRUCT, another frame of
reference than the CT, no PTV with a prescription.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from rtcontour.common.errors import RtcontourError
from rtcontour.common.structure_names import to_tg263
from rtcontour.common.volume import CtSeries
from rtcontour.models.dose.features import OAR_NAMES

__all__ = [
    "UnusableStructureSet",
    "StructureSet",
    "DEFAULT_PRESCRIPTION_TABLE",
    "read_structure_set",
    "rasterise_polygons",
    "prescriptions_from_names",
    "match_oars",
]

log = logging.getLogger(__name__)

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
# Names without their dose, as some clinics use: PTV name (case-insensitive) -> Gy.
DEFAULT_PRESCRIPTION_TABLE: dict[str, float] = {
    "PTV_High": 70.0, "PTV_Mid": 63.0, "PTV_Int": 63.0, "PTV_Low": 56.0,
}
_PTV_NAME = re.compile(
    r"^PTV[\s_\-]*(?P<number>\d+(?:[.,]\d+)?)\s*(?P<unit>cGy|Gy)?(?![a-z0-9])", re.IGNORECASE)
_IN_SLICE_TOLERANCE = 0.25  # of the slice spacing: contour points farther off a slice are off


class UnusableStructureSet(RtcontourError):  # noqa: N818 - domain name, like InvalidSeries
    """A structure set that cannot drive a dose prediction; the message says why."""


@dataclass(frozen=True)
class StructureSet:
    """An RTSTRUCT rasterised on a CT series' stored grid.

    ``masks``: ROI name -> bool (slices, rows, columns) on ``series.volume`` (only ROIs with
    at least one usable contour); ``roi_numbers``: ROI name -> ROI Number; ``empty``: names of
    ROIs without usable contours; ``sop_instance_uid``: of the RTSTRUCT.
    """

    sop_instance_uid: str
    frame_of_reference_uid: str
    masks: dict[str, np.ndarray]
    roi_numbers: dict[str, int]
    empty: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def roi_names(self) -> list[str]:
        return list(self.masks)


def rasterise_polygons(polygons: Iterable[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Fill polygons ((n, 2) row/column index coordinates) at pixel centres, even-odd.

    By hand rather than Pillow's ImageDraw (the one installed drawing library): Pillow fills
    a polygon together with its outline pixels and has no even-odd rule across polygons,
    while planning systems fill at pixel centres and cut nested contours out as holes.
    """
    rows, columns = shape
    crossings = np.zeros((rows, columns + 1), dtype=np.int32)
    centres = np.arange(rows, dtype=np.float64)
    for polygon in polygons:
        start = np.asarray(polygon, dtype=np.float64)
        if len(start) < 3:
            continue
        end = np.roll(start, -1, axis=0)
        for (r1, c1), (r2, c2) in zip(start, end, strict=True):
            if r1 == r2:
                continue
            low, high = (r1, r2) if r1 < r2 else (r2, r1)
            hit = centres[(centres >= low) & (centres < high)]
            if hit.size == 0:
                continue
            cols = c1 + (hit - r1) * (c2 - c1) / (r2 - r1)
            first_inside = np.clip(np.ceil(cols).astype(np.int64), 0, columns)
            np.add.at(crossings, (hit.astype(np.int64), first_inside), 1)
    return (np.cumsum(crossings, axis=1)[:, :columns] % 2).astype(bool)


def _read_dataset(source: Path | str | Dataset) -> Dataset:
    if isinstance(source, Dataset):
        return source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # over-long DS values and the like: read anyway
            return pydicom.dcmread(source, force=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise UnusableStructureSet(f"The structure set {source} is not readable DICOM: "
                                   f"{exc}.") from exc


def _floats(values: object) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]


def read_structure_set(source: Path | str | Dataset, series: CtSeries) -> StructureSet:
    """Read an RTSTRUCT and rasterise each structure on ``series.volume``'s grid.

    Contours are assigned to the nearest CT slice (points more than a quarter slice spacing
    off a slice are dropped, with a note); all contours of a structure on a slice combine by
    the even-odd rule, over however many ROI Contour items name it.
    """
    dataset = _read_dataset(source)
    sop_class = str(dataset.get("SOPClassUID", ""))
    if sop_class != RTSTRUCT_SOP_CLASS and dataset.get("Modality") != "RTSTRUCT":
        raise UnusableStructureSet(f"The object is not an RT Structure Set (SOP Class "
                                   f"{sop_class or 'missing'}).")
    frames = {str(item.get("FrameOfReferenceUID", ""))
              for item in dataset.get("ReferencedFrameOfReferenceSequence", [])}
    frames |= {str(item.get("ReferencedFrameOfReferenceUID", ""))
               for item in dataset.get("StructureSetROISequence", [])}
    frames.discard("")
    if frames and series.frame_of_reference_uid not in frames:
        raise UnusableStructureSet(
            f"The structure set is on frame of reference {sorted(frames)}, not the CT's "
            f"{series.frame_of_reference_uid}.")
    names = {int(item.ROINumber): str(item.get("ROIName", f"ROI_{item.ROINumber}")).strip()
             for item in dataset.get("StructureSetROISequence", [])}
    volume = series.volume
    polygons: dict[str, dict[int, list[np.ndarray]]] = {name: {} for name in names.values()}
    notes: list[str] = []
    for roi in dataset.get("ROIContourSequence", []):
        number = int(roi.get("ReferencedROINumber", -1))
        name = names.get(number)
        if name is None:
            notes.append(f"ROI Contour item for ROI number {number} has no structure; ignored")
            continue
        for contour in roi.get("ContourSequence", []) or []:
            if str(contour.get("ContourGeometricType", "CLOSED_PLANAR")) != "CLOSED_PLANAR":
                continue
            points = _floats(contour.get("ContourData", [])).reshape(-1, 3)
            if len(points) < 3:
                continue
            index = volume.lps_to_index(points)
            slice_index = int(np.rint(np.median(index[:, 0])))
            if (np.abs(index[:, 0] - slice_index).max() > _IN_SLICE_TOLERANCE
                    or not 0 <= slice_index < volume.shape[0]):
                notes.append(f"{name}: a contour off the CT slices was dropped")
                continue
            polygons[name].setdefault(slice_index, []).append(index[:, 1:])
    masks: dict[str, np.ndarray] = {}
    empty: list[str] = []
    for name, by_slice in polygons.items():
        mask = np.zeros(volume.shape, dtype=bool)
        for slice_index, slice_polygons in by_slice.items():
            mask[slice_index] = rasterise_polygons(slice_polygons, volume.shape[1:])
        if mask.any():
            masks[name] = mask
        else:
            empty.append(name)
    for note in notes:
        log.warning("structure set %s: %s", dataset.get("SOPInstanceUID", "?"), note)
    return StructureSet(
        sop_instance_uid=str(dataset.get("SOPInstanceUID", "")),
        frame_of_reference_uid=series.frame_of_reference_uid,
        masks=masks,
        roi_numbers={name: number for number, name in names.items()},
        empty=tuple(empty),
        notes=tuple(notes),
    )


def prescriptions_from_names(
    names: Iterable[str],
    table: Mapping[str, float] | None = None,
    overrides: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """PTV ROI name -> prescription in Gy.

    ``overrides`` (exact names) win, then ``table`` (case-insensitive names; default
    :data:`DEFAULT_PRESCRIPTION_TABLE`), then the number in the name: PTV70, PTV_70,
    PTV_70Gy, PTV 59.4 in Gy; PTV7000, PTV_5400cGy in cGy (a number of 1000 or more without a
    unit is cGy). Names that yield nothing are not PTVs with a prescription and are left out.
    """
    lookup = {key.lower(): float(value) for key, value in
              (DEFAULT_PRESCRIPTION_TABLE if table is None else table).items()}
    result: dict[str, float] = {}
    for name in names:
        if overrides and name in overrides:
            result[name] = float(overrides[name])
            continue
        if name.lower() in lookup:
            result[name] = lookup[name.lower()]
            continue
        match = _PTV_NAME.match(name.strip())
        if not match:
            continue
        number = float(match["number"].replace(",", "."))
        unit = (match["unit"] or "").lower()
        gy = number / 100.0 if unit == "cgy" or (not unit and number >= 1000) else number
        if 0 < gy <= 150:
            result[name] = gy
        else:
            log.warning("PTV %r: %g Gy is no prescription; the structure is left out", name, gy)
    for name, value in (overrides or {}).items():
        if not 0 < float(value) <= 150:
            raise ValueError(f"prescription override {name}={value!r} must be in (0, 150] Gy")
    return result


def match_oars(names: Iterable[str]) -> dict[str, str]:
    """TG-263 OAR name (of the dose model) -> the structure set ROI name that is that OAR,
    by :func:`common.structure_names.to_tg263` (TG-263 name or a synonym); first match wins."""
    found: dict[str, str] = {}
    for name in names:
        oar = to_tg263(name)
        if oar in OAR_NAMES and oar not in found:
            found[oar] = name
    return found
