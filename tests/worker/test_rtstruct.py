"""The RTSTRUCT writer: valid DICOM, references, determinism, validation, exact round trip."""

from __future__ import annotations

import datetime as dt
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from rtcontour.common.volume import CtSeries, Volume, load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, rtstruct_uids, save_rtstruct
from tests.dicom_vr import vr_length_violations
from tests.phantoms import ct_datasets, head_phantom, write_ct_series
from tests.worker.conftest import (
    dciodvfy_errors,
    dciodvfy_warnings,
    plastimatch_masks,
    rtstruct_masks,
)

PHANTOM = head_phantom()
WHEN = dt.datetime(2025, 3, 4, 5, 6, 7)
ROIS = [
    RoiSpec("External", (0, 255, 0), "EXTERNAL"),
    RoiSpec("Marker", (255, 0, 0), "MARKER"),
    RoiSpec("Shell", (0, 0, 255), "ORGAN"),
]


def _masks(volume: Volume) -> dict[str, np.ndarray]:
    return {
        "External": volume.array > -500,  # one island per slice
        "Marker": volume.array > 1200,
        "Shell": (volume.array > 800) & (volume.array < 1000),  # rings: outer + hole contours
    }


@pytest.fixture(scope="module", params=["HFS", "FFDL"])
def ct(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, CtSeries]:
    folder = tmp_path_factory.mktemp(f"ct-{request.param}")
    paths = write_ct_series(
        folder,
        PHANTOM.hu,
        PHANTOM.spacing_mm,
        patient_position=request.param,
        patient_name="Doe^Jane",
        patient_id="PID-42",
    )
    return folder, load_series(paths, min_slices=1)


def _build(series: CtSeries, **overrides: object) -> Dataset:
    arguments: dict[str, object] = dict(
        model_name="hn-unet", model_version="1.2.0", min_area_mm2=0.0, created_at=WHEN
    )
    arguments.update(overrides)
    return build_rtstruct(series, _masks(series.volume), ROIS, **arguments)  # type: ignore[arg-type]


def test_written_rtstruct_has_no_dciodvfy_errors_or_warnings(
    ct: tuple[Path, CtSeries], tmp_path: Path
) -> None:
    path = save_rtstruct(_build(ct[1]), tmp_path / "rs.dcm")
    assert dciodvfy_errors(path) == []
    assert dciodvfy_warnings(path) == []


def test_rtstruct_read_back_rasterises_to_the_same_masks(
    ct: tuple[Path, CtSeries], tmp_path: Path
) -> None:
    series = ct[1]
    path = save_rtstruct(_build(series), tmp_path / "rs.dcm")
    read_back = rtstruct_masks(pydicom.dcmread(path), series.volume)
    for name, mask in _masks(series.volume).items():
        np.testing.assert_array_equal(read_back[name], mask, err_msg=name)


def test_rtstruct_references_every_ct_image_and_copies_patient_and_study(
    ct: tuple[Path, CtSeries],
) -> None:
    series = ct[1]
    dataset = _build(series)
    frame = dataset.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceUID == series.frame_of_reference_uid
    study = frame.RTReferencedStudySequence[0]
    assert study.ReferencedSOPInstanceUID == series.study_instance_uid
    images = study.RTReferencedSeriesSequence[0].ContourImageSequence
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid
    assert [i.ReferencedSOPInstanceUID for i in images] == list(series.volume.sop_instance_uids)
    assert {i.ReferencedSOPClassUID for i in images} == {series.sop_class_uid}
    assert (dataset.PatientName, dataset.PatientID) == ("Doe^Jane", "PID-42")
    assert dataset.StudyInstanceUID == series.study_instance_uid
    assert dataset.SeriesInstanceUID != series.series_instance_uid
    assert dataset.Modality == "RTSTRUCT"


def test_rtstruct_says_it_is_automatic_unapproved_and_names_the_model(
    ct: tuple[Path, CtSeries],
) -> None:
    dataset = _build(ct[1])
    assert dataset.StructureSetLabel == "AUTO"
    assert dataset.ApprovalStatus == "UNAPPROVED"
    assert dataset.Manufacturer == "rtcontour"
    assert "1.2.0" in dataset.SoftwareVersions
    rois = dataset.StructureSetROISequence
    assert [r.ROIName for r in rois] == [r.name for r in ROIS]
    assert {r.ROIGenerationAlgorithm for r in rois} == {"AUTOMATIC"}
    algorithm = rois[0].ROIDerivationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hn-unet", "1.2.0")
    assert [list(r.ROIDisplayColor) for r in dataset.ROIContourSequence] == [
        list(r.colour_rgb) for r in ROIS
    ]
    observations = dataset.RTROIObservationsSequence
    assert [o.RTROIInterpretedType for o in observations] == [r.interpreted_type for r in ROIS]


def test_rings_are_written_as_outer_and_hole_contours(ct: tuple[Path, CtSeries]) -> None:
    dataset = _build(ct[1])
    shell = dataset.ROIContourSequence[2].ContourSequence
    slices = [c.ContourImageSequence[0].ReferencedSOPInstanceUID for c in shell]
    assert max(slices.count(uid) for uid in slices) >= 2


def test_repeated_job_gives_the_same_rtstruct(ct: tuple[Path, CtSeries], tmp_path: Path) -> None:
    series = ct[1]
    first = save_rtstruct(_build(series), tmp_path / "first.dcm")
    second = save_rtstruct(_build(series), tmp_path / "second.dcm")
    assert first.read_bytes() == second.read_bytes()
    uids = rtstruct_uids(series.series_instance_uid, "hn-unet", "1.2.0")
    dataset = pydicom.dcmread(first)
    assert (dataset.SeriesInstanceUID, dataset.SOPInstanceUID) == (
        uids.series_instance_uid,
        uids.sop_instance_uid,
    )
    other = rtstruct_uids(series.series_instance_uid, "hn-unet", "1.3.0")
    assert other.sop_instance_uid != uids.sop_instance_uid
    assert other.series_instance_uid != uids.series_instance_uid
    assert all(len(uid) <= 64 for uid in (uids.sop_instance_uid, uids.series_instance_uid))


def test_contour_coordinates_are_valid_ds_values(ct: tuple[Path, CtSeries], tmp_path: Path) -> None:
    path = save_rtstruct(_build(ct[1]), tmp_path / "rs.dcm")
    dataset = pydicom.dcmread(path)
    for roi in dataset.ROIContourSequence:
        for contour in roi.ContourSequence:
            raw = contour["ContourData"]
            values = raw.value
            assert all(len(str(v)) <= 16 for v in values)


def test_empty_roi_warns_at_the_callers_line_and_is_left_out(ct: tuple[Path, CtSeries]) -> None:
    series = ct[1]
    masks = _masks(series.volume)
    masks["Marker"] = np.zeros_like(masks["Marker"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_rtstruct(series, masks, ROIS, model_name="m", model_version="1")
    assert [Path(w.filename).name for w in caught] == [Path(__file__).name]
    assert "Marker" in str(caught[0].message)
    assert [r.ROIName for r in dataset.StructureSetROISequence] == ["External", "Shell"]
    assert [int(r.ReferencedROINumber) for r in dataset.ROIContourSequence] == [1, 3]


def _bad(series: CtSeries, change: str) -> dict[str, object]:
    masks = _masks(series.volume)
    arguments: dict[str, object] = dict(
        series=series, masks_by_roi=masks, rois=ROIS, model_name="m", model_version="1"
    )
    if change == "missing-mask":
        del masks["Marker"]
    elif change == "unknown-mask":
        masks["Liver"] = masks["Marker"]
    elif change == "wrong-shape":
        masks["Marker"] = masks["Marker"][:-1]
    elif change == "not-bool":
        masks["Marker"] = masks["Marker"].astype(np.uint8)
    elif change == "duplicate-roi":
        arguments["rois"] = [*ROIS, ROIS[0]]
    elif change == "empty-model-name":
        arguments["model_name"] = ""
    elif change == "negative-area":
        arguments["min_area_mm2"] = -1.0
    return arguments


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("missing-mask", "masks_by_roi has no mask for ROI \\['Marker'\\]"),
        ("unknown-mask", "masks_by_roi has masks \\['Liver'\\]"),
        ("wrong-shape", "masks_by_roi\\['Marker'\\] has shape"),
        ("not-bool", "masks_by_roi\\['Marker'\\] has dtype uint8"),
        ("duplicate-roi", "rois has duplicate names \\['External'\\]"),
        ("empty-model-name", "model_name '' must be"),
        ("negative-area", "min_area_mm2 -1.0"),
    ],
    ids=lambda value: value if " " not in value else "message",
)
def test_invalid_arguments_raise_value_error_naming_them(
    ct: tuple[Path, CtSeries], change: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_rtstruct(**_bad(ct[1], change))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (("", (1, 2, 3)), "name '' must be"),
        ("A" * 65, "must be 1 to 64"),
        (("Lung_L", (1, 2, 300)), "colour_rgb \\(1, 2, 300\\)"),
        (("Lung_L", (1, 2)), "colour_rgb"),
        (("Lung_L", (1, 2, 3), "LUNG"), "interpreted_type 'LUNG'"),
    ],
    ids=["empty-name", "long-name", "colour-range", "colour-length", "interpreted-type"],
)
def test_roi_spec_validates(arguments: object, message: str) -> None:
    args = (arguments, (1, 2, 3)) if isinstance(arguments, str) else arguments
    with pytest.raises(ValueError, match=message):
        RoiSpec(*args)  # type: ignore[arg-type]


def test_plastimatch_rasterises_our_rtstruct_to_the_same_masks(
    ct: tuple[Path, CtSeries], tmp_path: Path
) -> None:
    if shutil.which("plastimatch") is None:
        pytest.skip("plastimatch is not installed")
    folder, series = ct
    rs_path = save_rtstruct(_build(series), tmp_path / "rs.dcm")
    masks = plastimatch_masks(rs_path, folder, tmp_path / "out", series.volume)
    for name, mask in _masks(series.volume).items():
        np.testing.assert_array_equal(masks[name], mask, err_msg=name)


@pytest.mark.parametrize(
    ("character_set", "name"),
    [("ISO_IR 100", "Müller^Jörg"), ("ISO_IR 192", "山田^太郎")],
    ids=["latin-1", "utf-8"],
)
def test_patient_name_survives_in_the_cts_character_set(
    tmp_path: Path, character_set: str, name: str
) -> None:
    datasets = ct_datasets(PHANTOM.hu[4:12], PHANTOM.spacing_mm)
    for ds in datasets:
        ds.SpecificCharacterSet, ds.PatientName = character_set, name
    series = load_series(datasets, min_slices=1)
    masks = {"Marker": series.volume.array > 1200}
    dataset = build_rtstruct(
        series, masks, [RoiSpec("Marker", (255, 0, 0))], model_name="m", model_version="1"
    )
    path = save_rtstruct(dataset, tmp_path / "rs.dcm")
    read_back = pydicom.dcmread(path)
    assert (read_back.SpecificCharacterSet, str(read_back.PatientName)) == (character_set, name)
    assert dciodvfy_errors(path) == []


def test_contour_longer_than_64_kilobytes_is_written_and_read_back(tmp_path: Path) -> None:
    datasets = ct_datasets(np.zeros((2, 1024, 1024), np.float32), (3.0, 0.488, 0.488))
    series = load_series(datasets, min_slices=1)
    rows, cols = np.mgrid[:1024, :1024]
    diamond = np.abs(rows - 512) + np.abs(cols - 512) <= 500  # staircase edges: ~4,000 corners
    mask = np.stack([diamond, np.zeros_like(diamond)])
    dataset = build_rtstruct(
        series, {"Diamond": mask}, [RoiSpec("Diamond", (9, 9, 9))], model_name="m",
        model_version="1", min_area_mm2=0.0,
    )  # fmt: skip
    path = save_rtstruct(dataset, tmp_path / "rs.dcm")
    assert dciodvfy_errors(path) == []
    read_back = pydicom.dcmread(path)
    (contour,) = read_back.ROIContourSequence[0].ContourSequence
    text_bytes = sum(len(str(value)) + 1 for value in contour.ContourData)
    assert text_bytes > 65535  # more than an Explicit VR DS element can hold
    np.testing.assert_array_equal(rtstruct_masks(read_back, series.volume)["Diamond"], mask)


@pytest.mark.parametrize(
    "model_name",
    ["hn-unet", "rtcontour-head-and-neck-organs-at-risk-for-a-clinic-with-long-na"],
    ids=["short-model-name", "long-model-name"],
)
def test_every_text_value_fits_its_vr(
    ct: tuple[Path, CtSeries], tmp_path: Path, model_name: str
) -> None:
    long_roi = RoiSpec("Parotid_L_with_a_very_long_clinic_specific_suffix_for_planning",
                       (0, 128, 255), "ORGAN")
    masks = {**_masks(ct[1].volume), long_roi.name: ct[1].volume.array > 1200}
    dataset = build_rtstruct(ct[1], masks, [*ROIS, long_roi], model_name=model_name,
                             model_version="1.2.0", min_area_mm2=0.0, created_at=WHEN)
    path = save_rtstruct(dataset, tmp_path / "RS.dcm")
    assert vr_length_violations(pydicom.dcmread(path)) == []
    assert dciodvfy_errors(path) == []
