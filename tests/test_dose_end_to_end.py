"""Dose and QA end to end: storescu sends a CT, the RTSTRUCT comes back; storescu then sends
the approved structure set (PTV and OARs drawn with rt-utils, as a third-party tool would,
with a clinic's names) -> storescp receives an RTDOSE that dciodvfy accepts, on the CT's frame
of reference, whose dose matches the offline ``rtcontour dose``, and the contour job shows
what the clinicians changed (``qa``), structure by structure under their names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from rtcontour.common.volume import load_series
from tests.conftest import (
    StoreScp,
    api_job,
    serve_env,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)
from tests.worker.conftest import dciodvfy_errors

rt_utils = pytest.importorskip("rt_utils", reason="rt-utils is not installed (extra 'dev')")

SHAPE = (24, 64, 64)




def approved_structure_set(ct_dir: Path, out: Path) -> Path:
    """A structure set drawn with rt-utils on the CT: PTV70 (a box) and the seven OARs by a
    clinic's names (boxes), so the prediction uses exactly what the clinicians sent."""
    builder = rt_utils.RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
    boxes = {
        "PTV70": (slice(24, 40), slice(24, 40), slice(8, 16)),
        "Brain Stem": (slice(36, 44), slice(28, 36), slice(14, 20)),
        "Cord": (slice(44, 50), slice(30, 34), slice(2, 22)),
        "Parotid Lt": (slice(20, 30), slice(42, 52), slice(6, 14)),
        "Parotid Rt": (slice(20, 30), slice(12, 22), slice(6, 14)),
        "Oesophagus": (slice(40, 46), slice(30, 36), slice(1, 8)),
        "Larynx": (slice(30, 36), slice(28, 36), slice(3, 8)),
        "Mandible": (slice(10, 18), slice(16, 48), slice(10, 14)),
    }
    for name, box in boxes.items():
        mask = np.zeros((64, 64, SHAPE[0]), dtype=bool)
        mask[box] = True
        builder.add_roi(mask=mask, name=name)
    out.parent.mkdir(parents=True, exist_ok=True)
    builder.save(str(out))
    return out


def test_approved_structure_set_in_predicted_rtdose_out(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path, tiny_dose_package: Path
) -> None:
    env = serve_env(tmp_path / "var", destinations=tps.destination, model_package=test_package,
                    extra={"RTCONTOUR_MODEL_PACKAGES_DIR": str(tiny_dose_package.parent)})
    serve = serve_factory(env)
    ct_files = write_phantom_series(tmp_path / "ct", SHAPE)
    storescu(serve.dicom_port, ct_files)
    (contour_job,) = wait_for_jobs(serve, 1, timeout_s=240)
    assert contour_job["state"] == "done", api_job(serve, contour_job["id"])
    wait_until(lambda: tps.received(), 20, "RTSTRUCT at the TPS")

    rs = approved_structure_set(tmp_path / "ct", tmp_path / "approved" / "RS.dcm")
    storescu(serve.dicom_port, [rs])
    jobs = wait_for_jobs(serve, 2, timeout_s=240)
    (dose_job,) = [api_job(serve, j["id"]) for j in jobs if j["id"] != contour_job["id"]]
    assert dose_job["state"] == "done", dose_job
    assert dose_job["kind"] == "dose" and dose_job["source_job_id"] == contour_job["id"]
    assert [o["kind"] for o in dose_job["outputs"]] == ["RTDOSE"]
    metrics = {m["roi_name"]: m for m in dose_job["dose_metrics"]}
    assert metrics["PTV70"]["prescription_gy"] == 70.0 and "d_95_gy" in metrics["PTV70"]
    assert {"Parotid Lt", "Brain Stem", "Cord", "Oesophagus", "Mandible"} <= set(metrics)
    assert {m.get("tg263_name") for m in metrics.values()} >= {"Parotid_L", "SpinalCord"}
    assert not any(m.get("from_rtcontour") for m in metrics.values())

    received = wait_until(
        lambda: [p for p in tps.received() if pydicom.dcmread(p).Modality == "RTDOSE"], 20,
        "RTDOSE at the TPS")
    (rd_path,) = received
    assert dciodvfy_errors(rd_path) == []
    rd = pydicom.dcmread(rd_path)
    series = load_series(ct_files)
    assert rd.FrameOfReferenceUID == series.volume.frame_of_reference_uid
    assert rd.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == (
        pydicom.dcmread(rs).SOPInstanceUID)
    assert rd.DoseUnits == "GY" and "predict" in rd.SeriesDescription.lower()

    qa = api_job(serve, contour_job["id"])["qa"]
    assert qa["reference_sop_instance_uid"] == pydicom.dcmread(rs).SOPInstanceUID
    pairs = {item["roi_name"]: item for item in qa["structures"]}
    assert pairs["Parotid_L"]["reference_name"] == "Parotid Lt"
    assert pairs["Brainstem"]["reference_name"] == "Brain Stem"
    assert pairs["SpinalCord"]["reference_name"] == "Cord"
    assert pairs["Esophagus"]["reference_name"] == "Oesophagus"
    assert pairs["Bone_Mandible"]["reference_name"] == "Mandible"
    assert "PTV70" not in {item["reference_name"] for item in qa["structures"]}
    for item in qa["structures"]:
        assert {"dice", "hd95_mm", "mean_surface_distance_mm", "surface_dice_2mm",
                "added_path_length_mm"} <= set(item)

    offline = tmp_path / "offline" / "RD.dcm"
    offline.parent.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "rtcontour.service.cli", "dose", str(tmp_path / "ct"), "--rtstruct",
         str(rs), "--out", str(offline), "--package", str(tiny_dose_package)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    reference = pydicom.dcmread(offline)
    served = rd.pixel_array * float(rd.DoseGridScaling)
    expected = reference.pixel_array * float(reference.DoseGridScaling)
    assert served.shape == expected.shape
    assert list(rd.ImagePositionPatient) == list(reference.ImagePositionPatient)
    np.testing.assert_allclose(served, expected, atol=float(rd.DoseGridScaling) * 2 + 1e-6)
