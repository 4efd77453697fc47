"""The RTDOSE writer: valid DICOM, geometry round trip (pydicom, plastimatch), determinism,
validation."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from rtcontour.common.volume import CtSeries, load_series
from rtcontour.worker.rtdose import (
    build_rtdose,
    cumulative_dvh,
    format_ds,
    rtdose_uids,
    save_rtdose,
)
from tests.dicom_vr import vr_length_violations
from tests.phantoms import head_phantom, write_ct_series

PHANTOM = head_phantom((20, 40, 48), (2.5, 1.5, 1.25))
WHEN = dt.datetime(2025, 3, 4, 5, 6, 7)
STRUCTURE_SET_UID = "1.2.826.0.1.3680043.8.498.1234"


def analytic_dose_gy(points_lps: np.ndarray) -> np.ndarray:
    """A dose that differs at every patient position (so any geometry slip shows)."""
    x, y, z = points_lps[:, 0], points_lps[:, 1], points_lps[:, 2]
    return 30.0 + 0.4 * x - 0.25 * y + 0.7 * z + 5.0 * np.sin(x / 7.0) * np.cos(z / 5.0) + 20.0


@pytest.fixture(scope="module", params=["HFS", "FFS", "HFP"])
def ct(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CtSeries]:
    folder = tmp_path_factory.mktemp(f"ct-{request.param}")
    paths = write_ct_series(folder, PHANTOM.hu, PHANTOM.spacing_mm,
                            patient_position=request.param, patient_name="Doe^Jane",
                            patient_id="PID-42", origin_mm=(-31.0, -25.5, 12.25))
    return folder, load_series(paths, min_slices=1)


def _dose_on(series: CtSeries) -> np.ndarray:
    volume = series.volume
    indices = np.indices(volume.shape).reshape(3, -1).T
    return analytic_dose_gy(volume.index_to_lps(indices)).reshape(volume.shape)


def _build(series: CtSeries, dose: np.ndarray | None = None, affine: np.ndarray | None = None,
           **overrides: object) -> Dataset:
    dose = _dose_on(series) if dose is None else dose
    arguments: dict[str, object] = dict(
        structure_set_uid=STRUCTURE_SET_UID, model_name="rtcontour-hn-dose",
        model_version="1.0.0", prescriptions_gy={"PTV70": 70.0}, created_at=WHEN,
    )
    arguments.update(overrides)
    if "dvhs" not in arguments:
        arguments["dvhs"] = [cumulative_dvh(dose, dose > 40.0, roi_number=2,
                                            voxel_volume_cc=0.01)]
    return build_rtdose(dose, series.volume.affine if affine is None else affine, series,
                        **arguments)  # type: ignore[arg-type]


def _patient_points(ds: Dataset) -> np.ndarray:
    """(frames, rows, columns, 3) LPS of every dose voxel, from the RTDOSE's own header."""
    position = np.array(ds.ImagePositionPatient, float)
    orientation = np.array(ds.ImageOrientationPatient, float)
    row_cos, col_cos = orientation[:3], orientation[3:]
    normal = np.cross(row_cos, col_cos)
    offsets = np.array(ds.GridFrameOffsetVector, float)
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    k, r, c = np.meshgrid(offsets, np.arange(ds.Rows) * row_spacing,
                          np.arange(ds.Columns) * col_spacing, indexing="ij")
    return (position + k[..., None] * normal + r[..., None] * col_cos
            + c[..., None] * row_cos)


def dciodvfy_report(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of dciodvfy for ``path``.

    dicom3tools 1.00~20220618 aborts on Bits Allocated 32 (``attrothr.cc: Assertion
    bitsallocated <= bytesinword*8u``, also reported as horosproject/horos#614) before it
    verifies anything; then the same dataset with its pixels re-encoded to 16 bits is
    verified instead (every attribute but the bit depth), and the 32-bit pixel module is
    checked by pydicom decoding it in the round-trip tests.
    """
    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (dicom3tools) is not installed")
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    if result.returncode < 0 and "bitsallocated <= bytesinword" in result.stderr:
        ds = pydicom.dcmread(path)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u4") >> 16).astype("<u2").tobytes()
        twin = path.with_name(path.stem + "-16bit.dcm")
        ds.save_as(twin)
        result = subprocess.run(["dciodvfy", str(twin)], capture_output=True, text=True)
    assert result.returncode >= 0, result.stderr
    lines = (result.stdout + result.stderr).splitlines()
    return ([line for line in lines if line.startswith("Error")],
            [line for line in lines if "Warning" in line])


def test_written_rtdose_has_no_dciodvfy_errors_or_warnings(ct, tmp_path):
    path = save_rtdose(_build(ct[1]), tmp_path / "RD.dcm")
    errors, warnings_ = dciodvfy_report(path)
    assert errors == []
    assert warnings_ == []


def test_rtdose_reads_back_to_the_same_dose_at_the_same_patient_positions(ct, tmp_path):
    series = ct[1]
    path = save_rtdose(_build(series), tmp_path / "RD.dcm")
    ds = pydicom.dcmread(path)
    assert ds.BitsAllocated == 32 and ds.PixelRepresentation == 0
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    points = _patient_points(ds)
    expected = analytic_dose_gy(points.reshape(-1, 3)).reshape(points.shape[:3])
    np.testing.assert_allclose(dose, expected, atol=1e-6 * expected.max() + 1e-4)


def test_plastimatch_reads_the_same_dose_at_the_same_patient_positions(ct, tmp_path):
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch is not installed")
    import nrrd

    path = save_rtdose(_build(ct[1]), tmp_path / "RD.dcm")
    out = tmp_path / "dose.nrrd"
    subprocess.run(["plastimatch", "convert", "--input", str(path), "--output-dose-img",
                    str(out)],
                   check=True, capture_output=True)
    array, header = nrrd.read(str(out))
    assert header["space"] == "left-posterior-superior"
    directions = np.asarray(header["space directions"], float)  # one row per array axis
    origin = np.asarray(header["space origin"], float)
    indices = np.indices(array.shape).reshape(3, -1).T
    points = origin + indices @ directions
    expected = analytic_dose_gy(points).reshape(array.shape)
    np.testing.assert_allclose(array, expected, atol=1e-3 * expected.max())


def test_rtdose_header_carries_the_dose_conventions_and_the_ct_patient(ct):
    series = ct[1]
    ds = _build(series)
    assert (ds.Modality, ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == (
        "RTDOSE", "GY", "PHYSICAL", "PLAN")
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert offsets[0] == 0.0 and np.all(np.diff(offsets) > 0)
    assert len(offsets) == ds.NumberOfFrames
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.StudyInstanceUID == series.study_instance_uid
    assert (ds.PatientName, ds.PatientID) == ("Doe^Jane", "PID-42")
    assert list(map(float, ds.ImageOrientationPatient)) == list(
        map(float, series.header.ImageOrientationPatient))
    assert "PREDICTED" in ds.SeriesDescription
    assert ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == STRUCTURE_SET_UID
    assert ds.DVHSequence[0].DVHReferencedROISequence[0].ReferencedROINumber == 2


def test_every_ds_value_fits_sixteen_characters(ct):
    ds = _build(ct[1])
    lengths = []

    def visit(dataset: Dataset) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
            elif element.VR == "DS":
                values = element.value if element.VM > 1 else [element.value]
                lengths.extend(len(str(v)) for v in values)

    visit(ds)
    assert lengths and max(lengths) <= 16


def test_slices_against_the_normal_are_stored_reversed_with_increasing_offsets(ct):
    series = ct[1]
    if series.header.PatientPosition != "HFS":
        pytest.skip("one reversed grid suffices")
    dose = _dose_on(series)[::-1]
    affine = series.volume.affine.copy()
    affine[:3, 3] = series.volume.index_to_lps(np.array([[series.volume.shape[0] - 1, 0, 0]]))[0]
    affine[:3, 0] *= -1
    ds = _build(series, dose=dose, affine=affine)
    stored = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    points = _patient_points(ds)
    expected = analytic_dose_gy(points.reshape(-1, 3)).reshape(points.shape[:3])
    np.testing.assert_allclose(stored, expected, atol=1e-3)


def test_uids_are_derived_from_the_structure_set_model_and_prescriptions(ct):
    series = ct[1]
    first, second = _build(series), _build(series, created_at=WHEN + dt.timedelta(hours=1))
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    other = rtdose_uids(STRUCTURE_SET_UID, "rtcontour-hn-dose", "1.0.0", {"PTV70": 66.0})
    assert other.sop_instance_uid != first.SOPInstanceUID


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"structure_set_uid": "1.2.x"}, "structure_set_uid"),
        ({"model_version": ""}, "model_version"),
        ({"dvhs": []}, "dvhs"),
        ({"prescriptions_gy": {"PTV70": 7000.0}}, "prescriptions_gy"),
    ],
    ids=["bad-uid", "empty-version", "no-dvh", "prescription-in-cgy"],
)
def test_invalid_arguments_are_refused_with_a_sentence_naming_them(ct, overrides, message):
    with pytest.raises(ValueError, match=message):
        _build(ct[1], **overrides)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d * 100.0 + 2e4, "not cGy"),
        (lambda d: d - 100.0, ">= 0 Gy"),
        (lambda d: np.where(d > 50, np.nan, d), "NaN"),
    ],
    ids=["cgy", "negative", "nan"],
)
def test_invalid_doses_are_refused(ct, change, message):
    series = ct[1]
    dose = _dose_on(series)
    with pytest.raises(ValueError, match=message):
        _build(series, dose=change(dose), dvhs=[cumulative_dvh(dose, dose > 0, 1, 0.01)])


def test_a_grid_not_in_the_ct_orientation_is_refused(ct):
    series = ct[1]
    if series.header.PatientPosition == "HFS":
        pytest.skip("the canonical grid is the HFS orientation")
    canonical = series.volume.to_canonical()
    with pytest.raises(ValueError, match="ImageOrientationPatient"):
        _build(series, dose=np.ones(canonical.shape), affine=canonical.affine,
               dvhs=[cumulative_dvh(np.ones(canonical.shape), np.ones(canonical.shape, bool), 1,
                                    0.01)])


def test_cumulative_dvh_counts_the_volume_at_or_above_each_bin():
    dose = np.array([[[0.05, 1.0, 1.0, 2.5]]])
    dvh = cumulative_dvh(dose, np.ones_like(dose, dtype=bool), 1, voxel_volume_cc=0.5,
                         bin_width_gy=1.0)
    assert dvh.volumes_cc == (2.0, 1.5, 0.5)
    assert dvh.maximum_gy == 2.5 and dvh.minimum_gy == 0.05


@pytest.mark.parametrize("value", [1.0 / 3.0, 123456.789012345, 1.23e-12, -0.000123456789],
                         ids=["third", "large", "tiny", "negative"])
def test_format_ds_keeps_sixteen_characters_and_the_value(value):
    text = format_ds(value)
    assert len(text) <= 16
    assert float(text) == pytest.approx(value, rel=1e-9)


THREE_LEVELS = {"PTV_70Gy": 70.0, "PTV_63Gy": 63.0, "PTV_56Gy": 56.0}


@pytest.mark.parametrize(
    ("model_name", "prescriptions"),
    [("rtcontour-hn-dose", {"PTV70": 70.0}),
     ("rtcontour-hn-dose", THREE_LEVELS),
     ("rtcontour-head-and-neck-knowledge-based-dose-prediction-x", THREE_LEVELS)],
    ids=["one-ptv", "three-ptvs", "three-ptvs-long-model-name"],
)
def test_every_text_value_fits_its_vr_and_the_dose_comment_stays_within_lo(
    ct, tmp_path, model_name, prescriptions
):
    path = save_rtdose(_build(ct[1], model_name=model_name, prescriptions_gy=prescriptions),
                       tmp_path / "RD.dcm")
    ds = pydicom.dcmread(path)
    assert vr_length_violations(ds) == []
    assert ds.DoseComment.startswith("PREDICTED") and "no plan" in ds.DoseComment
    # Whatever the comment had to leave out is in Image Comments (LT), whole.
    sentence = ds.get("ImageComments", ds.DoseComment)
    assert all(f"{name} {dose:g} Gy" in sentence for name, dose in prescriptions.items())
    assert model_name in sentence
    assert dciodvfy_report(path)[0] == []


def test_vr_length_check_finds_the_77_character_dose_comment_of_the_trial(ct):
    ds = _build(ct[1])
    ds.DoseComment = ("PREDICTED by rtcontour-hn-dose 1.0.0, no plan: PTV_56Gy 56 Gy, "
                      "PTV_70Gy 70 Gy")
    assert [v.split(":")[0] for v in vr_length_violations(ds)] == ["DoseComment (LO, 77 > 64)"]
