"""Fuzzing the listener with more than 1,000 mutated CT instances.

Two kinds of mutation, each sent the way a real peer would:
- *structural* (pydicom-level: missing or wrong-VR attributes, absurd values, huge dimensions,
  invalid or path-like UIDs, deeply nested sequences, huge text) written as valid files and
  sent by DCMTK ``storescu`` in large batches;
- *byte-level* (truncated datasets, absurd element lengths, flipped bytes, garbage, mismatched
  SOP Class) that storescu would refuse to read, sent verbatim by pynetdicom.

The listener must answer every one with a status (a failure, or success when harmless), never
hit an unexpected error, write nothing but valid ``<UID>/<UID>.dcm`` files, and still turn a
valid series sent afterwards into an arrival.
"""

from __future__ import annotations

import logging
import random
import re
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from rtcontour.service.dicom_status import Status
from tests.phantoms import ct_datasets, write_datasets
from tests.service.conftest import (
    requires_dcmtk,
    run_echoscu,
    run_storescu,
    send_files_with_pynetdicom,
)

pytestmark = [requires_dcmtk, pytest.mark.filterwarnings("ignore:Invalid value:UserWarning")]

N_STRUCTURAL = 560
N_BYTE_LEVEL = 560
BATCHES = 2
ANSWERS = {
    Status.SUCCESS,
    Status.CANNOT_UNDERSTAND,
    Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
    Status.OUT_OF_RESOURCES,
}
UID_PATH = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*(\.dcm)?$")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def _base_datasets(n: int, rng: random.Random) -> list[Dataset]:
    hu = np.full((n, 8, 8), -1000.0, np.float32)
    return ct_datasets(hu, series_uid=generate_uid(), seed=rng.randrange(2**31))


def _nested(depth: int) -> Sequence:
    item = Dataset()
    item.ReferencedSOPInstanceUID = "1.2.3"
    for _ in range(depth):
        outer = Dataset()
        outer.ReferencedImageSequence = Sequence([item])
        item = outer
    return Sequence([item])


REQUIRED = ["SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality",
            "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
            "PixelSpacing", "Rows", "Columns", "PixelData"]

STRUCTURAL: list[Callable[[Dataset, random.Random], None]] = [
    lambda ds, r: delattr(ds, r.choice(REQUIRED)),
    lambda ds, r: ds.add_new(0x00280010, "LO", "many"),  # Rows with a wrong VR
    lambda ds, r: ds.add_new(0x00200032, "LO", "left\\up\\far"),  # position: wrong VR
    lambda ds, r: ds.add_new(0x00280030, "DS", ["0", "-1"]),  # non-positive spacing
    lambda ds, r: ds.add_new(0x00200037, "DS", ["1e300"] * 6),  # absurd orientation
    lambda ds, r: setattr(ds, "Rows", 65535),  # huge dimensions, tiny pixel data
    lambda ds, r: (setattr(ds, "Rows", 4000), setattr(ds, "Columns", 4000)),
    lambda ds, r: setattr(ds, "Modality", r.choice(["MR", "RTSTRUCT", "", "C/T"])),
    lambda ds, r: setattr(ds, "SeriesInstanceUID", r.choice(
        ["../../etc", "1.2.3/4", "1.2.abc", "1..2", "1.02.3", "1." + "1" * 70, ".", "/tmp"])),
    lambda ds, r: setattr(ds, "StudyInstanceUID", "x" * 64),
    lambda ds, r: setattr(ds, "FrameOfReferenceUID", "not a uid"),
    lambda ds, r: setattr(ds, "ReferencedImageSequence", _nested(r.randint(50, 120))),
    lambda ds, r: setattr(ds, "ImageComments", "A" * r.randint(10_000, 300_000)),
    lambda ds, r: setattr(ds, "PixelData", ds.PixelData[: r.randint(0, 100)]),
    lambda ds, r: setattr(ds, "PixelData", ds.PixelData + b"\0" * 2 * r.randint(1, 50)),
    lambda ds, r: setattr(ds, "BitsAllocated", r.choice([1, 8, 12, 32])),
    lambda ds, r: setattr(ds, "SamplesPerPixel", r.choice([0, 3, 4])),
    lambda ds, r: ds.add_new(0x00091010, "OB", bytes(r.randrange(256) for _ in range(300))),
    lambda ds, r: setattr(ds, "ImagePositionPatient", ["1", "2"]),
    lambda ds, r: setattr(ds, "SeriesDescription", "\u00e9\u00e8 " * 20),
    lambda ds, r: None,  # harmless: must be stored
]


def _encode(ds: Dataset) -> tuple[bytes, bytes]:
    """(file meta bytes, explicit VR little endian dataset bytes)."""
    meta = DicomBytesIO()
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return meta.getvalue(), body.getvalue()


def _element_offsets(body: bytes) -> list[tuple[int, int]]:
    """(offset of the length field, its size) of each top-level element of explicit VR LE."""
    offsets, position = [], 0
    while position + 8 <= len(body):
        vr = body[position + 4 : position + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"UC", b"UR", b"OD", b"OL", b"OV"):
            length = struct.unpack_from("<I", body, position + 8)[0]
            offsets.append((position + 8, 4))
            position += 12 + (0 if length == 0xFFFFFFFF else length)
        else:
            length = struct.unpack_from("<H", body, position + 6)[0]
            offsets.append((position + 6, 2))
            position += 8 + length
    return offsets


def _deeply_nested(depth: int) -> bytes:
    """ReferencedImageSequence nested ``depth`` times, undefined lengths (a recursion bomb)."""
    sequence = struct.pack("<HH2sHI", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF)
    item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
    ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return (sequence + item) * depth + ends * depth


def _byte_mutation(body: bytes, r: random.Random) -> bytes:
    kind = r.randrange(7)
    if kind == 0:  # truncated anywhere
        return body[: r.randrange(len(body))]
    if kind == 1:  # absurd length in one element header
        offset, size = r.choice(_element_offsets(body))
        absurd = r.choice([0xFFFFFFF0, 0x7FFFFFFF, len(body) * 3, 0xFFFFFFFF])
        packed = struct.pack("<I", absurd) if size == 4 else struct.pack("<H", absurd & 0xFFFF)
        return body[:offset] + packed + body[offset + size :]
    if kind == 2:  # flipped bytes in the header part
        mutated = bytearray(body)
        for _ in range(r.randint(1, 20)):
            mutated[r.randrange(min(len(body), 900))] = r.randrange(256)
        return bytes(mutated)
    if kind == 3:  # garbage
        return bytes(r.randrange(256) for _ in range(r.randint(0, 2000)))
    if kind == 4:  # an element header duplicated in the middle
        cut = r.randrange(len(body))
        return body[:cut] + body[:8] + body[cut:]
    if kind == 5:  # thousands of nested sequences before the rest
        return _deeply_nested(r.randint(500, 5000)) + body
    return body  # unchanged bytes: must be stored


def _write_raw(path: Path, meta: bytes, body: bytes) -> Path:
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta + body)
    return path


@pytest.fixture
def fuzz_listener(listener_factory):
    return listener_factory(max_instance_bytes=1_000_000, dimse_timeout_s=20.0)


def test_listener_survives_over_a_thousand_mutated_instances(
    fuzz_listener, tmp_path, ct_series, caplog
):
    caplog.set_level(logging.WARNING, logger="rtcontour.service")
    r = random.Random(20240115)
    answered: list[int | None] = []

    # Structural mutations: valid files sent by storescu in large batches.
    structural_dir = tmp_path / "structural"
    base = _base_datasets(N_STRUCTURAL, r)
    for index, ds in enumerate(base):
        STRUCTURAL[index % len(STRUCTURAL)](ds, r)
    files = write_datasets(structural_dir, base)
    unsent: list[Path] = []
    for batch in range(BATCHES):
        chunk = files[batch::BATCHES]
        run = run_storescu(fuzz_listener.port, chunk)
        answered += run.status_list
        unsent += [f for f in chunk if str(f) not in run.statuses]
    # What storescu refused to read or send goes verbatim through pynetdicom.
    if unsent:
        answered += send_files_with_pynetdicom(fuzz_listener.port, unsent)

    # Byte-level mutations, and mismatched SOP Class, verbatim through pynetdicom.
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    raw_files = []
    for index, ds in enumerate(_base_datasets(N_BYTE_LEVEL, r)):
        if index % 10 == 0:
            ds.SOPClassUID = MR_IMAGE_STORAGE  # file meta (the request) still says CT
        meta, body = _encode(ds)
        raw_files.append(_write_raw(raw_dir / f"{index}.dcm", meta, _byte_mutation(body, r)))
    half = len(raw_files) // 2
    answered += send_files_with_pynetdicom(fuzz_listener.port, raw_files[:half])
    answered += send_files_with_pynetdicom(fuzz_listener.port, raw_files[half:])

    assert len(answered) >= 1000
    assert set(answered) <= ANSWERS, sorted(set(answered) - ANSWERS, key=str)
    assert answered.count(Status.SUCCESS) > 50  # harmless mutations were stored
    assert sum(1 for s in answered if s != Status.SUCCESS) > 500
    unexpected = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert unexpected == [], unexpected[:3]

    for path in fuzz_listener.incoming_dir.rglob("*"):
        assert UID_PATH.match(path.name), path  # no path character reached the file system
        if path.is_file():
            stored = pydicom.dcmread(path, stop_before_pixels=True)
            assert f"{stored.SOPInstanceUID}.dcm" == path.name
            assert stored.SeriesInstanceUID == path.parent.name

    # The service goes on: echo, then a valid series becomes an arrival.
    assert run_echoscu(fuzz_listener.port).returncode == 0
    valid = ct_series(n_slices=3)
    assert run_storescu(fuzz_listener.port, valid).status_list == [Status.SUCCESS] * 3
    series_uid = pydicom.dcmread(valid[0], stop_before_pixels=True).SeriesInstanceUID
    arrival = fuzz_listener.sink.wait_for_series(series_uid)
    assert arrival is not None and arrival.n_instances == 3
