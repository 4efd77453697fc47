"""What the dashboard shows of a job's images: the viewer's data (the CT volume and the
contours as polygons, rendered in the browser) and preview PNGs (CT planes, soft-tissue
window, with the RTSTRUCT's contours).

Everything is computed on the CT's **canonical** grid (docs/ARCHITECTURE.md: axis 0
superior->inferior, axis 1 anterior->posterior, axis 2 patient right->left), which gives the
conventional display orientation by plain slicing:

- axial ``hu[k]``: anterior up, patient left on the image's right (viewed from the feet);
- coronal ``hu[:, k]``: superior up, patient left on the image's right (viewed from the front);
- sagittal ``hu[:, :, k]``: superior up, anterior on the image's left.

Images are scaled so one image pixel covers the same millimetres in both directions.
Contours are filled with the even-odd rule at pixel centres (the rule the RTSTRUCT writer's
round trip uses), then drawn as an outline in the ROI's display colour.

The viewer gets the canonical CT as int16 little-endian bytes (gzip-compressed once, cached)
with its shape, spacing and affine, and each structure's closed planar contours as polygons
in canonical voxel coordinates (row, column) per axial slice; its colours are made visible on
a greyscale CT (``display_colour``). A dose job's predicted dose comes as its RTDOSE grid in
canonical orientation (uint16 cGy) with where that grid lies on the CT's (``ViewerDose``).
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import threading
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pydicom
from PIL import Image
from scipy import ndimage

from rtcontour.common.errors import InvalidSeries, RtcontourError
from rtcontour.common.volume import Volume, load_series

logger = logging.getLogger(__name__)

Plane = Literal["axial", "coronal", "sagittal"]
PLANES: tuple[Plane, ...] = ("axial", "coronal", "sagittal")
WINDOW_WIDTH_HU = 400.0
WINDOW_LEVEL_HU = 40.0
DISPLAY_SIZE_PX = 512  # longest side of a preview image
DEFAULT_COLOUR = (255, 255, 0)


class PreviewUnavailable(RtcontourError):  # noqa: N818 - domain name, like InvalidSeries
    """A job whose CT or RTSTRUCT cannot be shown (no output yet, files missing)."""


class PreviewOutOfRange(ValueError):  # noqa: N818
    """A plane index outside the volume."""


@dataclass(frozen=True, eq=False)
class RoiCrossings:
    """One ROI as the crossings of its contours with the canonical grid's pixel-centre rows.

    Each crossing ``i`` lies on slice ``slice_index[i]``, row ``row[i]``, and toggles
    inside/outside for every pixel centre at column >= ``column[i]`` (even-odd rule).
    """

    roi_name: str
    colour: tuple[int, int, int]
    slice_index: np.ndarray
    row: np.ndarray
    column: np.ndarray


@dataclass(frozen=True, eq=False)
class PreviewVolume:
    """A CT in canonical orientation (int16 HU, (slices, rows, columns)) and its ROIs."""

    hu: np.ndarray
    spacing_mm: tuple[float, float, float]
    rois: tuple[RoiCrossings, ...]

    def size(self, plane: Plane) -> int:
        """Number of images in ``plane``."""
        return int(self.hu.shape[PLANES.index(plane)])

    def roi_mask(self, roi: RoiCrossings, plane: Plane, index: int) -> np.ndarray:
        """Bool mask of ``roi`` on the plane image (same shape as ``plane_image``)."""
        n_slices, n_rows, n_cols = self.hu.shape
        if plane == "axial":
            keep = roi.slice_index == index
            toggles = np.zeros((n_rows, n_cols + 1), np.uint8)
            np.add.at(toggles, (roi.row[keep], roi.column[keep]), 1)
            return (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :n_cols] & 1).astype(bool)
        if plane == "coronal":
            keep = roi.row == index
            toggles = np.zeros((n_slices, n_cols + 1), np.uint8)
            np.add.at(toggles, (roi.slice_index[keep], roi.column[keep]), 1)
            return (np.cumsum(toggles, axis=1, dtype=np.uint8)[:, :n_cols] & 1).astype(bool)
        keep = roi.column <= index  # crossings left of (or at) the column's pixel centres
        counts = np.zeros((n_slices, n_rows), np.uint8)
        np.add.at(counts, (roi.slice_index[keep], roi.row[keep]), 1)
        return (counts & 1).astype(bool)

    def plane_image(self, plane: Plane, index: int) -> tuple[np.ndarray, tuple[float, float]]:
        """The HU image of ``plane`` at ``index`` and its pixel size (down, across) in mm."""
        if not 0 <= index < self.size(plane):
            raise PreviewOutOfRange(
                f"index {index} is outside the {plane} range 0-{self.size(plane) - 1}"
            )
        s, r, c = self.spacing_mm
        if plane == "axial":
            return self.hu[index], (r, c)
        if plane == "coronal":
            return self.hu[:, index, :], (s, c)
        return self.hu[:, :, index], (s, r)


def _crossings(
    roi_name: str, colour: tuple[int, int, int], polygons: list[np.ndarray], shape: tuple[int, ...]
) -> RoiCrossings:
    """Crossings of closed polygons (each (n, 3) canonical index coordinates) with pixel rows."""
    n_slices, n_rows, n_cols = shape
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for points in polygons:
        slice_index = int(round(float(points[:, 0].mean())))
        if not 0 <= slice_index < n_slices or len(points) < 3:
            continue
        y0, x0 = points[:, 1], points[:, 2]
        y1, x1 = np.roll(y0, -1), np.roll(x0, -1)
        low, high = np.minimum(y0, y1), np.maximum(y0, y1)
        # Rows y with low <= y < high (half-open: a vertex on a row is counted once).
        first, stop = np.ceil(low).astype(np.int64), np.ceil(high).astype(np.int64)
        first, stop = np.clip(first, 0, n_rows), np.clip(stop, 0, n_rows)
        counts = np.maximum(stop - first, 0)
        if counts.sum() == 0:
            continue
        edge = np.repeat(np.arange(len(y0)), counts)
        offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = first[edge] + offsets
        t = (rows - y0[edge]) / (y1[edge] - y0[edge])
        x = x0[edge] + t * (x1[edge] - x0[edge])
        columns = np.clip(np.floor(x).astype(np.int64) + 1, 0, n_cols)
        parts.append((np.full(len(rows), slice_index), rows, columns))
    if parts:
        slices, rows, columns = (np.concatenate(p) for p in zip(*parts, strict=True))
    else:
        slices = rows = columns = np.zeros(0, np.int64)
    return RoiCrossings(roi_name, colour, slices, rows, columns)


def _read_ct(folder: Path) -> list[pydicom.Dataset]:
    datasets: list[pydicom.Dataset] = []
    for path in sorted(folder.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
        except Exception:
            logger.warning("preview: %s is not readable DICOM, skipped", path.name)
            continue
        if getattr(ds, "Modality", "") == "CT" and "PixelData" in ds:
            datasets.append(ds)
    return datasets


def load_canonical_ct(ct_folder: Path) -> Volume:
    """The CT series in ``ct_folder`` in canonical orientation, HU as int16.

    Raises ``PreviewUnavailable`` with a sentence naming what is missing.
    """
    if not ct_folder.is_dir():
        raise PreviewUnavailable("the job's CT images are no longer in its spool folder")
    datasets = _read_ct(ct_folder)
    if not datasets:
        raise PreviewUnavailable("the job's spool folder holds no CT images")
    try:
        series = load_series(datasets, min_slices=1)
    except InvalidSeries as error:
        raise PreviewUnavailable(f"the job's CT cannot be shown: {error}") from None
    canonical = series.volume.to_canonical()
    hu = np.clip(np.rint(canonical.array), -32768, 32767).astype(np.int16)
    return canonical.with_array(hu)


@dataclass(frozen=True, eq=False)
class RoiPolygons:
    """One ROI of a structure set: its closed planar contours, each (n, 3) fractional
    canonical voxel indices (slice, row, column), and its DICOM display colour."""

    roi_name: str
    colour: tuple[int, int, int]
    polygons: tuple[np.ndarray, ...]


def read_structure_set(rtstruct_path: Path, canonical: Volume) -> list[RoiPolygons]:
    """Every ROI of the RTSTRUCT at ``rtstruct_path`` on ``canonical``'s grid (ROIs without
    contours included, with none). Raises ``PreviewUnavailable`` if it cannot be read."""
    try:
        structure_set = pydicom.dcmread(rtstruct_path)
    except Exception:
        raise PreviewUnavailable("the job's RTSTRUCT cannot be read") from None
    names = {
        int(item.ROINumber): str(item.ROIName)
        for item in getattr(structure_set, "StructureSetROISequence", [])
    }
    rois = []
    for roi_contour in getattr(structure_set, "ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        colour_values = getattr(roi_contour, "ROIDisplayColor", None)
        colour = tuple(int(v) for v in colour_values)[:3] if colour_values else DEFAULT_COLOUR
        polygons = []
        for contour in getattr(roi_contour, "ContourSequence", []):
            if getattr(contour, "ContourGeometricType", "CLOSED_PLANAR") != "CLOSED_PLANAR":
                continue
            points_mm = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            if len(points_mm) >= 3:
                polygons.append(canonical.lps_to_index(points_mm))
        rois.append(
            RoiPolygons(names.get(number, f"ROI {number}"), colour, tuple(polygons))  # type: ignore[arg-type]
        )
    return rois


def load_preview_volume(
    ct_folder: Path, rtstruct_path: Path, canonical: Volume | None = None
) -> PreviewVolume:
    """Read the CT series in ``ct_folder`` (or take ``canonical``, already read) and the
    contours of ``rtstruct_path``.

    Raises ``PreviewUnavailable`` with a sentence naming what is missing.
    """
    canonical = canonical if canonical is not None else load_canonical_ct(ct_folder)
    hu = canonical.array
    rois = [
        _crossings(roi.roi_name, roi.colour, list(roi.polygons), hu.shape)
        for roi in read_structure_set(rtstruct_path, canonical)
    ]
    return PreviewVolume(hu=hu, spacing_mm=canonical.spacing_mm, rois=tuple(rois))


# Saturated colours for ROIs whose own colour would vanish on a greyscale CT (white, grey,
# black), picked by name so a structure keeps its colour from job to job.
VISIBLE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 140, 0), (0, 200, 255), (255, 0, 200), (140, 255, 0), (255, 210, 0),
    (170, 90, 255), (0, 255, 170), (255, 80, 80),
)


def display_colour(roi_name: str, colour: Sequence[int]) -> tuple[int, int, int]:
    """``colour`` as drawn over a greyscale CT: a grey, white or black one (e.g.
    Bone_Mandible's (230, 230, 230), invisible on bone) becomes a saturated palette colour
    chosen by ``roi_name``; a dark one is brightened. Others are returned unchanged."""
    red, green, blue = (int(v) for v in colour[:3])
    if max(red, green, blue) - min(red, green, blue) < 60:
        return VISIBLE_PALETTE[zlib.crc32(roi_name.encode()) % len(VISIBLE_PALETTE)]
    brightest = max(red, green, blue)
    if brightest < 150:
        scale = 200 / brightest
        return (round(red * scale), round(green * scale), round(blue * scale))
    return (red, green, blue)


@dataclass(frozen=True, eq=False)
class ViewerCt:
    """A job's CT as the viewer receives it: ``volume`` (canonical, int16 HU), and its bytes
    (int16 little-endian, C order (slices, rows, columns)) gzip-compressed once."""

    volume: Volume
    gzip_bytes: bytes

    @property
    def raw_bytes(self) -> bytes:
        return self.volume.array.astype("<i2", copy=False).tobytes()

    def meta(self) -> dict[str, Any]:
        """Shape, spacing, affine (canonical voxel index -> LPS mm) and HU range."""
        hu = self.volume.array
        return {
            "shape": list(self.volume.shape),
            "spacing_mm": [round(v, 6) for v in self.volume.spacing_mm],
            "affine": [[round(float(v), 6) for v in row] for row in self.volume.affine],
            "frame_of_reference_uid": self.volume.frame_of_reference_uid,
            "dtype": "int16",
            "byte_order": "little",
            "hu_min": int(hu.min()) if hu.size else 0,
            "hu_max": int(hu.max()) if hu.size else 0,
        }


def make_viewer_ct(volume: Volume) -> ViewerCt:
    raw = volume.array.astype("<i2", copy=False).tobytes()
    return ViewerCt(volume, gzip.compress(raw, compresslevel=1, mtime=0))


@dataclass(frozen=True)
class ContourSource:
    """A structure set to draw: ``source`` "rtcontour" (its own RTSTRUCT, solid),
    "approved" (the clinicians' set, dashed) or "borrowed" (rtcontour's contours a dose
    prediction used where the approved set had none); ``details`` per ROI name: extra fields
    (flag, confidence, the rtcontour structure an approved ROI was matched to);
    ``roi_names``: only these ROIs of the file (None: all)."""

    source: str
    path: Path
    details: dict[str, dict[str, Any]]
    roi_names: frozenset[str] | None = None


def contour_polygons(roi: RoiPolygons, n_slices: int) -> dict[str, list[list[float]]]:
    """``{slice index: [[row0, col0, row1, col1, ...], ...]}`` (voxel coordinates, 0.01)."""
    slices: dict[str, list[list[float]]] = {}
    for points in roi.polygons:
        slice_index = int(round(float(points[:, 0].mean())))
        if not 0 <= slice_index < n_slices:
            continue
        flat = np.round(points[:, 1:3], 2).reshape(-1).tolist()
        slices.setdefault(str(slice_index), []).append(flat)
    return slices


def viewer_contours(ct: ViewerCt, sources: Sequence[ContourSource]) -> bytes:
    """JSON of every structure of ``sources`` as polygons per axial slice of ``ct``."""
    structures = []
    n_slices = ct.volume.shape[0]
    colours: dict[str, tuple[int, int, int]] = {}
    for source in sources:
        for roi in read_structure_set(source.path, ct.volume):
            if source.roi_names is not None and roi.roi_name not in source.roi_names:
                continue
            details = dict(source.details.get(roi.roi_name, {}))
            # An approved ROI is drawn in the colour of the rtcontour structure it matches.
            matched = details.get("matches")
            colour = colours.get(str(matched)) if matched else None
            shown = colour or display_colour(roi.roi_name, roi.colour)
            if source.source == "rtcontour":
                colours[roi.roi_name] = shown
            structures.append({
                "roi_name": roi.roi_name,
                "source": source.source,
                "colour": list(roi.colour),
                "display_colour": list(shown),
                "flag": details.get("flag"),
                "confidence": details.get("confidence"),
                "matches": matched,
                "slices": contour_polygons(roi, n_slices),
            })
    return json.dumps({"structures": structures}, separators=(",", ":")).encode()


_GRID_TOLERANCE = 1e-3  # CT voxels: a dose grid axis off the CT's axes by more is refused
_SAME_SPACING_MM = 1e-3  # RTDOSE frame offsets closer than this to even count as even


def read_rtdose(rtdose_path: Path) -> Volume:
    """The dose of an RTDOSE file in Gy (float32, (frames, rows, columns)) with its affine.

    Raises ``PreviewUnavailable`` when the file cannot be read or its grid is not regular.
    """
    try:
        dataset = pydicom.dcmread(rtdose_path)
        pixels = np.asarray(dataset.pixel_array, dtype=np.float64)
        scaling = float(dataset.get("DoseGridScaling", 1.0) or 1.0)
        position = np.asarray(dataset.ImagePositionPatient, dtype=np.float64)
        orientation = np.asarray(dataset.ImageOrientationPatient, dtype=np.float64)
        spacing = np.asarray(dataset.PixelSpacing, dtype=np.float64)
        offsets = np.asarray(dataset.get("GridFrameOffsetVector") or [0.0], dtype=np.float64)
    except Exception:
        raise PreviewUnavailable("the job's RTDOSE cannot be read") from None
    if pixels.ndim == 2:
        pixels = pixels[None]
    steps = np.diff(offsets)
    if len(offsets) != pixels.shape[0] or (steps.size and (
            steps.min() <= 0 or np.ptp(steps) > _SAME_SPACING_MM)):
        raise PreviewUnavailable("the job's RTDOSE frames are not evenly spaced")
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    affine = np.eye(4)
    affine[:3, 0] = normal * (float(steps[0]) if steps.size else 1.0)
    affine[:3, 1] = column_cosines * spacing[0]
    affine[:3, 2] = row_cosines * spacing[1]
    # Offsets of the "relative" kind (PS3.3 C.8.8.3.2): frame 0 lies offsets[0] along the normal.
    affine[:3, 3] = position + offsets[0] * normal
    frame_of_reference = str(dataset.get("FrameOfReferenceUID", ""))
    return Volume((pixels * scaling).astype(np.float32), affine, frame_of_reference)


@dataclass(frozen=True, eq=False)
class ViewerDose:
    """A predicted dose as the viewer receives it: ``volume`` the RTDOSE grid in canonical
    orientation, uint16 cGy; dose voxel (i, j, k) lies at the CT's canonical voxel index
    ``origin_index + step * (i, j, k)`` (the grids share their axes; the dose grid is coarser
    in-plane and cropped to where there is dose)."""

    volume: Volume
    origin_index: tuple[float, float, float]
    step: tuple[float, float, float]
    max_gy: float
    gzip_bytes: bytes

    def meta(self) -> dict[str, Any]:
        return {
            "shape": list(self.volume.shape),
            "origin_index": [round(v, 4) for v in self.origin_index],
            "step": [round(v, 4) for v in self.step],
            "dtype": "uint16",
            "byte_order": "little",
            "units": "cGy",
            "max_gy": round(self.max_gy, 2),
        }


def make_viewer_dose(rtdose_path: Path, ct: Volume) -> ViewerDose:
    """The RTDOSE at ``rtdose_path`` placed on ``ct`` (the canonical CT it was predicted on).

    Raises ``PreviewUnavailable`` when it is unreadable, in another frame of reference, or its
    grid's axes are not the CT's.
    """
    dose = read_rtdose(rtdose_path)
    if dose.frame_of_reference_uid and ct.frame_of_reference_uid and (
            dose.frame_of_reference_uid != ct.frame_of_reference_uid):
        raise PreviewUnavailable("the RTDOSE is in another frame of reference than the CT")
    try:
        canonical = dose.to_canonical()
    except RtcontourError:
        raise PreviewUnavailable("the RTDOSE grid is not axial like the CT") from None
    mapping = np.linalg.inv(ct.affine) @ canonical.affine
    scale = np.diag(mapping[:3, :3])
    off_diagonal = mapping[:3, :3] - np.diag(scale)
    if np.abs(off_diagonal).max() > _GRID_TOLERANCE or (scale <= 0).any():
        raise PreviewUnavailable("the RTDOSE grid's axes are not the CT's")
    gy = canonical.array
    cgy = np.clip(np.rint(gy * 100.0), 0, 65535).astype("<u2")
    return ViewerDose(
        volume=canonical.with_array(cgy),
        origin_index=(float(mapping[0, 3]), float(mapping[1, 3]), float(mapping[2, 3])),
        step=(float(scale[0]), float(scale[1]), float(scale[2])),
        max_gy=float(gy.max()) if gy.size else 0.0,
        gzip_bytes=gzip.compress(cgy.tobytes(), compresslevel=1, mtime=0),
    )


def render_png(volume: PreviewVolume, plane: Plane, index: int) -> bytes:
    """PNG of one plane: W400/L40 greyscale, square millimetres, ROI outlines in colour."""
    image_hu, (down_mm, across_mm) = volume.plane_image(plane, index)
    low = WINDOW_LEVEL_HU - WINDOW_WIDTH_HU / 2
    grey = np.clip((image_hu.astype(np.float32) - low) / WINDOW_WIDTH_HU * 255.0, 0, 255)
    height_mm, width_mm = image_hu.shape[0] * down_mm, image_hu.shape[1] * across_mm
    scale = DISPLAY_SIZE_PX / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    picture = Image.fromarray(grey.astype(np.uint8), mode="L").resize(
        size, Image.Resampling.BILINEAR
    )
    rgb = np.array(picture.convert("RGB"))
    for roi in volume.rois:
        mask = volume.roi_mask(roi, plane, index)
        if not mask.any():
            continue
        shown = (
            np.array(
                Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize(
                    size, Image.Resampling.NEAREST
                )
            )
            > 127
        )
        outline = shown & ~ndimage.binary_erosion(shown, iterations=2, border_value=0)
        rgb[outline] = roi.colour
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


_Value = TypeVar("_Value")


class _Lru:
    """A small thread-safe LRU whose loads run once per key (concurrent askers wait)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[tuple[Any, ...], threading.Lock] = {}

    def get(self, key: tuple[Any, ...], load: Callable[[], _Value]) -> _Value:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]  # type: ignore[no-any-return]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                if key in self._items:
                    return self._items[key]  # type: ignore[no-any-return]
            try:
                value = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._items[key] = value
                while len(self._items) > self.capacity:
                    self._items.popitem(last=False)
            return value


def _stamp(path: Path, missing: str) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        raise PreviewUnavailable(missing) from None


class PreviewCache:
    """The last few loaded CTs (for the viewer and the previews), preview volumes and contour
    sets, keyed by job id and file state.

    Loading a CT takes about a second; the viewer and the previews ask many times for one job.
    """

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._cts = _Lru(capacity)
        self._items = _Lru(capacity)
        self._contours = _Lru(4 * capacity)
        self._doses = _Lru(capacity)

    def ct(self, job_id: str, ct_folder: Path) -> ViewerCt:
        """The job's canonical CT and its compressed bytes."""
        stamp = _stamp(ct_folder, "the job's CT images are no longer in its spool folder")
        return self._cts.get(
            (job_id, str(ct_folder), stamp),
            lambda: make_viewer_ct(load_canonical_ct(ct_folder)),
        )

    def get(self, job_id: str, ct_folder: Path, rtstruct_path: Path) -> PreviewVolume:
        """The preview volume of the job's CT and RTSTRUCT."""
        stamp = _stamp(rtstruct_path, "the job's RTSTRUCT file is missing from the archive")
        return self._items.get(
            (job_id, str(rtstruct_path), stamp),
            lambda: load_preview_volume(
                ct_folder, rtstruct_path, self.ct(job_id, ct_folder).volume
            ),
        )

    def contours(
        self, job_id: str, ct_folder: Path, sources: Sequence[ContourSource]
    ) -> bytes:
        """The viewer's contour JSON of ``sources`` on the job's CT."""
        key: tuple[Any, ...] = (job_id, str(ct_folder)) + tuple(
            (
                source.source,
                str(source.path),
                _stamp(source.path, f"the {source.source} structure set file is missing"),
                json.dumps(source.details, sort_keys=True, default=str),
                tuple(sorted(source.roi_names)) if source.roi_names is not None else None,
            )
            for source in sources
        )
        return self._contours.get(
            key, lambda: viewer_contours(self.ct(job_id, ct_folder), sources)
        )

    def dose(self, job_id: str, ct_folder: Path, rtdose_path: Path) -> ViewerDose:
        """A dose job's RTDOSE on the CT of ``ct_folder``."""
        stamp = _stamp(rtdose_path, "the job's RTDOSE file is missing from the archive")
        return self._doses.get(
            (job_id, str(ct_folder), str(rtdose_path), stamp),
            lambda: make_viewer_dose(rtdose_path, self.ct(job_id, ct_folder).volume),
        )
