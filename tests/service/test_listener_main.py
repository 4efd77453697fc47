"""``rtcontour listener`` as a process: graceful SIGTERM, and what a SIGKILL leaves behind."""

from __future__ import annotations

import signal
import time

import pydicom

from service.dicom_status import Status
from tests.service.conftest import requires_dcmtk, run_storescu

pytestmark = requires_dcmtk


def test_sigterm_hands_over_complete_series_and_exits_cleanly(start_listener_process, ct_series):
    listener = start_listener_process(quiet_period_s=60.0)
    files = ct_series(n_slices=3)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert run_storescu(listener.port, files).status_list == [Status.SUCCESS] * 3
    started = time.monotonic()
    listener.process.send_signal(signal.SIGTERM)
    assert listener.process.wait(15) == 0
    assert time.monotonic() - started < 10
    log = listener.log()
    assert f"series_instance_uid='{series_uid}'" in log and "n_instances=3" in log, log
    assert "Phantom" not in log and "RTC-PHANTOM" not in log  # no patient name or ID logged


def test_killed_listener_leaves_whole_instances_and_no_arrival_until_resent(
    start_listener_process, ct_series, tmp_path
):
    listener = start_listener_process(quiet_period_s=60.0)
    files = ct_series(n_slices=4)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert run_storescu(listener.port, files).status_list == [Status.SUCCESS] * 4
    listener.process.send_signal(signal.SIGKILL)
    listener.process.wait(10)
    folder = tmp_path / "var" / "spool" / "incoming" / series_uid
    assert sorted(p.suffix for p in folder.iterdir()) == [".dcm"] * 4
    for stored in folder.iterdir():
        assert pydicom.dcmread(stored).pixel_array.shape == (16, 16)  # every file is whole

    restarted = start_listener_process(quiet_period_s=0.3)
    time.sleep(1.0)
    assert "series arrived" not in restarted.log()  # the interrupted series makes no job
    assert run_storescu(restarted.port, files[:1]).status_list == [Status.SUCCESS]
    restarted.wait_for_log("series arrived")
    assert "n_instances=4" in restarted.log()
