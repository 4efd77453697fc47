"""Offline dose prediction: tolerant RTSTRUCT reading, prescriptions and OARs from names, and
``rtcontour dose`` end to end on a phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag
from pydicom.uid import ImplicitVRLittleEndian, RTStructureSetStorage, generate_uid

from rtcontour.common.volume import CtSeries, Volume, load_series
from rtcontour.worker.dose_offline import main, parse_prescription_overrides
from rtcontour.worker.structure_sets import (
    UnusableStructureSet,
    match_oars,
    prescriptions_from_names,
    rasterise_polygons,
    read_structure_set,
)
from tests.phantoms import head_phantom, write_ct_series
from tests.worker.test_rtdose import dciodvfy_report

PHANTOM = head_phantom((24, 48, 48), (2.5, 2.0, 2.0))


@pytest.fixture(scope="module", params=["HFS", "FFS"])
def ct(request: pytest.FixtureRequest,
       tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CtSeries]:
    folder = tmp_path_factory.mktemp(f"ct-{request.param}")
    paths = write_ct_series(folder, PHANTOM.hu, PHANTOM.spacing_mm,
                            patient_position=request.param)
    return folder, load_series(paths, min_slices=1)


def _square(volume: Volume, slice_index: int, first: int, last: int) -> list[float]:
    """Contour points (mm) around pixel centres first..last (rows and columns), as DS data."""
    corners = [(first - 0.5, first - 0.5), (first - 0.5, last + 0.5),
               (last + 0.5, last + 0.5), (last + 0.5, first - 0.5)]
    index = np.array([[slice_index, r, c] for r, c in corners], dtype=float)
    return volume.index_to_lps(index).ravel().tolist()


def _long_ds(values: list[float]) -> bytes:
    """DS values with 18 significant digits, as rt-utils writes them (over 16 characters)."""
    text = "\\".join(f"{v:.15f}" for v in values).encode()
    return text + (b" " if len(text) % 2 else b"")


def _contour(points_mm: list[float]) -> Dataset:
    item = Dataset()
    item.ContourGeometricType = "CLOSED_PLANAR"
    item.NumberOfContourPoints = len(points_mm) // 3
    raw = _long_ds(points_mm)
    item[0x30060050] = RawDataElement(Tag(0x30060050), "DS", len(raw), raw, 0, True,
                                      True)  # type: ignore[assignment]
    return item


def write_rtutils_style_rtstruct(path: Path, series: CtSeries) -> dict[str, np.ndarray]:
    """An RTSTRUCT as third-party tools write them; returns the masks it describes (stored
    grid): a PTV with a hole (nested contour), an OAR over two ROI Contour items under a
    synonym, an empty structure."""
    volume = series.volume
    shape = volume.shape
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = RTStructureSetStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "RTSTRUCT"
    ds.StudyInstanceUID = series.study_instance_uid
    ds.SeriesInstanceUID = generate_uid()
    frame = Dataset()
    frame.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])
    rois, contours = [], []
    for number, name in enumerate(["PTV_70Gy", "Brain Stem", "Empty"], start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName = number, name
        roi.ReferencedFrameOfReferenceUID = series.frame_of_reference_uid
        rois.append(roi)
    ptv = np.zeros(shape, dtype=bool)
    ptv_items = []
    for k in range(8, 15):
        ptv_items += [_contour(_square(volume, k, 14, 33)), _contour(_square(volume, k, 21, 26))]
        ptv[k, 14:34, 14:34] = True
        ptv[k, 21:27, 21:27] = False
    stem = np.zeros(shape, dtype=bool)
    stem_items = []
    for k in range(3, 7):
        stem_items.append(_contour(_square(volume, k, 20, 27)))
        stem[k, 20:28, 20:28] = True
    for number, items in ((1, ptv_items), (2, stem_items[:2]), (2, stem_items[2:]), (3, [])):
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = [255, 0, 0]
        if items:
            item.ContourSequence = DicomSequence(items)
        contours.append(item)
    ds.StructureSetROISequence = DicomSequence(rois)
    ds.ROIContourSequence = DicomSequence(contours)
    ds.save_as(path, enforce_file_format=True)
    return {"PTV_70Gy": ptv, "Brain Stem": stem}


def test_tolerant_reader_rasterises_holes_split_structures_and_long_ds_values(ct, tmp_path):
    series = ct[1]
    expected = write_rtutils_style_rtstruct(tmp_path / "RS.dcm", series)
    structure_set = read_structure_set(tmp_path / "RS.dcm", series)
    assert set(structure_set.masks) == {"PTV_70Gy", "Brain Stem"}
    assert structure_set.empty == ("Empty",)
    for name, mask in expected.items():
        assert np.array_equal(structure_set.masks[name], mask), name
    assert structure_set.roi_numbers == {"PTV_70Gy": 1, "Brain Stem": 2, "Empty": 3}


def test_structure_set_on_another_frame_of_reference_is_refused(ct, tmp_path):
    series = ct[1]
    write_rtutils_style_rtstruct(tmp_path / "RS.dcm", series)
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = "1.2.3.999"
    for roi in ds.StructureSetROISequence:
        roi.ReferencedFrameOfReferenceUID = "1.2.3.999"
    with pytest.raises(UnusableStructureSet, match="frame of reference"):
        read_structure_set(ds, series)


@pytest.mark.parametrize(
    ("name", "gy"),
    [("PTV70", 70.0), ("PTV_70", 70.0), ("PTV_70Gy", 70.0), ("PTV7000", 70.0),
     ("ptv 59.4", 59.4), ("PTV_5400cGy", 54.0), ("PTV-63_3mm", 63.0), ("PTV_High", 70.0)],
    ids=["plain", "underscore", "gy", "cgy-number", "decimal", "cgy-unit", "suffix", "table"],
)
def test_prescriptions_come_from_ptv_names(name, gy):
    assert prescriptions_from_names([name]) == {name: pytest.approx(gy)}


def test_names_without_a_prescription_are_left_out_and_overrides_win():
    names = ["PTV", "CTV70", "zPTV70_opt", "PTV_boost", "PTV70"]
    assert prescriptions_from_names(names) == {"PTV70": 70.0}
    assert prescriptions_from_names(names, table={"PTV_boost": 66}, overrides={"PTV70": 68}) == {
        "PTV_boost": 66.0, "PTV70": 68.0}
    assert parse_prescription_overrides("PTV70=70, PTV_High=66.5") == {"PTV70": 70.0,
                                                                        "PTV_High": 66.5}
    with pytest.raises(ValueError, match="NAME=GY"):
        parse_prescription_overrides("PTV70")


def test_oars_match_by_tg263_name_and_common_synonyms_but_not_prvs():
    names = ["Brain Stem", "Cord", "Parotid Lt", "R Parotid", "Oesophagus", "Mandible",
             "SpinalCord_PRV05", "Larynx"]
    assert match_oars(names) == {
        "Brainstem": "Brain Stem", "SpinalCord": "Cord", "Parotid_L": "Parotid Lt",
        "Parotid_R": "R Parotid", "Esophagus": "Oesophagus", "Bone_Mandible": "Mandible",
        "Larynx": "Larynx"}


def test_even_odd_rasteriser_cuts_nested_polygons_out():
    outer = np.array([[-0.5, -0.5], [-0.5, 5.5], [5.5, 5.5], [5.5, -0.5]])
    inner = np.array([[1.5, 1.5], [1.5, 3.5], [3.5, 3.5], [3.5, 1.5]])
    mask = rasterise_polygons([outer, inner], (6, 6))
    assert mask.sum() == 36 - 4 and not mask[2:4, 2:4].any()




def test_rtcontour_dose_writes_an_rtdose_on_the_ct_frame_for_an_rtutils_structure_set(
        ct, tmp_path, tiny_dose_package, capsys):
    folder, series = ct
    write_rtutils_style_rtstruct(tmp_path / "RS.dcm", series)
    out = tmp_path / "RD.dcm"
    assert main([str(folder), "--rtstruct", str(tmp_path / "RS.dcm"), "--out", str(out),
                 "--package", str(tiny_dose_package), "--threads", "1"]) == 0
    assert "PTV_70Gy" in capsys.readouterr().out
    ds = pydicom.dcmread(out)
    rs = pydicom.dcmread(tmp_path / "RS.dcm")
    assert ds.Modality == "RTDOSE"
    assert ds.FrameOfReferenceUID == series.frame_of_reference_uid
    assert ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID == rs.SOPInstanceUID
    assert {item.DVHReferencedROISequence[0].ReferencedROINumber
            for item in ds.DVHSequence} == {1, 2}
    assert "70 Gy" in ds.DoseComment
    errors, _ = dciodvfy_report(out)
    assert errors == []


def test_rtcontour_dose_refuses_a_structure_set_without_a_ptv(ct, tmp_path, tiny_dose_package,
                                                               capsys):
    folder, series = ct
    write_rtutils_style_rtstruct(tmp_path / "RS.dcm", series)
    ds = pydicom.dcmread(tmp_path / "RS.dcm")
    ds.StructureSetROISequence[0].ROIName = "GTV"
    ds.save_as(tmp_path / "RS-noptv.dcm")
    assert main([str(folder), "--rtstruct", str(tmp_path / "RS-noptv.dcm"), "--out",
                 str(tmp_path / "RD.dcm"), "--package", str(tiny_dose_package)]) == 2
    assert "no PTV" in capsys.readouterr().err
    assert not (tmp_path / "RD.dcm").exists()
