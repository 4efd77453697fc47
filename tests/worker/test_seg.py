"""The DICOM SEG writer: dciodvfy finds no error, highdicom and plain pydicom read back the
masks voxel for voxel on the CT grid, the codes and algorithm are there, Orthanc stores it."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from rtcontour.common.settings import Destination, Settings
from rtcontour.common.volume import CtSeries, load_series
from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct
from rtcontour.worker.seg import build_seg, seg_uids
from rtcontour.worker.sender import Sender
from tests.orthanc import running_orthanc
from tests.phantoms import head_phantom, write_ct_series
from tests.worker.conftest import dciodvfy_errors, rtstruct_masks

ROIS = [
    RoiSpec("External", (0, 255, 0), "EXTERNAL"),
    RoiSpec("Empty", (255, 255, 0), "ORGAN"),
    RoiSpec("Parotid_L", (0, 0, 255), "ORGAN"),
    RoiSpec("Brainstem", (255, 0, 0), "ORGAN"),
]


def _masks(series: CtSeries) -> dict[str, np.ndarray]:
    hu = series.volume.array
    marker = hu > 1200
    return {
        "External": hu > -500,
        "Empty": np.zeros_like(marker),
        "Parotid_L": (hu > 800) & (hu < 1000),  # a shell: holes in every slice
        "Brainstem": marker | marker[:, :, ::-1],  # overlaps nothing; two islands
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], Path, CtSeries]:
    """(CT files, SEG path, series) for the head phantom."""
    phantom = head_phantom()
    ct_dir = tmp_path_factory.mktemp("ct")
    paths = write_ct_series(ct_dir, phantom.hu, phantom.spacing_mm, patient_id="PID-SEG")
    series = load_series(paths, min_slices=1)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    seg = build_seg(series, headers, _masks(series), ROIS, model_name="hn-unet",
                    model_version="1.2.0")
    path = tmp_path_factory.mktemp("seg") / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return paths, path, series


def test_seg_has_no_dciodvfy_error(written: tuple[list[Path], Path, CtSeries]) -> None:
    assert dciodvfy_errors(written[1]) == []


def test_highdicom_reads_back_the_masks_on_the_ct_grid(
    written: tuple[list[Path], Path, CtSeries],
) -> None:
    _, path, series = written
    seg = hd.seg.segread(path)
    expected = _masks(series)
    labels = {n: seg.get_segment_description(n).segment_label for n in seg.segment_numbers}
    assert labels == {1: "External", 2: "Parotid_L", 3: "Brainstem"}  # empty one left out
    uids = list(series.volume.sop_instance_uids)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1, 2, 3],
        assert_missing_frames_are_empty=True,
    )  # (slices, rows, columns, segments)
    for index, name in enumerate(["External", "Parotid_L", "Brainstem"]):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), expected[name])


def test_pydicom_alone_reads_back_the_masks(
    written: tuple[list[Path], Path, CtSeries],
) -> None:
    _, path, series = written
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    names = {item.SegmentNumber: item.SegmentLabel for item in ds.SegmentSequence}
    slice_of = {uid: i for i, uid in enumerate(series.volume.sop_instance_uids)}
    masks = {name: np.zeros(series.volume.shape, bool) for name in names.values()}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        name = names[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        masks[name][slice_of[source.ReferencedSOPInstanceUID]] = frame.astype(bool)
    expected = _masks(series)
    for name, mask in masks.items():
        np.testing.assert_array_equal(mask, expected[name])


def test_seg_carries_snomed_codes_laterality_algorithm_and_references(
    written: tuple[list[Path], Path, CtSeries],
) -> None:
    _, path, series = written
    ds = pydicom.dcmread(path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == series.study_instance_uid
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.PatientID == "PID-SEG"
    uids = seg_uids(series.series_instance_uid, "hn-unet", "1.2.0")
    assert (ds.SeriesInstanceUID, ds.SOPInstanceUID) == (uids.series_instance_uid,
                                                          uids.sop_instance_uid)
    parotid = ds.SegmentSequence[1]
    kind = parotid.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator) == ("45289007", "SCT")
    assert kind.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == "Left"
    assert ds.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "15926001"
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("hn-unet", "1.2.0")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"
    referenced = {
        item.ReferencedSOPInstanceUID for item in ds.ReferencedSeriesSequence[0]
        .ReferencedInstanceSequence
    }
    assert referenced == set(series.volume.sop_instance_uids)


def test_seg_and_rtstruct_hold_the_same_structures_voxel_for_voxel(
    written: tuple[list[Path], Path, CtSeries],
) -> None:
    _, path, series = written
    masks = _masks(series)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the empty ROI
        rs = build_rtstruct(series, masks, ROIS, model_name="hn-unet", model_version="1.2.0",
                            min_area_mm2=0.0)
    from_rtstruct = rtstruct_masks(rs, series.volume)
    seg = hd.seg.segread(path)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(series.volume.sop_instance_uids),
        segment_numbers=list(seg.segment_numbers),
    )
    labels = [seg.get_segment_description(n).segment_label for n in seg.segment_numbers]
    assert labels == sorted(from_rtstruct, key=[r.name for r in ROIS].index)
    for index, name in enumerate(labels):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), from_rtstruct[name])


def test_seg_of_only_empty_masks_is_refused_with_a_sentence(
    written: tuple[list[Path], Path, CtSeries],
) -> None:
    paths, _, series = written
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    empty = {"Empty": np.zeros(series.volume.shape, bool)}
    with pytest.raises(ValueError, match="every mask is empty"):
        build_seg(series, headers, empty, [ROIS[1]], model_name="m", model_version="1")
    with pytest.raises(ValueError, match="lacks 1 of the series"):
        build_seg(series, headers[1:], _masks(series), ROIS, model_name="m", model_version="1")


@pytest.mark.timeout(120)
def test_orthanc_stores_the_seg_sent_by_the_sender(
    written: tuple[list[Path], Path, CtSeries], tmp_path: Path, settings: Settings
) -> None:
    _, path, _ = written
    with running_orthanc(tmp_path / "orthanc") as orthanc:
        Sender(settings).send_file(path, Destination.parse(orthanc.destination))
        stored_ids = orthanc.instances()
        assert len(stored_ids) == 1
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(stored_ids[0])))
    sent = pydicom.dcmread(path)
    assert stored.SOPInstanceUID == sent.SOPInstanceUID
    assert stored.Modality == "SEG"
    np.testing.assert_array_equal(stored.pixel_array, sent.pixel_array)
