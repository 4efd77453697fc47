"""``rtcontour listener`` as a process: graceful SIGTERM, and what a SIGKILL leaves behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pydicom
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from rtcontour.service.dicom_status import Status
from tests.conftest import REPO_ROOT, free_port
from tests.service.conftest import LISTENER_AE, requires_dcmtk, run_storescu

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


def test_listener_killed_in_the_quiet_period_makes_the_series_arrive_after_restart(
    start_listener_process, ct_series, tmp_path
):
    """Success was answered for every instance and the association released: rtcontour took
    responsibility, so a SIGKILL (power cut) in the quiet period must not lose the series."""
    listener = start_listener_process(quiet_period_s=60.0)
    files = ct_series(n_slices=4)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert run_storescu(listener.port, files).status_list == [Status.SUCCESS] * 4
    journal = tmp_path / "var" / "spool" / "journal" / series_uid
    # Written before the release reply: by the time storescu has exited it is on disk.
    assert [p.suffix for p in journal.iterdir()] == [".released"]
    time.sleep(1.0)
    listener.process.send_signal(signal.SIGKILL)
    listener.process.wait(10)
    folder = tmp_path / "var" / "spool" / "incoming" / series_uid
    assert sorted(p.suffix for p in folder.iterdir()) == [".dcm"] * 4
    for stored in folder.iterdir():
        assert pydicom.dcmread(stored).pixel_array.shape == (16, 16)  # every file is whole

    restarted = start_listener_process(quiet_period_s=0.5)
    restarted.wait_for_log("series arrived")  # nothing sent again
    log = restarted.log()
    assert f"series_instance_uid='{series_uid}'" in log and "n_instances=4" in log, log
    deadline = time.monotonic() + 10
    while journal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not journal.exists()  # the intake took it: a third start recovers nothing
    time.sleep(1.0)  # two more quiet periods: no second arrival
    assert restarted.log().count("series arrived") == 1


def test_listener_killed_mid_association_keeps_the_series_interrupted_until_resent(
    start_listener_process, ct_series, tmp_path
):
    """Killed before the association was released: the TPS saw it fail and sends again; the
    half received is no job of its own."""
    listener = start_listener_process(quiet_period_s=0.3)
    files = ct_series(n_slices=4)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CTImageStorage, ImplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AE)
    assert assoc.is_established
    for path in files[:2]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == Status.SUCCESS
    listener.process.send_signal(signal.SIGKILL)
    listener.process.wait(10)
    assoc.abort()

    restarted = start_listener_process(quiet_period_s=0.3)
    time.sleep(1.0)
    assert "series arrived" not in restarted.log()
    assert "stay interrupted until it is sent again" in restarted.log()
    assert run_storescu(restarted.port, files).status_list == [Status.SUCCESS] * 4
    restarted.wait_for_log("series arrived")
    assert "n_instances=4" in restarted.log()


def test_a_second_listener_on_the_same_data_folder_refuses_to_start(
    start_listener_process, tmp_path
):
    start_listener_process(quiet_period_s=60.0)
    second = subprocess.run(
        [sys.executable, "-m", "rtcontour.service.cli", "listener", "--log-only", "--host",
         "127.0.0.1", "--port", str(free_port())],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")},
             "RTCONTOUR_DATA_DIR": str(tmp_path / "var")},
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert second.returncode == 2, second.stderr
    assert "another rtcontour listener uses the spool" in second.stderr
    assert "Traceback" not in second.stderr
