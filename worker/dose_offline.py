"""Offline dose prediction: ``rtcontour dose CT_DIR --rtstruct RS.dcm --out RD.dcm``.

Pieces, importable for the worker pipeline and the CLI::

    series = load_series(ct_paths)                                   # common.volume
    structure_set = read_structure_set(rs_path, series)              # masks on series.volume
    prescriptions = prescriptions_from_names(structure_set.roi_names, table, overrides)
    prediction = predict_dose_for_series(series, structure_set, predictor, prescriptions)
    dataset = rtdose_for_prediction(series, structure_set, prediction, predictor)

Structure sets are read tolerantly, as many writers make them (Eclipse, RayStation, MIM,
plastimatch, rt-utils): DS values over 16 characters, holes as nested contours (even-odd
rule across a structure's contours on a slice), a structure spread over several ROI Contour
items, structures without contours. Only what cannot be used is refused
(:class:`UnusableStructureSet`, a sentence saying why): not an RTSTRUCT, another frame of
reference than the CT, no PTV with a prescription.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import pydicom.errors
from pydicom.dataset import Dataset

from rtcontour.common.errors import RtcontourError
from rtcontour.common.structure_names import to_tg263
from rtcontour.common.volume import CtSeries, load_series
from rtcontour.models.dose.features import OAR_NAMES
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.worker.rtdose import DoseVolumeHistogram, build_rtdose, cumulative_dvh, save_rtdose

__all__ = [
    "UnusableStructureSet",
    "StructureSet",
    "DosePrediction",
    "DEFAULT_PRESCRIPTION_TABLE",
    "read_structure_set",
    "rasterise_polygons",
    "prescriptions_from_names",
    "parse_prescription_overrides",
    "match_oars",
    "predict_dose_for_series",
    "dose_grid",
    "rtdose_for_prediction",
    "main",
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


@dataclass(frozen=True)
class DosePrediction:
    """Predicted dose on the CT's stored grid (``series.volume``), and what went in."""

    dose_gy: np.ndarray
    oars: dict[str, str]  # TG-263 name -> structure set ROI name
    prescriptions_gy: dict[str, float]  # PTV ROI name -> Gy
    missing_oars: tuple[str, ...]


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


def parse_prescription_overrides(text: str) -> dict[str, float]:
    """``"PTV70=70,PTV_High=66"`` -> ``{"PTV70": 70.0, "PTV_High": 66.0}`` (Gy)."""
    result: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            result[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"--prescription entry {part!r} is not NAME=GY") from None
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


def _ct_files(folder: Path) -> list[Path]:
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    if not files:
        raise SystemExit(f"rtcontour dose: no files in {folder}")
    return files


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcontour dose", description=__doc__.splitlines()[0])
    parser.add_argument("ct_dir", type=Path, help="folder with the CT series (one series)")
    parser.add_argument("--rtstruct", type=Path, required=True,
                        help="RT Structure Set with the PTVs (and OARs) on that CT")
    parser.add_argument("--out", type=Path, required=True, help="RTDOSE file to write")
    parser.add_argument("--prescription", default="",
                        help="PTV prescriptions in Gy overriding the names, e.g. PTV70=70,"
                             "PTV_High=66")
    parser.add_argument("--package", type=Path, default=None,
                        help="dose model package (default: the latest of kind dose)")
    parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints a one-line summary."""
    from rtcontour.models.package import find_latest_package

    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = parse_prescription_overrides(args.prescription)
        series = load_series(_ct_files(args.ct_dir), min_slices=1)
        structure_set = read_structure_set(args.rtstruct, series)
        prescriptions = prescriptions_from_names(structure_set.roi_names, overrides=overrides)
        predictor = DosePredictor(args.package or find_latest_package(kind="dose"),
                                  threads=args.threads)
        prediction = predict_dose_for_series(series, structure_set, predictor, prescriptions)
        dataset = rtdose_for_prediction(series, structure_set, prediction, predictor)
    except (RtcontourError, ValueError) as exc:
        print(f"rtcontour dose: {exc}", file=sys.stderr)  # noqa: T201
        return 2
    save_rtdose(dataset, args.out)
    print(f"{args.out}: predicted dose, max {prediction.dose_gy.max():.1f} Gy, PTVs "  # noqa: T201
          f"{prediction.prescriptions_gy}, OARs {sorted(prediction.oars)}"
          + (f", missing {list(prediction.missing_oars)}" if prediction.missing_oars else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
