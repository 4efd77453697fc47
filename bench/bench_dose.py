"""Offline dose prediction from DICOM: CT series + RTSTRUCT -> RTDOSE, stage by stage.

    python -m bench.bench_dose [--patient pt_201.npz] [--upsample 4] [--package DIR]

An OpenKBP validation patient's CT is upsampled in-plane (nearest neighbour, 128 -> 512 by
default, as a planning CT) and written as a DICOM series; its OARs (TG-263 names) and PTVs
(PTV70, PTV63, PTV56) are written as an RTSTRUCT by rtcontour's writer. We time the stages of
``rtcontour dose`` (worker.dose_offline) and print a table, with the dose score of the
DICOM path against the planned dose (nearest-upsampled the same way) inside the
possible-dose mask. Needs a dose package (``models/packages``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rtcontour.common.volume import load_series
from rtcontour.models.dose.data import load_openkbp_patient
from rtcontour.models.dose.features import OAR_NAMES
from rtcontour.models.dose.predict import DosePredictor
from rtcontour.models.labels import ORGANS
from rtcontour.models.package import find_latest_package
from rtcontour.worker.dose_prediction import predict_dose_for_series, rtdose_for_prediction
from rtcontour.worker.rtdose import save_rtdose
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
from rtcontour.worker.structure_sets import prescriptions_from_names, read_structure_set
from tests.phantoms import write_ct_series

OPENKBP_VALIDATION = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" /
                      "openkbp" / "validation")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patient", default="pt_201.npz")
    parser.add_argument("--upsample", type=int, default=4, help="in-plane factor")
    parser.add_argument("--package", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    patient = load_openkbp_patient(OPENKBP_VALIDATION / args.patient)
    factor = args.upsample

    def up(array: np.ndarray) -> np.ndarray:
        return np.repeat(np.repeat(array, factor, axis=1), factor, axis=2)

    spacing = (patient.spacing_mm[0], patient.spacing_mm[1] / factor,
               patient.spacing_mm[2] / factor)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        paths = write_ct_series(folder / "ct", up(patient.hu.astype(np.float32)), spacing)
        series = load_series(paths, min_slices=1)
        structures: dict[str, np.ndarray] = {}
        specs = []
        for organ, mask in zip(ORGANS, patient.oar_masks, strict=True):
            if mask is not None and mask.any():
                structures[organ.roi_name] = series.volume.array_from_canonical(up(mask))
                specs.append(RoiSpec(organ.roi_name, organ.colour_rgb, "ORGAN"))
        for name, mask in patient.ptv_masks.items():
            structures[name] = series.volume.array_from_canonical(up(mask))
            specs.append(RoiSpec(name, (255, 0, 0), "PTV"))
        rs_path = save_rtstruct(build_rtstruct(series, structures, specs, model_name="bench",
                                               model_version="0.0.0", min_area_mm2=0.0),
                                folder / "RS.dcm")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        series = load_series(paths, min_slices=1)
        timings["load CT series"] = time.perf_counter() - started
        tick = time.perf_counter()
        structure_set = read_structure_set(rs_path, series)
        prescriptions = prescriptions_from_names(structure_set.roi_names)
        timings["read + rasterise RTSTRUCT"] = time.perf_counter() - tick
        tick = time.perf_counter()
        predictor = DosePredictor(args.package or find_latest_package(kind="dose"),
                                  threads=args.threads)
        timings["load dose package"] = time.perf_counter() - tick
        tick = time.perf_counter()
        prediction = predict_dose_for_series(series, structure_set, predictor, prescriptions)
        timings["predict dose"] = time.perf_counter() - tick
        tick = time.perf_counter()
        dataset = rtdose_for_prediction(series, structure_set, prediction, predictor)
        save_rtdose(dataset, folder / "RD.dcm")
        timings["DVHs + write RTDOSE"] = time.perf_counter() - tick
        timings["total"] = time.perf_counter() - started
        canonical_dose = series.volume.with_array(prediction.dose_gy).to_canonical().array
        mask = up(patient.possible_dose_mask)
        score = float(np.abs(canonical_dose[mask] - up(patient.dose_gy)[mask]).mean())
    shape = series.volume.shape
    print(f"patient {args.patient}: CT {shape[0]} x {shape[1]} x {shape[2]}, "  # noqa: T201
          f"{len(structures)} structures ({len(OAR_NAMES)} OARs known to the model), "
          f"package {predictor.manifest.name}-{predictor.manifest.version}")
    print("| stage | seconds |\n| --- | --- |")  # noqa: T201
    for stage, seconds in timings.items():
        print(f"| {stage} | {seconds:.2f} |")  # noqa: T201
    print(f"| dose score of the DICOM path (Gy) | {score:.2f} |")  # noqa: T201
    return 0


if __name__ == "__main__":
    sys.exit(main())
