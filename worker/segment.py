"""``rtcontour segment CT_DIR --out RS.dcm [--model PKG]``: contour one CT series offline.

No job store, broker or network: the CT series in ``CT_DIR`` (other files skipped; with
several series, the one ``--series-uid`` names) is loaded, segmented with the model package
and written as an RTSTRUCT. Exit status: 0 done, 2 the series was refused (the reason is
printed), 3 model package problem.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
import warnings
from pathlib import Path

from rtcontour.common.cli_args import parse_args
from rtcontour.common.errors import InvalidSeries, ModelPackageError
from rtcontour.common.settings import Settings
from rtcontour.common.volume import load_series
from rtcontour.worker.pipeline import (
    SegmenterCache,
    review_notes,
    segment_on_ct_grid,
    structure_summary,
)
from rtcontour.worker.rtstruct import build_rtstruct, save_rtstruct
from rtcontour.worker.series_folder import SeriesChoiceError, ct_series_files

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rtcontour segment",
        description="Contour one CT series offline (no database, queue or network): a folder "
        "of DICOM files in, an RTSTRUCT file out. Exit status: 0 written, 2 the series was "
        "refused (the reason is printed), 3 the model package cannot be used.",
    )
    parser.add_argument("ct_dir", type=Path, help="folder holding the CT series (DICOM files)")
    parser.add_argument("--out", type=Path, required=True, help="RTSTRUCT file to write")
    parser.add_argument(
        "--model", type=Path, help="model package folder (default: RTCONTOUR_MODEL_PACKAGE, "
        "else the newest in models/packages)"
    )
    parser.add_argument("--overlap", type=float, help="sliding-window overlap (0-0.9)")
    parser.add_argument("--mirror-tta", action="store_true", help="mirror test-time augmentation")
    parser.add_argument(
        "--series-uid",
        help="the CT series to contour when CT_DIR holds several (default: the only one)",
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING or ERROR")
    args = parse_args(parser, argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, object] = {}
    if args.model is not None:
        overrides["model_package"] = args.model
    if args.overlap is not None:
        overrides["inference_overlap"] = args.overlap
    if args.mirror_tta:
        overrides["mirror_tta"] = True
    settings = Settings.model_validate(overrides)

    try:
        files = ct_series_files(args.ct_dir, args.series_uid)
    except SeriesChoiceError as exc:
        _say(f"rtcontour segment: {exc}", error=True)
        return 2
    timings: dict[str, float] = {}
    try:
        started = time.perf_counter()
        series = load_series(
            files, min_slices=settings.min_slices, gap_tolerance=settings.slice_gap_tolerance
        )
        timings["load"] = time.perf_counter() - started
        started = time.perf_counter()
        model = SegmenterCache().get(settings)
        masks, quality = segment_on_ct_grid(series, model)
        timings["inference"] = time.perf_counter() - started
        started = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dataset = build_rtstruct(
                series,
                masks,
                list(model.rois),
                model_name=model.name,
                model_version=model.version,
                min_area_mm2=settings.min_contour_area_mm2,
                smoothing=settings.smoothing,
                observation_notes=review_notes(quality),
            )
        out = args.out.resolve()
        temp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
        save_rtstruct(dataset, temp)
        os.replace(temp, out)
        timings["contours"] = time.perf_counter() - started
    except InvalidSeries as exc:
        _say(f"rtcontour segment: series refused: {exc}", error=True)
        return 2
    except ModelPackageError as exc:
        _say(f"rtcontour segment: model package problem: {exc}", error=True)
        return 3
    _say(f"wrote {out} (SOP Instance UID {dataset.SOPInstanceUID})")
    _say(f"model {model.name} {model.version}; {series.n_instances} CT images referenced")
    for structure in structure_summary(series, masks, model.rois, quality):
        if not structure["found"]:
            _say(f"  {structure['roi_name']:<16} {'not found in the scan':>24}")
            continue
        flag = ""
        if "confidence" in structure:
            flag = f"  confidence {structure['confidence']:.2f}"
            flag += "  CHECK FIRST" if structure["flag"] == "review" else ""
        _say(f"  {structure['roi_name']:<16} {structure['volume_cc']:>10.1f} cc{flag}")
    _say("  ".join(f"{stage} {seconds:.2f} s" for stage, seconds in timings.items()))
    return 0


def _say(text: str, error: bool = False) -> None:
    """The command's output (a CLI: stdout for results, stderr for refusals)."""
    (sys.stderr if error else sys.stdout).write(text + "\n")
