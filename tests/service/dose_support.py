"""A finished dose job for the API and dashboard tests, without the dose model.

A contour job holds a phantom CT and rtcontour's RTSTRUCT (Body, Brainstem); the clinicians'
approved structure set (PTV70, Parotid Lt) is the dose job's input; the "prediction" is a
smooth dose centred on the PTV whose D95 is 92 % of the prescription (as the trial found
for the real model: not normalised); Brainstem is borrowed from rtcontour's contours.
The RTDOSE and its summary are written by the worker's own writers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom

from rtcontour.common.jobstore import Job
from tests.service.api_support import ApiHarness

PRESCRIPTION_GY = 70.0
PTV_COLOUR = (255, 0, 0)
PAROTID_COLOUR = (0, 0, 255)
BRAINSTEM_COLOUR = (0, 255, 255)
SHAPE = (24, 96, 96)  # canonical (slices, rows, columns): the head and air around it
HEAD_SHAPE = (24, 64, 64)
PAD = 16  # voxels of air on each side of the head, in rows and columns
SPACING_MM = (2.5, 2.0, 2.0)


@dataclass(frozen=True)
class DoseJobs:
    contour: Job
    dose: Job
    ptv: np.ndarray  # canonical bool mask
    dose_gy: np.ndarray  # canonical float Gy, as predicted (on the CT grid)


def _ball(centre: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    grid = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    squared = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, SPACING_MM, strict=True))
    return np.asarray(squared <= radius_mm**2)


def add_dose_job(harness: ApiHarness, **dose_values: Any) -> DoseJobs:
    """A done contour job and its done dose job (RTDOSE archived, summary recorded)."""
    from rtcontour.common.volume import load_series
    from rtcontour.worker.dose_pipeline import dvh_summary
    from rtcontour.worker.dose_prediction import dose_grid
    from rtcontour.worker.rtdose import build_rtdose, cumulative_dvh, save_rtdose
    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
    from tests.phantoms import HeadPhantom, head_phantom, write_ct_series

    head = head_phantom(HEAD_SHAPE, SPACING_MM)
    around = ((0, 0), (PAD, PAD), (PAD, PAD))
    phantom = HeadPhantom(hu=np.pad(head.hu, around, constant_values=float(head.hu.min())),
                         spacing_mm=SPACING_MM, marker=np.pad(head.marker, around),
                         body=np.pad(head.body, around))
    contour = harness.add_job(state="done", series_description="CT 2.5mm", **dose_values)
    ct_folder = harness.settings.spool_dir / "jobs" / contour.id
    paths = write_ct_series(ct_folder, phantom.hu, phantom.spacing_mm,
                            series_description="CT 2.5mm", seed=3)
    series = load_series(paths, min_slices=1)
    harness.store.set_spool_dir(contour.id, str(ct_folder), len(paths))
    stored = series.volume.array_from_canonical

    centre = (12, 32 + PAD, 30 + PAD)
    ptv = _ball(centre, 14.0) & phantom.body
    parotid = np.zeros(SHAPE, dtype=bool)
    parotid[9:15, 30 + PAD:38 + PAD, 44 + PAD:50 + PAD] = True
    brainstem = np.zeros(SHAPE, dtype=bool)
    brainstem[4:10, 36 + PAD:42 + PAD, 29 + PAD:35 + PAD] = True

    ours = build_rtstruct(
        series, {"Body": stored(phantom.body), "Brainstem": stored(brainstem)},
        [RoiSpec("Body", (0, 255, 0), "EXTERNAL"), RoiSpec("Brainstem", BRAINSTEM_COLOUR)],
        model_name="hn-oar", model_version="1.0.0")
    ours_path = save_rtstruct(ours, harness.settings.archive_dir / contour.id / "RS.dcm")
    harness.store.record_output(
        contour.id, kind="RTSTRUCT", sop_instance_uid=str(ours.SOPInstanceUID),
        path=str(ours_path),
        summary=[{"roi_name": "Body", "colour": [0, 255, 0]},
                 {"roi_name": "Brainstem", "colour": list(BRAINSTEM_COLOUR)}])

    approved = build_rtstruct(
        series, {"PTV70": stored(ptv), "Parotid Lt": stored(parotid)},
        [RoiSpec("PTV70", PTV_COLOUR, "PTV"), RoiSpec("Parotid Lt", PAROTID_COLOUR)],
        model_name="clinic", model_version="1")
    dose_job = harness.add_job(state="done", kind="dose", source_job_id=contour.id,
                               series_description="Approved structures", modality="RTSTRUCT",
                               model_name="rtcontour-hn-dose", model_version="1.0.0",
                               **dose_values)
    dose_folder = harness.settings.spool_dir / "jobs" / dose_job.id
    save_rtstruct(approved, dose_folder / f"{approved.SOPInstanceUID}.dcm")
    harness.store.set_spool_dir(dose_job.id, str(dose_folder), 1)

    # A smooth fall-off from the PTV's centre, scaled so its D95 is 92 % of 70 Gy.
    grid = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    distance = np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in
                           zip(grid, centre, SPACING_MM, strict=True)))
    shape_gy = np.exp(-((distance / 26.0) ** 2)) * phantom.body
    d95 = float(np.percentile(shape_gy[ptv], 5))
    dose_canonical = (shape_gy * (0.92 * PRESCRIPTION_GY / d95)).astype(np.float32)
    dose_stored = stored(dose_canonical)

    masks = {"PTV70": stored(ptv), "Parotid Lt": stored(parotid), "Brainstem": stored(brainstem)}
    numbers = {str(item.ROIName): int(item.ROINumber)
               for item in approved.StructureSetROISequence}
    voxel_cc = float(np.prod(SPACING_MM)) / 1000.0
    dvhs = [cumulative_dvh(dose_stored, masks[name], numbers[name], voxel_cc)
            for name in ("PTV70", "Parotid Lt")]
    dose_array, affine = dose_grid(dose_stored, series.volume.affine, series.volume.spacing_mm)
    rtdose = build_rtdose(dose_array, affine, series,
                          structure_set_uid=str(approved.SOPInstanceUID),
                          model_name="rtcontour-hn-dose", model_version="1.0.0", dvhs=dvhs,
                          prescriptions_gy={"PTV70": PRESCRIPTION_GY})
    rtdose_path = save_rtdose(rtdose, harness.settings.archive_dir / dose_job.id / "RD.dcm")
    summary = dvh_summary(dose_stored, masks, {"PTV70": PRESCRIPTION_GY},
                          {"Parotid_L": "Parotid Lt", "Brainstem": "Brainstem"},
                          ("Brainstem",), series.volume.spacing_mm)
    harness.store.record_output(dose_job.id, kind="RTDOSE",
                                sop_instance_uid=str(rtdose.SOPInstanceUID),
                                path=str(rtdose_path), summary=summary)
    harness.store.add_note(dose_job.id, "OARs not in the structure set, taken from rtcontour's "
                           "own contours: Brainstem.")
    assert pydicom.dcmread(rtdose_path).Modality == "RTDOSE"
    return DoseJobs(harness.store.get(contour.id), harness.store.get(dose_job.id), ptv,
                    dose_canonical)
