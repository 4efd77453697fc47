"""RTSTRUCT writing: rtcontour vs rt-utils on the same masks and CT series.

    python -m bench.bench_rtstruct [--patient pt_10.npz] [--rounds 5] [--slices 128]

An OpenKBP patient's CT and structures are upsampled in-plane to 512x512 (nearest
neighbour) and written as a DICOM series. Each writer turns the same masks into an RTSTRUCT;
we time it (median of ``--rounds`` warm rounds, after one warm-up), rasterise its output with
plastimatch on the CT grid (``plastimatch convert --xor-contours``, so inner contours are
holes) and report the mean and worst Dice against the source masks and dciodvfy's error count.
Needs ``pip install rt-utils`` (bench only; it brings OpenCV).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtcontour.common.volume import CtSeries, Volume, load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from tests.phantoms import openkbp_ct, openkbp_masks, write_ct_series
from tests.worker.conftest import plastimatch_masks  # the tests' independent rasteriser

OPENKBP_TRAIN = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "openkbp" / "train"
COLOURS = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


@dataclass(frozen=True)
class Result:
    writer: str
    write_s: float
    end_to_end_s: float
    mean_dice: float
    worst_dice: float
    worst_roi: str
    dciodvfy_errors: int
    n_points: int


def _median_time(run: Callable[[], object], rounds: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ours(series: CtSeries, masks: dict[str, np.ndarray], out: Path) -> Path:
    rois = [RoiSpec(name, COLOURS[i % len(COLOURS)]) for i, name in enumerate(masks)]
    dataset = build_rtstruct(
        series, masks, rois, model_name="bench", model_version="1", min_area_mm2=0.0
    )
    return save_rtstruct(dataset, out)


def _ours_end_to_end(ct_dir: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    series = load_series(sorted(ct_dir.iterdir()), min_slices=1)
    return _ours(series, masks, out)


def _rt_utils(rtstruct: object, masks: dict[str, np.ndarray], out: Path) -> Path:
    for index, (name, mask) in enumerate(masks.items()):
        # rt-utils wants (rows, columns, slices), slices in ascending position: our stored order.
        rtstruct.add_roi(  # type: ignore[attr-defined]
            mask=mask.transpose(1, 2, 0), color=list(COLOURS[index % len(COLOURS)]), name=name
        )
    with contextlib.redirect_stdout(io.StringIO()):
        rtstruct.save(str(out))  # type: ignore[attr-defined]
    return out


def _rt_utils_end_to_end(ct_dir: Path, masks: dict[str, np.ndarray], out: Path) -> Path:
    from rt_utils import RTStructBuilder

    return _rt_utils(RTStructBuilder.create_new(dicom_series_path=str(ct_dir)), masks, out)


def _dciodvfy_errors(path: Path) -> int:
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return sum(line.startswith("Error") for line in (result.stdout + result.stderr).splitlines())


def _plastimatch_dice(
    rs_path: Path, ct_dir: Path, volume: Volume, masks: dict[str, np.ndarray], work: Path
) -> dict[str, float]:
    out = work / f"raster-{rs_path.stem}"
    rasters = plastimatch_masks(rs_path, ct_dir, out, volume)
    dice = {}
    for name, mask in masks.items():
        raster = rasters.get(name)
        if raster is None:
            dice[name] = 0.0
            continue
        dice[name] = float(2 * np.sum(raster & mask) / (raster.sum() + mask.sum()))
    return dice


def _n_points(rs_path: Path) -> int:
    import pydicom

    dataset = pydicom.dcmread(rs_path)
    return sum(
        int(contour.NumberOfContourPoints)
        for roi in dataset.ROIContourSequence
        for contour in roi.get("ContourSequence", [])
    )


def _prepare(
    patient: str, n_slices: int, work: Path
) -> tuple[Path, CtSeries, dict[str, np.ndarray]]:
    npz = OPENKBP_TRAIN / patient
    if not npz.exists():
        sys.exit(f"OpenKBP patient not found: {npz.resolve()}")
    hu, spacing = openkbp_ct(npz)
    first = max(0, (hu.shape[0] - n_slices) // 2)
    chosen = slice(first, first + n_slices)

    def upsample(array: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(array[chosen], 4, axis=1), 4, axis=2)

    ct_dir = work / "ct"
    paths = write_ct_series(ct_dir, upsample(hu), (spacing[0], spacing[1] / 4, spacing[2] / 4))
    series = load_series(paths, min_slices=1)
    masks = {
        name: series.volume.array_from_canonical(upsample(mask))
        for name, mask in openkbp_masks(npz).items()
    }
    return ct_dir, series, {name: mask for name, mask in masks.items() if mask.any()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="pt_10.npz")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--slices", type=int, default=128)
    args = parser.parse_args(argv)
    for tool in ("plastimatch", "dciodvfy"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    try:
        from rt_utils import RTStructBuilder
    except ImportError:
        sys.exit("rt-utils is not installed: pip install rt-utils")

    with tempfile.TemporaryDirectory(prefix="bench-rtstruct-") as tmp:
        work = Path(tmp)
        ct_dir, series, masks = _prepare(args.patient, args.slices, work)
        n_voxels = sum(int(m.sum()) for m in masks.values())
        print(
            f"{args.patient}: {series.volume.shape} voxels (slices, rows, columns), "
            f"{len(masks)} structures, {n_voxels} mask voxels, {args.rounds} rounds"
        )
        results = []

        ours_path = work / "ours.dcm"
        ours_write = _median_time(lambda: _ours(series, masks, ours_path), args.rounds)
        ours_e2e = _median_time(
            lambda: _ours_end_to_end(ct_dir, masks, ours_path), max(1, args.rounds // 2)
        )
        rt_path = work / "rtutils.dcm"
        loaded = {}

        def rt_write() -> None:
            # rt-utils keeps adding ROIs to one object: start from a fresh one each round,
            # built outside the timing (like our already loaded series).
            _rt_utils(loaded["rtstruct"], masks, rt_path)

        def rt_round() -> float:
            loaded["rtstruct"] = RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
            start = time.perf_counter()
            rt_write()
            return time.perf_counter() - start

        rt_round()
        rt_write_s = statistics.median(rt_round() for _ in range(args.rounds))
        rt_e2e = _median_time(
            lambda: _rt_utils_end_to_end(ct_dir, masks, rt_path), max(1, args.rounds // 2)
        )
        for writer, path, write_s, e2e in (
            ("rtcontour", ours_path, ours_write, ours_e2e),
            ("rt-utils 1.2.7", rt_path, rt_write_s, rt_e2e),
        ):
            dice = _plastimatch_dice(path, ct_dir, series.volume, masks, work)
            worst = min(dice, key=dice.__getitem__)
            results.append(
                Result(
                    writer,
                    write_s,
                    e2e,
                    float(np.mean(list(dice.values()))),
                    dice[worst],
                    worst,
                    _dciodvfy_errors(path),
                    _n_points(path),
                )
            )

    header = (
        f"{'writer':<16}{'write s':>9}{'+load s':>9}{'mean Dice':>11}{'worst Dice':>12}"
        f"  {'worst ROI':<13}{'dciodvfy errors':>16}{'points':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.writer:<16}{r.write_s:>9.3f}{r.end_to_end_s:>9.3f}{r.mean_dice:>11.5f}"
            f"{r.worst_dice:>12.5f}  {r.worst_roi:<13}{r.dciodvfy_errors:>16}{r.n_points:>9}"
        )
    ours, theirs = results
    print(
        f"speed-up: {theirs.write_s / ours.write_s:.1f}x writing (series loaded), "
        f"{theirs.end_to_end_s / ours.end_to_end_s:.1f}x including loading the series"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
