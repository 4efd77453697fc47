"""Only what is in the scan: validation CTs cut to their upper and lower parts."""

from __future__ import annotations

import numpy as np
import pytest

from rtcontour.models.data import list_cases, load_openkbp_raw
from rtcontour.models.inference import Segmenter
from rtcontour.models.package import ModelPackageError, find_latest_package


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    try:
        folder = find_latest_package(name="rtcontour-hn-oar")
    except ModelPackageError:
        pytest.skip("no committed rtcontour-hn-oar package under models/packages")
    # the service default overlap: at 0.25 pt_203 upper grows a 1.3 cc Larynx (flagged review)
    return Segmenter(folder, overlap=0.5, provider="openvino")


@pytest.mark.parametrize("case_index", [0, 2], ids=["pt_201", "pt_203"])
@pytest.mark.parametrize("part", ["upper", "lower"])
def test_a_cut_scan_has_no_structure_outside_it_and_keeps_those_inside(
        openkbp_dir, segmenter, case_index, part):
    path = list_cases(openkbp_dir, "validation")[case_index]
    hu, masks, known, spacing = load_openkbp_raw(path)
    body = np.flatnonzero((hu > -500).any(axis=(1, 2)))
    first, last = int(body[0]), int(body[-1]) + 1
    keep = int(0.4 * (last - first))
    cut = slice(first, first + keep) if part == "upper" else slice(last - keep, last)
    result = segmenter.segment(np.ascontiguousarray(hu[cut], dtype=np.float32), spacing)
    voxel_cc = float(np.prod(spacing)) / 1000.0
    for channel, name in enumerate(segmenter.package.roi_names):
        if not known[channel]:
            continue
        reference_cc = float(masks[channel][cut].sum()) * voxel_cc
        predicted = result.masks[name]
        assert predicted.shape == hu[cut].shape
        if reference_cc == 0.0:
            assert not predicted.any(), (
                f"{path.stem} {part}: {name} is not in the scan but came back with "
                f"{predicted.sum() * voxel_cc:.2f} cc ({result.quality.get(name)})")
        elif reference_cc >= 10.0:
            assert predicted.any(), f"{path.stem} {part}: {name} ({reference_cc:.1f} cc) missed"
            assert 0.0 <= result.quality[name].confidence <= 1.0
