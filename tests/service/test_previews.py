"""Preview PNGs: real images, ROI colours where the contour is, conventional orientation."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.phantoms import head_phantom
from tests.service.api_support import (
    BODY_COLOUR,
    MARKER_COLOUR,
    ApiHarness,
    add_finished_job,
    harness_fixture,
)


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiHarness]:
    yield from harness_fixture(tmp_path)


def _png(api: ApiHarness, job_id: str, plane: str, index: int) -> np.ndarray:
    response = api.client.get(
        f"/api/jobs/{job_id}/preview.png?plane={plane}&index={index}",
        headers=api.headers("clinician"),
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def _where(rgb: np.ndarray, colour: tuple[int, int, int]) -> np.ndarray:
    return np.all(rgb == np.array(colour, dtype=np.uint8), axis=-1)


def _fraction_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """(top, bottom, left, right) of the True pixels as fractions of the image size."""
    rows, cols = np.nonzero(mask)
    h, w = mask.shape
    return rows.min() / h, (rows.max() + 1) / h, cols.min() / w, (cols.max() + 1) / w


PHANTOM = head_phantom()
MARKER_SLICES, MARKER_ROWS, MARKER_COLS = (
    np.flatnonzero(PHANTOM.marker.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1))
)


def _expected(indices: np.ndarray, n: int) -> tuple[float, float]:
    return indices.min() / n, (indices.max() + 1) / n


@pytest.mark.parametrize("patient_position", ["HFS", "FFS", "HFP"], ids=["HFS", "FFS", "HFP"])
def test_axial_preview_shows_left_anterior_marker_top_right_in_its_colour(
    api: ApiHarness, patient_position: str
) -> None:
    job = add_finished_job(api, patient_position=patient_position)
    n_slices, n_rows, n_cols = PHANTOM.hu.shape
    rgb = _png(api, job.id, "axial", int(MARKER_SLICES.mean()))
    assert rgb.shape == (512, 512, 3)  # 64 x 64 pixels of 1 x 1 mm
    top, bottom, left, right = _fraction_box(_where(rgb, MARKER_COLOUR))
    exp_top, exp_bottom = _expected(MARKER_ROWS, n_rows)
    exp_left, exp_right = _expected(MARKER_COLS, n_cols)
    # The outline sits on the marker's edge (within a pixel of the 64-pixel grid).
    tolerance = 1.5 / 64
    assert abs(top - exp_top) < tolerance and abs(bottom - exp_bottom) < tolerance
    assert abs(left - exp_left) < tolerance and abs(right - exp_right) < tolerance
    # Patient left on the image's right, anterior up.
    assert left > 0.5 and bottom < 0.5
    assert _where(rgb, BODY_COLOUR).any()
    # Inside the marker the CT shows through (bone-bright in the soft-tissue window).
    centre = rgb[int((top + bottom) / 2 * 512), int((left + right) / 2 * 512)]
    assert tuple(centre) == (255, 255, 255)


def test_coronal_and_sagittal_previews_have_superior_up_and_square_millimetres(
    api: ApiHarness,
) -> None:
    job = add_finished_job(api)
    n_slices, n_rows, n_cols = PHANTOM.hu.shape  # spacing 2.5 x 1 x 1 mm: 60 x 64 x 64 mm
    coronal = _png(api, job.id, "coronal", int(MARKER_ROWS.mean()))
    assert coronal.shape[:2] == (480, 512)  # 60 mm high, 64 mm wide
    top, bottom, left, right = _fraction_box(_where(coronal, MARKER_COLOUR))
    exp_top, exp_bottom = _expected(MARKER_SLICES, n_slices)
    assert abs(top - exp_top) < 0.03 and abs(bottom - exp_bottom) < 0.03
    assert left > 0.5  # patient left on the image's right
    sagittal = _png(api, job.id, "sagittal", int(MARKER_COLS.mean()))
    assert sagittal.shape[:2] == (480, 512)
    top, bottom, left, right = _fraction_box(_where(sagittal, MARKER_COLOUR))
    assert abs(top - exp_top) < 0.03  # superior up
    exp_left, exp_right = _expected(MARKER_ROWS, n_rows)
    assert abs(left - exp_left) < 0.03 and right < 0.5  # anterior on the image's left


def test_preview_info_lists_planes_and_rois(api: ApiHarness) -> None:
    job = add_finished_job(api)
    info = api.client.get(f"/api/jobs/{job.id}/preview", headers=api.headers("clinician")).json()
    assert info["planes"] == {"axial": 24, "coronal": 64, "sagittal": 64}
    assert [roi["roi_name"] for roi in info["rois"]] == ["Marker", "Body"]
    assert info["rois"][0]["colour"] == list(MARKER_COLOUR)


def test_preview_of_a_job_without_output_is_404_with_a_reason(api: ApiHarness) -> None:
    job = api.add_job(state="failed", failure_reason="model crashed")
    response = api.client.get(f"/api/jobs/{job.id}/preview.png", headers=api.headers("admin"))
    assert response.status_code == 404
    assert "no RTSTRUCT" in response.json()["detail"]


@pytest.mark.parametrize(
    "query",
    ["plane=oblique&index=0", "plane=axial&index=24", "plane=axial&index=-1"],
    ids=["bad-plane", "index-past-end", "negative-index"],
)
def test_preview_with_bad_plane_or_index_is_422(api: ApiHarness, query: str) -> None:
    job = add_finished_job(api)
    response = api.client.get(
        f"/api/jobs/{job.id}/preview.png?{query}", headers=api.headers("clinician")
    )
    assert response.status_code == 422, response.text


def test_rasterised_contours_give_back_the_mask_in_every_plane(tmp_path: Path) -> None:
    """Even-odd filling at pixel centres: the bone shell (a ring with a hole) comes back exactly."""
    from rtcontour.common.volume import load_series
    from rtcontour.service.previews import load_preview_volume
    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
    from tests.phantoms import write_ct_series

    phantom = head_phantom((12, 40, 48), (3.0, 1.2, 0.9))
    shell = phantom.hu >= 900  # bone shell and marker: rings with holes on most slices
    paths = write_ct_series(tmp_path / "ct", phantom.hu, phantom.spacing_mm, patient_position="FFP")
    series = load_series(paths, min_slices=1)
    dataset = build_rtstruct(
        series,
        {"Shell": series.volume.array_from_canonical(shell)},
        [RoiSpec("Shell", (0, 0, 255))],
        model_name="t",
        model_version="1",
        min_area_mm2=0.0,
    )
    volume = load_preview_volume(tmp_path / "ct", save_rtstruct(dataset, tmp_path / "RS.dcm"))
    (roi,) = volume.rois
    np.testing.assert_array_equal(volume.hu, np.rint(phantom.hu).astype(np.int16))
    for k in range(shell.shape[0]):
        np.testing.assert_array_equal(volume.roi_mask(roi, "axial", k), shell[k])
    for j in range(shell.shape[1]):
        np.testing.assert_array_equal(volume.roi_mask(roi, "coronal", j), shell[:, j, :])
    for i in range(shell.shape[2]):
        np.testing.assert_array_equal(volume.roi_mask(roi, "sagittal", i), shell[:, :, i])


def test_preview_when_the_ct_left_the_spool_is_404_with_a_reason(api: ApiHarness) -> None:
    import shutil

    job = add_finished_job(api)
    shutil.rmtree(job.spool_dir)
    response = api.client.get(f"/api/jobs/{job.id}/preview.png", headers=api.headers("clinician"))
    assert response.status_code == 404
    assert "no longer in its spool folder" in response.json()["detail"]
