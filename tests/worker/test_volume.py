"""Loading CT series into a Volume: order, HU, patient positions, compression, refusals."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless

from rtcontour.common.errors import IncompleteSeries, InvalidSeries, UnsupportedGeometry
from rtcontour.common.volume import Volume, load_series
from tests.phantoms import (
    CANONICAL_DIRECTIONS,
    PATIENT_POSITIONS,
    ct_datasets,
    default_origin_mm,
    head_phantom,
    write_ct_series,
)
from tests.worker.conftest import dciodvfy_errors

PHANTOM = head_phantom()


def _small(n_slices: int = 12) -> list[Dataset]:
    hu = np.zeros((n_slices, 8, 10), np.float32)
    return ct_datasets(hu, (3.0, 1.0, 1.0), seed=1)


def test_series_is_sorted_by_position_not_instance_number_or_file_name(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, PHANTOM.hu, PHANTOM.spacing_mm, seed=3)
    series = load_series(sorted(paths), min_slices=1)
    by_position = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    by_position.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert series.volume.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in by_position)
    np.testing.assert_array_equal(series.volume.to_canonical().array, PHANTOM.hu)


def test_loaded_series_carries_reference_attributes(tmp_path: Path) -> None:
    paths = write_ct_series(
        tmp_path,
        PHANTOM.hu,
        PHANTOM.spacing_mm,
        study_uid="1.2.3.4",
        series_uid="1.2.3.5",
        patient_id="PID-7",
    )
    series = load_series(paths, min_slices=1)
    assert (series.study_instance_uid, series.series_instance_uid) == ("1.2.3.4", "1.2.3.5")
    assert series.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert series.header.PatientID == "PID-7"
    assert "PixelData" not in series.header
    assert series.volume.array.dtype == np.float32


@pytest.mark.parametrize(
    ("slope", "intercept"),
    [(1.0, -1024.0), (2.0, -2048.0), (0.5, -1000.0)],
    ids=["slope1", "slope2", "slope-half"],
)
def test_rescale_slope_and_intercept_give_hounsfield_units(
    tmp_path: Path, slope: float, intercept: float
) -> None:
    hu = np.round(PHANTOM.hu / 2) * 2  # representable with every slope here
    paths = write_ct_series(
        tmp_path, hu, PHANTOM.spacing_mm, rescale_slope=slope, rescale_intercept=intercept
    )
    np.testing.assert_array_equal(load_series(paths, min_slices=1).volume.to_canonical().array, hu)


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_marker_is_anatomically_placed_after_canonical_reorientation(
    tmp_path: Path, position: str
) -> None:
    paths = write_ct_series(tmp_path, PHANTOM.hu, PHANTOM.spacing_mm, patient_position=position)
    volume = load_series(paths, min_slices=1).volume
    canonical = volume.to_canonical()
    np.testing.assert_array_equal(canonical.array, PHANTOM.hu)
    assert canonical.spacing_mm == pytest.approx(PHANTOM.spacing_mm)
    expected_affine = np.eye(4)
    expected_affine[:3, :3] = CANONICAL_DIRECTIONS.T * np.array(PHANTOM.spacing_mm)
    expected_affine[:3, 3] = default_origin_mm(PHANTOM.hu.shape, PHANTOM.spacing_mm)
    np.testing.assert_allclose(canonical.affine, expected_affine, atol=1e-6)
    # Where the marker is in the patient, read from the stored series' own geometry:
    marker_mm = volume.index_to_lps(np.argwhere(volume.array > 1200)).mean(axis=0)
    body_mm = volume.index_to_lps(np.argwhere(volume.array > -500)).mean(axis=0)
    left, posterior, superior = marker_mm - body_mm
    assert left > 0 and posterior < 0 and superior > 0, f"{position}: marker off {marker_mm}"
    # Canonical slices run with the same images: the top canonical slice is the most superior.
    top_uid = canonical.sop_instance_uids[0]
    z_of = dict(
        zip(
            volume.sop_instance_uids,
            volume.index_to_lps(np.c_[np.arange(volume.shape[0]), np.zeros((volume.shape[0], 2))])[
                :, 2
            ],
            strict=True,
        )
    )
    assert z_of[top_uid] == max(z_of.values())


@pytest.mark.parametrize("position", PATIENT_POSITIONS)
def test_canonical_mask_mapped_back_lands_on_the_marker_voxels(
    tmp_path: Path, position: str
) -> None:
    paths = write_ct_series(tmp_path, PHANTOM.hu, PHANTOM.spacing_mm, patient_position=position)
    volume = load_series(paths, min_slices=1).volume
    stored_mask = volume.array_from_canonical(PHANTOM.marker)
    np.testing.assert_array_equal(stored_mask, volume.array > 1200)
    back = volume.to_canonical().with_array(PHANTOM.marker).reoriented_like(volume)
    np.testing.assert_array_equal(back.array, stored_mask)
    np.testing.assert_allclose(back.affine, volume.affine)


def _dcmtk_compress(tool: str, flag: str) -> Callable[[Path, Path], None]:
    def compress(source: Path, target: Path) -> None:
        subprocess.run([tool, flag, str(source), str(target)], check=True, capture_output=True)

    return compress


@pytest.mark.parametrize(
    ("syntax", "tool"),
    [
        (RLELossless, None),
        (JPEG2000Lossless, None),
        ("jpeg-lossless", ("dcmcjpeg", "+e1")),
        ("jpeg-ls-lossless", ("dcmcjpls", "+el")),
    ],
    ids=["rle", "jpeg2000-lossless", "jpeg-lossless-process14", "jpeg-ls-lossless"],
)
def test_compressed_series_decode_to_the_same_hounsfield_units(
    tmp_path: Path, syntax: str, tool: tuple[str, str] | None
) -> None:
    if tool is None:
        paths = write_ct_series(tmp_path, PHANTOM.hu, PHANTOM.spacing_mm, transfer_syntax=syntax)
    else:
        if shutil.which(tool[0]) is None:
            pytest.skip(f"DCMTK's {tool[0]} is not installed")
        plain = write_ct_series(tmp_path / "plain", PHANTOM.hu, PHANTOM.spacing_mm)
        paths = []
        for path in plain:
            target = tmp_path / path.name
            _dcmtk_compress(*tool)(path, target)
            paths.append(target)
        assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID.is_compressed
    volume = load_series(paths, min_slices=1).volume
    np.testing.assert_array_equal(volume.to_canonical().array, PHANTOM.hu)


def _set(keyword: str, value: object, index: int = 0) -> Callable[[list[Dataset]], None]:
    def change(datasets: list[Dataset]) -> None:
        setattr(datasets[index], keyword, value)

    return change


def _sort(datasets: list[Dataset]) -> list[Dataset]:
    return sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))


def _duplicate(datasets: list[Dataset]) -> None:
    ordered = _sort(datasets)
    ordered[3].ImagePositionPatient = list(ordered[4].ImagePositionPatient)


def _missing(datasets: list[Dataset]) -> None:
    datasets.remove(_sort(datasets)[5])


def _drift(datasets: list[Dataset]) -> None:
    for index, ds in enumerate(_sort(datasets)):
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * index, z]


def _orient(values: list[float]) -> Callable[[list[Dataset]], None]:
    def change(datasets: list[Dataset]) -> None:
        for ds in datasets:
            ds.ImageOrientationPatient = values

    return change


C, S = np.cos(np.radians(10)), np.sin(np.radians(10))
REFUSALS = [
    ("modality", _set("Modality", "MR"), InvalidSeries, "modality MR"),
    (
        "orientation-mixed",
        _set("ImageOrientationPatient", [-1, 0, 0, 0, 1, 0]),
        InvalidSeries,
        "orientation",
    ),
    (
        "frame-of-reference-mixed",
        _set("FrameOfReferenceUID", "1.2.3"),
        InvalidSeries,
        "frame of reference",
    ),
    ("rows-mixed", _set("Rows", 9), InvalidSeries, "rows"),
    ("columns-mixed", _set("Columns", 11), InvalidSeries, "columns"),
    ("pixel-spacing-mixed", _set("PixelSpacing", [1.0, 1.2]), InvalidSeries, "pixel spacing"),
    ("duplicate-position", _duplicate, InvalidSeries, "duplicate"),
    ("missing-slice", _missing, UnsupportedGeometry, "missing slice"),
    ("gantry-tilt", _set("GantryDetectorTilt", 12.0), UnsupportedGeometry, "gantry tilt"),
    ("positions-off-normal", _drift, UnsupportedGeometry, "sideways"),
    ("oblique", _orient([C, S, 0, -S, C, 0]), UnsupportedGeometry, "oblique"),
    ("sagittal", _orient([0, 1, 0, 0, 0, -1]), UnsupportedGeometry, "sagittal"),
]


@pytest.mark.parametrize(
    ("change", "error", "reason"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_series_is_refused_with_a_named_reason(
    change: Callable[[list[Dataset]], None], error: type[Exception], reason: str
) -> None:
    datasets = _small()
    change(datasets)
    with pytest.raises(error, match=reason):
        load_series(datasets, min_slices=5)


def test_series_with_too_few_slices_is_refused() -> None:
    with pytest.raises(InvalidSeries, match="12 slices, fewer than the 20 required"):
        load_series(_small(12), min_slices=20)


def test_slice_spacing_within_tolerance_is_accepted() -> None:
    datasets = _sort(_small())
    x, y, z = (float(v) for v in datasets[4].ImagePositionPatient)
    datasets[4].ImagePositionPatient = [x, y, z + 0.2]  # 3 mm gaps, 7 % off
    volume = load_series(datasets, min_slices=5, gap_tolerance=0.1).volume
    assert volume.spacing_mm == pytest.approx((3.0, 1.0, 1.0))


def test_volume_refuses_a_mismatched_array() -> None:
    volume = Volume(np.zeros((2, 3, 4)), np.eye(4), "1.2.3", ("a", "b"))
    with pytest.raises(ValueError, match="differs"):
        volume.with_array(np.zeros((2, 4, 3)))


def _signed(ds: Dataset) -> None:
    stored = np.frombuffer(ds.PixelData, "<u2").astype(np.int32) - 1024
    ds.PixelData = stored.astype("<i2").tobytes()
    ds.PixelRepresentation, ds.RescaleIntercept = 1, 0


def _twelve_bits(ds: Dataset) -> None:
    ds.BitsStored, ds.HighBit = 12, 11


@pytest.mark.parametrize("change", [_signed, _twelve_bits], ids=["signed-16-bit", "12-bit"])
def test_pixel_representations_give_the_same_hounsfield_units(
    change: Callable[[Dataset], None],
) -> None:
    datasets = ct_datasets(PHANTOM.hu, PHANTOM.spacing_mm)
    for ds in datasets:
        change(ds)
    volume = load_series(datasets, min_slices=1).volume
    np.testing.assert_array_equal(volume.to_canonical().array, PHANTOM.hu)


def test_a_file_that_is_not_dicom_refuses_the_series(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path, PHANTOM.hu[:4], PHANTOM.spacing_mm)
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(InvalidSeries, match="could not be read"):
        load_series([*paths, tmp_path / "notes.txt"], min_slices=1)


@pytest.mark.parametrize(
    ("position", "syntax"),
    [
        *((p, "1.2.840.10008.1.2.1") for p in PATIENT_POSITIONS),
        ("HFS", RLELossless),
        ("HFS", JPEG2000Lossless),
        ("HFS", "1.2.840.10008.1.2"),
    ],
    ids=[*PATIENT_POSITIONS, "rle", "jpeg2000", "implicit-vr"],
)
def test_phantom_ct_instances_pass_dciodvfy(tmp_path: Path, position: str, syntax: str) -> None:
    paths = write_ct_series(
        tmp_path,
        PHANTOM.hu[:3],
        PHANTOM.spacing_mm,
        patient_position=position,
        transfer_syntax=syntax,
    )
    for path in paths:
        assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(
    ("change", "min_slices"), [(_missing, 5), (lambda datasets: None, 20)],
    ids=["missing-slice", "too-few-slices"],
)
def test_a_series_refused_for_its_slices_says_to_send_the_whole_series_again(
    change: Callable[[list[Dataset]], None], min_slices: int
) -> None:
    datasets = _small(12)
    change(datasets)
    with pytest.raises(InvalidSeries) as refused:
        load_series(datasets, min_slices=min_slices)
    assert isinstance(refused.value, IncompleteSeries)  # late slices are merged with it
    assert str(refused.value).endswith(
        "Retrying will not help: send the missing slices, or the whole series, again from the "
        "planning system; while this job's files are kept (RTCONTOUR_RETENTION_DAYS) they are "
        "merged with what is sent, after that send the whole series.")
