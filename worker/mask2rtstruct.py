"""``rtcontour mask2rtstruct CT_DIR LABELMAP --labels LABELS.json --out RS.dcm``.

Writes an RTSTRUCT for a CT series from a NIfTI (.nii, .nii.gz) or NRRD (.nrrd, .nhdr) label
map. The label map's own orientation is honoured (NIfTI is RAS; NRRD's ``space`` is
left-posterior-superior or right-anterior-superior): every CT voxel centre is looked up in
the label map in patient coordinates (nearest neighbour), so the result is never flipped and
is exact when the grids coincide. LABELS.json maps label values to ROI names, optionally
with colours and types::

    {"1": "Brainstem", "2": {"name": "Parotid_L", "colour": [0, 128, 255], "type": "ORGAN"}}

CT_DIR may hold other files (they are skipped); if it holds several CT series, choose one with
``--series-uid``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtcontour.common.cli_args import parse_args
from rtcontour.common.errors import InvalidSeries
from rtcontour.common.volume import Volume, load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from rtcontour.worker.series_folder import ct_series_files

logger = logging.getLogger(__name__)

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
_PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
)  # fmt: skip
_NRRD_SPACES = {
    "left-posterior-superior": np.eye(4),
    "lps": np.eye(4),
    "right-anterior-superior": _RAS_TO_LPS,
    "ras": _RAS_TO_LPS,
}


class LabelMapError(ValueError):
    """A label map or label table that cannot be used; the message says why."""


@dataclass(frozen=True, eq=False)
class LabelMap:
    """Integer labels ``array`` (i, j, k as stored in the file) and ``affine`` index -> LPS mm."""

    array: np.ndarray
    affine: np.ndarray


@dataclass(frozen=True)
class LabelEntry:
    """One row of LABELS.json: label ``value`` and the ROI it becomes."""

    value: int
    roi: RoiSpec


def read_label_map(path: Path) -> LabelMap:
    """Read a NIfTI or NRRD label map with its voxel-to-LPS affine."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)  # type: ignore[attr-defined]
        affine = _RAS_TO_LPS @ np.array(image.affine, dtype=np.float64)  # type: ignore[attr-defined]
    elif name.endswith((".nrrd", ".nhdr")):
        import nrrd

        array, header = nrrd.read(str(path))
        affine = _nrrd_affine(header, path)
    else:
        raise LabelMapError(f"label map {path} is neither NIfTI (.nii, .nii.gz) nor NRRD (.nrrd)")
    array = np.squeeze(array)
    if array.ndim != 3:
        raise LabelMapError(f"label map {path} has shape {array.shape}; a 3-D volume is needed")
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise LabelMapError(f"label map {path} holds non-integer values")
        array = array.astype(np.int64)
    return LabelMap(array=array, affine=affine)


def _nrrd_affine(header: dict, path: Path) -> np.ndarray:
    space = str(header.get("space", "")).lower()
    if space not in _NRRD_SPACES:
        raise LabelMapError(
            f"label map {path} has NRRD space {header.get('space')!r}; "
            "left-posterior-superior or right-anterior-superior is needed"
        )
    directions = np.asarray(header.get("space directions"), dtype=float)
    if directions.shape != (3, 3) or not np.all(np.isfinite(directions)):
        raise LabelMapError(f"label map {path} lacks 3 spatial 'space directions'")
    affine = np.eye(4)
    affine[:3, :3] = directions.T  # row d of 'space directions' is axis d's step
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    return _NRRD_SPACES[space] @ affine


def resample_nearest(label_map: LabelMap, volume: Volume) -> np.ndarray:
    """Labels at each voxel centre of ``volume`` (slices, rows, columns), nearest neighbour.

    Centres outside the label map get 0. When each volume axis runs along one label-map axis
    (the usual case) the lookup is separable and costs one 1-D index per axis.
    """
    to_label = np.linalg.inv(label_map.affine) @ volume.affine
    linear = to_label[:3, :3]
    source_axes = np.argmax(np.abs(linear), axis=0)
    off_axis = linear.copy()
    off_axis[source_axes, range(3)] = 0.0
    shape = label_map.array.shape
    if sorted(source_axes) == [0, 1, 2] and np.all(np.abs(off_axis) < 1e-6):
        indices = []
        for axis in range(3):
            steps = np.arange(volume.shape[axis])
            source = source_axes[axis]
            position = linear[source, axis] * steps + to_label[source, 3]
            indices.append(np.rint(position).astype(np.int64))
        valid = [(idx >= 0) & (idx < shape[source_axes[a]]) for a, idx in enumerate(indices)]
        clipped = [np.clip(idx, 0, shape[source_axes[a]] - 1) for a, idx in enumerate(indices)]
        order = np.argsort(source_axes)  # label axis -> volume axis
        lookup = label_map.array[np.ix_(*(clipped[a] for a in order))]
        result = np.transpose(lookup, np.argsort(order))
        inside = valid[0][:, None, None] & valid[1][None, :, None] & valid[2][None, None, :]
        return np.where(inside, result, 0)
    result = np.zeros(volume.shape, dtype=label_map.array.dtype)
    rows, cols = np.mgrid[: volume.shape[1], : volume.shape[2]]
    for slice_index in range(volume.shape[0]):
        voxel = np.stack([np.full(rows.size, slice_index), rows.ravel(), cols.ravel()], axis=1)
        position = np.rint(voxel @ linear.T + to_label[:3, 3]).astype(np.int64)
        inside = np.all((position >= 0) & (position < np.array(shape)), axis=1)
        values = np.zeros(rows.size, dtype=label_map.array.dtype)
        values[inside] = label_map.array[tuple(position[inside].T)]
        result[slice_index] = values.reshape(rows.shape)
    return result


def read_labels(path: Path) -> list[LabelEntry]:
    """Read LABELS.json: {"value": "name"} or {"value": {"name", "colour", "type"}}."""
    try:
        table = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LabelMapError(f"labels file {path} cannot be read as JSON: {error}") from error
    if not isinstance(table, dict) or not table:
        raise LabelMapError(f"labels file {path} must be a non-empty object of value: ROI")
    entries = []
    for position, (key, spec) in enumerate(table.items()):
        try:
            value = int(key)
        except ValueError as error:
            raise LabelMapError(f"label {key!r} in {path} is not an integer") from error
        if value == 0:
            raise LabelMapError(f"label 0 in {path} is background and cannot be an ROI")
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, dict) or "name" not in spec:
            raise LabelMapError(f"label {key!r} in {path} needs a name")
        colour = spec.get("colour", spec.get("color", _PALETTE[position % len(_PALETTE)]))
        if not isinstance(colour, list | tuple) or len(colour) != 3:
            raise LabelMapError(
                f"label {key!r} in {path}: colour_rgb {colour!r} must be 3 integers 0-255"
            )
        red, green, blue = colour
        try:
            roi = RoiSpec(str(spec["name"]), (red, green, blue), str(spec.get("type", "ORGAN")))
        except (TypeError, ValueError) as error:
            raise LabelMapError(f"label {key!r} in {path}: {error}") from error
        entries.append(LabelEntry(value, roi))
    return entries


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtcontour mask2rtstruct",
        description="Write an RTSTRUCT for a CT series from a NIfTI/NRRD label map.",
    )
    parser.add_argument("ct_dir", type=Path, help="folder holding the CT series' files")
    parser.add_argument("label_map", type=Path, help="label map (.nii, .nii.gz, .nrrd)")
    parser.add_argument("--labels", type=Path, required=True, help="LABELS.json")
    parser.add_argument("--out", type=Path, required=True, help="RTSTRUCT file to write")
    parser.add_argument(
        "--min-area-mm2",
        type=float,
        default=0.0,
        help="drop contours enclosing less than this (default 0: keep all)",
    )
    parser.add_argument("--smoothing", action="store_true", help="cut staircase corners")
    parser.add_argument(
        "--algorithm-name",
        default="mask2rtstruct",
        help="name recorded as the ROI derivation algorithm",
    )
    parser.add_argument("--algorithm-version", default="1", help="its version")
    parser.add_argument(
        "--series-uid",
        help="the CT series to use when CT_DIR holds several (default: the only one)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; return 0 on success, 1 when the inputs are refused."""
    args = parse_args(_parser(), argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        series = load_series(ct_series_files(args.ct_dir, args.series_uid), min_slices=1)
        labels = read_labels(args.labels)
        on_ct = resample_nearest(read_label_map(args.label_map), series.volume)
        dataset = build_rtstruct(
            series,
            {entry.roi.name: on_ct == entry.value for entry in labels},
            [entry.roi for entry in labels],
            model_name=args.algorithm_name,
            model_version=args.algorithm_version,
            min_area_mm2=args.min_area_mm2,
            smoothing=args.smoothing,
        )
        save_rtstruct(dataset, args.out)
    except (InvalidSeries, LabelMapError, ValueError) as error:
        sys.stderr.write(f"rtcontour mask2rtstruct: {error}\n")
        return 1
    sys.stdout.write(f"wrote {args.out} ({len(labels)} ROIs)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
