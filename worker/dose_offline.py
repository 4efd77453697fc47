"""Offline dose prediction: ``rtcontour dose CT_DIR --rtstruct RS.dcm --out RD.dcm``.

The command line over the pieces the dose job uses too::

    series = load_series(ct_paths)                                   # common.volume
    structure_set = read_structure_set(rs_path, series)              # worker.structure_sets
    prescriptions = prescriptions_from_names(structure_set.roi_names, table, overrides)
    prediction = predict_dose_for_series(series, structure_set, predictor, prescriptions)
    dataset = rtdose_for_prediction(series, structure_set, prediction, predictor)
                                                                     # worker.dose_prediction
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rtcontour.common.errors import RtcontourError
from rtcontour.common.volume import load_series
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.worker.dose_prediction import predict_dose_for_series, rtdose_for_prediction
from rtcontour.worker.rtdose import save_rtdose
from rtcontour.worker.structure_sets import prescriptions_from_names, read_structure_set

__all__ = ["build_parser", "main", "parse_prescription_overrides"]


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
