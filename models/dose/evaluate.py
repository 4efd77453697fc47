"""Evaluate a dose package on an OpenKBP split by the challenge's own scores
(``python -m rtcontour.models.dose.evaluate --package DIR [--split validation]``).

Each patient's CT, OARs, PTVs (prescriptions from their names) and possible-dose mask (as
the body) go through :class:`models.dose.predict.DosePredictor`, which predicts on the coarse
model grid and resamples to the patient's 128^3 grid; scores are computed there
(:mod:`models.dose.metrics`). No torch import.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rtcontour.models.dose.data import OpenKbpPatient, list_cases, load_openkbp_patient
from rtcontour.models.dose.features import OAR_NAMES
from rtcontour.models.dose.metrics import dose_score, dvh_metrics, dvh_score
from rtcontour.models.dose.predict import DosePredictor, normalise_to_prescription
from rtcontour.models.package import find_latest_package

__all__ = ["evaluate_patient", "evaluate_package", "format_table", "main"]

log = logging.getLogger(__name__)


def _structures(patient: OpenKbpPatient) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    oars = {name: mask for name, mask in zip(OAR_NAMES, patient.oar_masks, strict=True)
            if mask is not None}
    return oars, dict(patient.ptv_masks)


def evaluate_patient(predictor: DosePredictor, patient: OpenKbpPatient,
                     normalise: bool = False) -> dict[str, Any]:
    """Scores of one patient: dose score, reference and predicted DVH metrics (``normalise``:
    of the prediction scaled to its highest PTV's prescription at D95)."""
    oars, ptvs = _structures(patient)
    predicted = predictor.predict(patient.hu.astype(np.float32), patient.spacing_mm, oars,
                                  patient.ptvs, body_mask=patient.possible_dose_mask)
    factor: float | None = 1.0
    if normalise:
        predicted, factor = normalise_to_prescription(predicted, patient.ptvs)
    reference_metrics = dvh_metrics(patient.dose_gy, oars, ptvs, patient.spacing_mm)
    predicted_metrics = dvh_metrics(predicted * patient.possible_dose_mask, oars, ptvs,
                                    patient.spacing_mm)
    return {
        "case": patient.case_id,
        "dose_score_gy": dose_score(patient.dose_gy, predicted, patient.possible_dose_mask),
        "reference": reference_metrics,
        "predicted": predicted_metrics,
        "normalisation_factor": factor,
    }


def evaluate_package(
    package: Path | str,
    data_dir: Path,
    split: str = "validation",
    limit: int | None = None,
    threads: int | None = None,
    mirror_tta: bool = True,
    upsampling_order: int = 3,
    normalise: bool = False,
) -> dict[str, Any]:
    """Challenge scores of ``package`` over ``split`` (JSON-ready dict); ``bias_gy`` per DVH
    metric is the mean of predicted minus planned (negative: under-dosed)."""
    predictor = DosePredictor(package, threads=threads, mirror_tta=mirror_tta,
                              upsampling_order=upsampling_order)
    paths = list_cases(data_dir, split)[:limit]
    cases = []
    started = time.monotonic()
    for path in paths:
        case = evaluate_patient(predictor, load_openkbp_patient(path), normalise)
        log.info("%s: dose score %.3f Gy", case["case"], case["dose_score_gy"])
        cases.append(case)
    elapsed = time.monotonic() - started
    per_metric: dict[str, list[float]] = defaultdict(list)
    for case in cases:
        for key, value in case["reference"].items():
            per_metric[f"{key[0]} {key[1]}"].append(case["predicted"][key] - value)
    return {
        "package": str(package),
        "split": split,
        "mirror_tta": mirror_tta,
        "upsampling": "cubic" if upsampling_order == 3 else "linear",
        "normalised_to_prescription": normalise,
        "n_cases": len(cases),
        "dose_score_gy": float(np.mean([c["dose_score_gy"] for c in cases])),
        "dvh_score_gy": dvh_score([c["reference"] for c in cases],
                                  [c["predicted"] for c in cases]),
        "seconds_per_case": elapsed / max(1, len(cases)),
        "per_metric": {name: {"mae_gy": float(np.mean(np.abs(v))), "bias_gy": float(np.mean(v)),
                              "n_cases": len(v)}
                       for name, v in sorted(per_metric.items())},
        "per_case": [{"case": c["case"], "dose_score_gy": c["dose_score_gy"]} for c in cases],
    }


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of the per-metric errors and the two challenge scores."""
    lines = ["| metric | structure | MAE (Gy) | bias (Gy) | patients |",
             "| --- | --- | --- | --- | --- |"]
    for name, row in results["per_metric"].items():
        metric, structure = name.split(" ", 1)
        bias = f"{row['bias_gy']:+.2f}" if "bias_gy" in row else "-"
        lines.append(f"| {metric} | {structure} | {row['mae_gy']:.2f} | {bias} | "
                     f"{row['n_cases']} |")
    lines.append(f"| **DVH score** | all | **{results['dvh_score_gy']:.3f}** | "
                 f"{results['n_cases']} |")
    lines.append(f"| **dose score** | possible-dose mask | **{results['dose_score_gy']:.3f}** | "
                 f"{results['n_cases']} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: prints the table (and writes ``--json-out``)."""
    from rtcontour.models.data import default_data_dir

    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.dose.evaluate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--package", type=Path, default=None,
                        help="dose package folder (default: the latest under models/packages)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--split", default="validation", choices=("train", "validation"))
    parser.add_argument("--limit", type=int, default=None, help="first N patients only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--no-mirror-tta", action="store_true",
                        help="predict once, without the left/right mirrored average")
    parser.add_argument("--normalise", action="store_true",
                        help="scale each prediction so that its highest PTV's D95 equals the "
                             "prescription, as planners normalise a plan")
    parser.add_argument("--linear-upsampling", action="store_true",
                        help="return the model-grid dose to the CT grid linearly (default: "
                             "cubic B-spline)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    package = args.package or find_latest_package(kind="dose")
    results = evaluate_package(package, args.data_dir or default_data_dir(), args.split,
                               args.limit, args.threads, mirror_tta=not args.no_mirror_tta,
                               upsampling_order=1 if args.linear_upsampling else 3,
                               normalise=args.normalise)
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"{results['split']}: {results['n_cases']} patients, "  # noqa: T201
          f"{results['seconds_per_case']:.1f} s per patient")
    print(format_table(results))  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
