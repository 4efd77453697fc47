"""InstanceSpool: atomic writes, UID checks, disk-space refusal."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from rtcontour.common.errors import InsufficientStorage, InvalidInstance
from rtcontour.service.spool import InstanceSpool, checked_uid

SERIES = "1.2.826.0.1.3680043.8.498.1"
SOP = "1.2.826.0.1.3680043.8.498.1.1"


@pytest.fixture
def spool(tmp_path: Path) -> InstanceSpool:
    return InstanceSpool(tmp_path / "spool", min_free_disk_bytes=0)


def test_write_places_instance_under_series_folder(spool):
    path = spool.write(SERIES, SOP, [b"abc", memoryview(b"def")])
    assert path == spool.incoming_dir / SERIES / f"{SOP}.dcm"
    assert path.read_bytes() == b"abcdef"
    assert list(path.parent.iterdir()) == [path]


def test_partial_instance_is_never_visible_under_its_final_name(spool):
    final = spool.incoming_dir / SERIES / f"{SOP}.dcm"

    def parts():
        yield b"first half"
        assert not final.exists(), "partial file visible under its final name"
        yield b"second half"

    spool.write(SERIES, SOP, parts())
    assert final.read_bytes() == b"first halfsecond half"


def test_failed_write_leaves_no_file_and_keeps_earlier_instances(spool, monkeypatch):
    spool.write(SERIES, "1.2.3", [b"kept"])
    real_replace = os.replace

    def disk_full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(InsufficientStorage):
        spool.write(SERIES, SOP, [b"x" * 1000])
    monkeypatch.setattr(os, "replace", real_replace)
    assert sorted(p.name for p in (spool.incoming_dir / SERIES).iterdir()) == ["1.2.3.dcm"]


def test_duplicate_sop_instance_replaces_the_earlier_file(spool):
    spool.write(SERIES, SOP, [b"old"])
    path = spool.write(SERIES, SOP, [b"new"])
    assert path.read_bytes() == b"new"
    assert len(list(path.parent.iterdir())) == 1


def test_refuses_when_free_disk_would_drop_below_minimum(tmp_path):
    spool = InstanceSpool(tmp_path, min_free_disk_bytes=2**62)
    with pytest.raises(InsufficientStorage):
        spool.write(SERIES, SOP, [b"x"])
    assert not (spool.incoming_dir / SERIES).exists()


@pytest.mark.parametrize(
    "uid",
    ["../../etc/passwd", "1.2/3", "1.2.3\\4", "", "1..2", "1.2.03", "1" * 65, "1.2.3\x00/x"],
    ids=["traversal", "slash", "backslash", "empty", "empty-component", "leading-zero",
         "too-long", "nul-slash"],
)
def test_invalid_uid_never_reaches_the_file_system(spool, uid):
    with pytest.raises(InvalidInstance):
        spool.write(uid, SOP, [b"x"])
    with pytest.raises(InvalidInstance):
        spool.write(SERIES, uid, [b"x"])
    assert list(spool.incoming_dir.iterdir()) == []


def test_checked_uid_strips_dicom_padding():
    assert checked_uid("1.2.3\x00", "UID") == "1.2.3"


def test_sweep_removes_partials_left_by_a_killed_listener(spool):
    folder = spool.incoming_dir / SERIES
    folder.mkdir(parents=True)
    (folder / f".{SOP}.abc.part").write_bytes(b"half")
    (folder / f"{SOP}.dcm").write_bytes(b"whole")
    assert spool.sweep_partials() == 1
    assert [p.name for p in folder.iterdir()] == [f"{SOP}.dcm"]


def test_stale_incomplete_series_are_deleted_after_the_retention(spool):
    import time

    old = spool.write(SERIES, SOP, [b"left by an aborted association"]).parent
    recent = spool.write("1.2.3.9", SOP, [b"recent"]).parent
    pending = spool.write("1.2.3.10", SOP, [b"old but still tracked"]).parent
    long_ago = time.time() - 3600
    for folder in (old, pending):
        for path in (*folder.iterdir(), folder):
            os.utime(path, (long_ago, long_ago))
    assert spool.sweep_stale_series(600, keep=frozenset({"1.2.3.10"})) == 1
    assert not old.exists() and recent.exists() and pending.exists()
