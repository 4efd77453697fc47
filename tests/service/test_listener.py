"""The DICOM listener with real DCMTK peers on loopback: storing, grouping, refusing."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid

from rtcontour.service.dicom_status import Status
from tests.phantoms import ct_datasets, write_datasets
from tests.service.conftest import (
    requires_dcmtk,
    run_echoscu,
    run_storescu,
    send_files_with_pynetdicom,
)

pytestmark = requires_dcmtk


def dataset_bytes(path: Path) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    with open(path, "rb") as stream:
        pydicom.filereader.read_preamble(stream, False)
        pydicom.filereader._read_file_meta_info(stream)
        return stream.read()


def test_echo_is_answered_with_success(listener_factory):
    listener = listener_factory()
    run = run_echoscu(listener.port)
    assert run.returncode == 0, run.output
    assert "Received Echo Response (Success)" in run.output


def test_series_sent_by_storescu_becomes_one_arrival_with_every_instance(
    listener_factory, ct_series
):
    listener = listener_factory()
    files = ct_series(n_slices=6)
    run = run_storescu(listener.port, files)
    assert run.status_list == [Status.SUCCESS] * 6, run.output
    [arrival] = listener.sink.wait_for(1)
    time.sleep(0.5)
    assert len(listener.sink.arrivals) == 1
    first = pydicom.dcmread(files[0])
    assert arrival.series_instance_uid == first.SeriesInstanceUID
    assert arrival.study_instance_uid == first.StudyInstanceUID
    assert (arrival.calling_ae, arrival.modality, arrival.n_instances) == ("STORESCU", "CT", 6)
    assert arrival.series_description == "Synthetic head CT"
    assert arrival.folder == listener.incoming_dir / first.SeriesInstanceUID
    for original in files:
        sop_uid = pydicom.dcmread(original, stop_before_pixels=True).SOPInstanceUID
        stored = arrival.folder / f"{sop_uid}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(original)  # bytes as sent
        assert pydicom.dcmread(stored).file_meta.SourceApplicationEntityTitle == "STORESCU"


def test_spooled_instance_passes_dciodvfy(listener_factory, ct_series):
    listener = listener_factory()
    run_storescu(listener.port, ct_series(n_slices=1))
    [arrival] = listener.sink.wait_for(1)
    [stored] = arrival.folder.glob("*.dcm")
    checked = subprocess.run(["dciodvfy", str(stored)], capture_output=True, text=True)
    errors = [line for line in checked.stderr.splitlines() if line.startswith("Error")]
    assert errors == [], checked.stderr


def test_two_series_in_one_association_become_two_arrivals(listener_factory, ct_series):
    listener = listener_factory()
    first, second = ct_series(n_slices=3), ct_series(n_slices=4)
    run_storescu(listener.port, first + second)
    arrivals = listener.sink.wait_for(2)
    assert sorted(a.n_instances for a in arrivals) == [3, 4]
    assert len({a.series_instance_uid for a in arrivals}) == 2


def test_series_split_over_two_associations_within_quiet_period_is_one_arrival(
    listener_factory, ct_series
):
    listener = listener_factory(quiet_period_s=1.5)
    files = ct_series(n_slices=6)
    run_storescu(listener.port, files[:3])
    run_storescu(listener.port, files[3:])
    [arrival] = listener.sink.wait_for(1)
    time.sleep(1.0)
    assert len(listener.sink.arrivals) == 1 and arrival.n_instances == 6


def test_resent_series_gives_a_new_arrival_without_duplicate_instances(
    listener_factory, ct_series
):
    listener = listener_factory()
    files = ct_series(n_slices=3)
    run_storescu(listener.port, files)
    listener.sink.wait_for(1)
    run_storescu(listener.port, files)
    arrivals = listener.sink.wait_for(2)
    assert [a.n_instances for a in arrivals] == [3, 3]
    assert len(list(arrivals[1].folder.iterdir())) == 3


def test_aborted_association_produces_no_arrival_until_resent_by_another(
    listener_factory, ct_series
):
    listener = listener_factory()
    files = ct_series(n_slices=3)
    run = run_storescu(listener.port, files, args=["--abort"])
    assert run.status_list == [Status.SUCCESS] * 3, run.output
    time.sleep(1.0)
    assert listener.sink.arrivals == []
    assert not [p for p in listener.spooled_files() if not p.name.endswith(".dcm")]
    run_storescu(listener.port, files[:1])  # the series completed later by a released one
    [arrival] = listener.sink.wait_for(1)
    assert arrival.n_instances == 3


def dcmtk_convert(files: list[Path], command: list[str]) -> list[Path]:
    """Compress files with a DCMTK codec tool (dcmcjpeg, dcmcjpls, dcmcrle)."""
    converted = []
    for source in files:
        target = source.with_suffix(".compressed.dcm")
        subprocess.run([*command, str(source), str(target)], check=True, capture_output=True)
        converted.append(target)
    return converted


@pytest.mark.parametrize(
    "compress, storescu_args, expected_syntax",
    [
        (["dcmcjpeg", "+e1"], ["-xs"], "1.2.840.10008.1.2.4.70"),
        (["dcmcjpeg", "+el"], "pynetdicom", "1.2.840.10008.1.2.4.57"),
        (["dcmcjpls", "+el"], ["-xt"], "1.2.840.10008.1.2.4.80"),
        (["dcmcrle"], ["-xr"], "1.2.840.10008.1.2.5"),
        ("j2k", ["-xv"], "1.2.840.10008.1.2.4.90"),
        ("j2k-as-lossy", "pynetdicom", "1.2.840.10008.1.2.4.91"),
        (None, ["-xd"], "1.2.840.10008.1.2.1.99"),
        (None, ["-xi"], "1.2.840.10008.1.2"),
    ],
    ids=["jpeg-lossless-sv1", "jpeg-lossless", "jpeg-ls-lossless", "rle", "jpeg2000-lossless",
         "jpeg2000", "deflated", "implicit"],
)
def test_supported_transfer_syntaxes_are_accepted(
    listener_factory, ct_series, compress, storescu_args, expected_syntax
):
    listener = listener_factory()
    size = 16
    if compress in ("j2k", "j2k-as-lossy"):
        size = 64  # openjpeg needs tiles larger than its resolution levels
        files = ct_series(n_slices=2, rows=size, columns=size, transfer_syntax=JPEG2000Lossless)
        if compress == "j2k-as-lossy":  # a reversible codestream is valid in the lossy syntax
            for path in files:
                ds = pydicom.dcmread(path)
                ds.file_meta.TransferSyntaxUID = JPEG2000
                ds.save_as(path)
    else:
        files = ct_series(n_slices=2)
        if compress:
            files = dcmtk_convert(files, compress)
    if storescu_args == "pynetdicom":  # storescu has no option proposing only process 14
        assert send_files_with_pynetdicom(listener.port, files) == [Status.SUCCESS] * 2
    else:
        run = run_storescu(listener.port, files, args=storescu_args)
        assert run.status_list == [Status.SUCCESS] * 2, run.output
    [arrival] = listener.sink.wait_for(1)
    for stored in arrival.folder.glob("*.dcm"):
        ds = pydicom.dcmread(stored)
        assert ds.file_meta.TransferSyntaxUID == expected_syntax
        assert ds.pixel_array.shape == (size, size)


def test_store_refuses_with_out_of_resources_when_disk_is_below_minimum(
    listener_factory, ct_series
):
    listener = listener_factory(min_free_disk_bytes=2**62)
    run = run_storescu(listener.port, ct_series(n_slices=3))
    assert run.status_list == [Status.OUT_OF_RESOURCES] * 3, run.output
    time.sleep(0.8)
    assert listener.spooled_files() == [] and listener.sink.arrivals == []
    assert run_echoscu(listener.port).returncode == 0  # the service goes on


def test_oversized_instance_is_refused_and_the_rest_is_stored(listener_factory, ct_series):
    listener = listener_factory(max_instance_bytes=4000)
    small = ct_series(n_slices=2, rows=16, columns=16)  # ~1.5 kB each
    large = ct_series(n_slices=1, rows=64, columns=64)  # ~9 kB
    run = run_storescu(listener.port, [small[0], *large, small[1]])
    assert run.status_list == [Status.SUCCESS, Status.OUT_OF_RESOURCES, Status.SUCCESS]
    [arrival] = listener.sink.wait_for(1)
    assert arrival.n_instances == 2


@pytest.mark.parametrize(
    "mutate",
    [
        lambda ds: delattr(ds, "PixelSpacing"),
        lambda ds: delattr(ds, "FrameOfReferenceUID"),
        lambda ds: delattr(ds, "PixelData"),
        lambda ds: setattr(ds, "Modality", "MR"),
        lambda ds: setattr(ds, "Rows", 60000),
        lambda ds: setattr(ds, "ImagePositionPatient", [1, 2]),
        lambda ds: setattr(ds, "BitsAllocated", 8),
        lambda ds: setattr(ds, "SamplesPerPixel", 3),
        lambda ds: setattr(ds, "PixelData", ds.PixelData + b"\0\0" * 8),
        lambda ds: setattr(ds, "PixelData", ds.PixelData[:-2]),
    ],
    ids=["no-pixel-spacing", "no-frame-of-reference", "no-pixel-data", "modality-mr",
         "rows-beyond-pixel-data", "position-two-values", "bits-allocated-8",
         "samples-per-pixel-3", "pixel-data-too-long", "pixel-data-too-short"],
)
def test_invalid_instance_is_refused_while_the_valid_ones_are_stored(
    listener_factory, tmp_path, mutate
):
    listener = listener_factory()
    import numpy as np

    datasets = ct_datasets(np.zeros((3, 8, 8), np.float32), series_uid=generate_uid())
    mutate(datasets[1])
    files = write_datasets(tmp_path / "mixed", datasets)
    run = run_storescu(listener.port, files)
    assert run.status_list == [Status.SUCCESS, Status.CANNOT_UNDERSTAND, Status.SUCCESS], (
        run.output
    )
    [arrival] = listener.sink.wait_for(1)
    assert arrival.n_instances == 2


def test_instance_whose_sop_class_differs_from_its_context_is_refused(
    listener_factory, ct_series
):
    listener = listener_factory()
    good, mismatched = ct_series(n_slices=2)
    ds = pydicom.dcmread(mismatched)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage; the file meta says CT
    ds.save_as(mismatched)
    statuses = send_files_with_pynetdicom(listener.port, [good, mismatched])
    assert statuses == [Status.SUCCESS, Status.DATASET_DOES_NOT_MATCH_SOP_CLASS]
    [arrival] = listener.sink.wait_for(1)
    assert arrival.n_instances == 1


def test_invalid_uid_is_refused_and_never_becomes_a_path(listener_factory, ct_series, tmp_path):
    listener = listener_factory()
    [path] = ct_series(n_slices=1)
    ds = pydicom.dcmread(path)
    ds.SeriesInstanceUID = "1.2.3/../../../../tmp/evil"
    ds.save_as(path)
    assert send_files_with_pynetdicom(listener.port, [path]) == [Status.CANNOT_UNDERSTAND]
    assert listener.spooled_files() == []
    assert not (tmp_path / "tmp" / "evil").exists()
