"""``rtcontour mask2rtstruct``: NIfTI/NRRD label maps in any orientation land on the marker."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pydicom
import pytest

from rtcontour.common.volume import CtSeries, load_series
from rtcontour.worker.mask2rtstruct import main
from tests.phantoms import head_phantom, write_ct_series
from tests.worker.conftest import dciodvfy_errors, rtstruct_masks

PHANTOM = head_phantom()
RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LABELS = {"1": {"name": "Marker", "colour": [255, 0, 0], "type": "MARKER"}, "2": "Shell"}


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CtSeries]:
    folder = tmp_path_factory.mktemp("ct")
    paths = write_ct_series(folder, PHANTOM.hu, PHANTOM.spacing_mm, patient_position="FFS")
    return folder, load_series(paths, min_slices=1)


def _canonical_labels() -> np.ndarray:
    labels = np.zeros(PHANTOM.hu.shape, np.uint8)
    labels[(PHANTOM.hu > 800) & (PHANTOM.hu < 1000)] = 2
    labels[PHANTOM.marker] = 1
    return labels


def _flip(
    array: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Flip array axes and adjust the affine so every voxel keeps its position."""
    flipped = affine.copy()
    for axis in axes:
        flipped[:3, 3] += affine[:3, axis] * (array.shape[axis] - 1)
        flipped[:3, axis] *= -1
    return np.flip(array, axis=axes), flipped


def _nifti(array: np.ndarray, lps_affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.ascontiguousarray(array), RAS_FROM_LPS @ lps_affine), str(path))
    return path


def _nrrd(array: np.ndarray, lps_affine: np.ndarray, path: Path, space: str) -> Path:
    affine = RAS_FROM_LPS @ lps_affine if space == "right-anterior-superior" else lps_affine
    header = {"space": space, "space directions": affine[:3, :3].T, "space origin": affine[:3, 3]}
    nrrd.write(str(path), np.ascontiguousarray(array), header)
    return path


def _writers() -> dict[str, Callable[[np.ndarray, np.ndarray, Path], Path]]:
    return {
        "nifti-ras": lambda a, m, d: _nifti(a, m, d / "labels.nii.gz"),
        "nifti-flipped-axes": lambda a, m, d: _nifti(*_flip(a, m, (0, 2)), d / "labels.nii"),
        "nifti-transposed": lambda a, m, d: _nifti(
            a.transpose(2, 0, 1), m[:, [2, 0, 1, 3]], d / "labels.nii.gz"
        ),
        "nrrd-lps": lambda a, m, d: _nrrd(a, m, d / "labels.nrrd", "left-posterior-superior"),
        "nrrd-ras-flipped": lambda a, m, d: _nrrd(
            *_flip(a, m, (1,)), d / "labels.nrrd", "right-anterior-superior"
        ),
    }


@pytest.mark.parametrize("kind", list(_writers()))
def test_label_map_in_any_orientation_gives_contours_on_the_marker(
    ct: tuple[Path, CtSeries], tmp_path: Path, kind: str
) -> None:
    folder, series = ct
    canonical = series.volume.to_canonical()
    label_path = _writers()[kind](_canonical_labels(), canonical.affine.copy(), tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps(LABELS))
    out = tmp_path / "rs.dcm"
    argv = [
        str(folder),
        str(label_path),
        "--labels",
        str(tmp_path / "labels.json"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert dciodvfy_errors(out) == []
    dataset = pydicom.dcmread(out)
    masks = rtstruct_masks(dataset, series.volume)
    np.testing.assert_array_equal(masks["Marker"], series.volume.array > 1200)
    shell = (series.volume.array > 800) & (series.volume.array < 1000)
    np.testing.assert_array_equal(masks["Shell"], shell)
    assert list(dataset.ROIContourSequence[0].ROIDisplayColor) == [255, 0, 0]
    assert dataset.RTROIObservationsSequence[0].RTROIInterpretedType == "MARKER"


def test_label_map_covering_part_of_the_ct_leaves_the_rest_empty(
    ct: tuple[Path, CtSeries], tmp_path: Path
) -> None:
    folder, series = ct
    canonical = series.volume.to_canonical()
    labels = _canonical_labels()
    # Crop to the top 8 slices: the marker's upper part only.
    affine = canonical.affine.copy()
    path = _nrrd(labels[:8], affine, tmp_path / "part.nrrd", "left-posterior-superior")
    (tmp_path / "labels.json").write_text(json.dumps({"1": "Marker"}))
    out = tmp_path / "rs.dcm"
    assert (
        main([str(folder), str(path), "--labels", str(tmp_path / "labels.json"), "--out", str(out)])
        == 0
    )
    expected = np.zeros(labels.shape, bool)
    expected[:8] = labels[:8] == 1
    masks = rtstruct_masks(pydicom.dcmread(out), series.volume)
    np.testing.assert_array_equal(masks["Marker"], series.volume.array_from_canonical(expected))


@pytest.mark.parametrize(
    ("labels", "label_name", "message"),
    [
        ({"one": "Marker"}, "labels.nii.gz", "not an integer"),
        ({"0": "Marker"}, "labels.nii.gz", "background"),
        ({"1": {"colour": [1, 2, 3]}}, "labels.nii.gz", "needs a name"),
        ({"1": {"name": "M", "colour": [1, 2]}}, "labels.nii.gz", "colour_rgb"),
        ({"1": "Marker"}, "labels.mha", "neither NIfTI"),
    ],
    ids=["non-integer-label", "background-label", "no-name", "bad-colour", "unknown-format"],
)
def test_bad_labels_or_label_map_exit_with_a_message(
    ct: tuple[Path, CtSeries],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    labels: dict,
    label_name: str,
    message: str,
) -> None:
    folder, series = ct
    label_path = tmp_path / label_name
    if label_name.endswith(".nii.gz"):
        _nifti(_canonical_labels(), series.volume.to_canonical().affine, label_path)
    else:
        label_path.write_bytes(b"")
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    code = main(
        [
            str(folder),
            str(label_path),
            "--labels",
            str(tmp_path / "labels.json"),
            "--out",
            str(tmp_path / "rs.dcm"),
        ]
    )
    assert code == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "rs.dcm").exists()


def test_rtcontour_command_runs_mask2rtstruct(ct: tuple[Path, CtSeries], tmp_path: Path) -> None:
    from rtcontour.service.cli import main as rtcontour

    folder, series = ct
    label_path = _nifti(
        _canonical_labels(), series.volume.to_canonical().affine, tmp_path / "l.nii"
    )
    (tmp_path / "labels.json").write_text(json.dumps({"1": "Marker"}))
    out = tmp_path / "rs.dcm"
    argv = [
        "mask2rtstruct",
        str(folder),
        str(label_path),
        "--labels",
        str(tmp_path / "labels.json"),
        "--out",
        str(out),
    ]
    assert rtcontour(argv) == 0
    assert pydicom.dcmread(out).StructureSetROISequence[0].ROIName == "Marker"


def test_ct_folder_with_other_files_and_two_series_needs_a_series_uid(
    ct: tuple[Path, CtSeries], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, series = ct
    mixed = tmp_path / "export"
    shutil.copytree(folder, mixed / "a")
    write_ct_series(mixed / "b", PHANTOM.hu[:4], PHANTOM.spacing_mm, series_uid="1.2.3.4.5")
    (mixed / "README.txt").write_text("exported from a planning system")
    label_path = _nifti(
        _canonical_labels(), series.volume.to_canonical().affine, tmp_path / "l.nii"
    )
    (tmp_path / "labels.json").write_text(json.dumps({"1": "Marker"}))
    argv = [str(mixed), str(label_path), "--labels", str(tmp_path / "labels.json"),
            "--out", str(tmp_path / "rs.dcm")]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "holds 2 CT series; choose one with --series-uid" in err
    assert f"\n  {series.series_instance_uid}  " in err and "\n  1.2.3.4.5  " in err
    assert main([*argv, "--series-uid", series.series_instance_uid]) == 0
    referenced = pydicom.dcmread(tmp_path / "rs.dcm").ReferencedFrameOfReferenceSequence[0]
    study = referenced.RTReferencedStudySequence[0]
    assert study.RTReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid
