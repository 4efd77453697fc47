"""Memory of a listener process stays flat over 1,000 association cycles."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from rtcontour.service.dicom_status import Status
from tests.service.conftest import requires_dcmtk

pytestmark = requires_dcmtk

CYCLES = 1000
WARM_UP = 150
SLACK_KIB = 6 * 1024  # allocator noise; a leak of ~6 kB per association would exceed it


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cycle(ae: AE, port: int, instance: Path | None) -> None:
    assoc = ae.associate("127.0.0.1", port, ae_title="RTCONTOUR")
    assert assoc.is_established
    if instance is None:
        assert assoc.send_c_echo().Status == Status.SUCCESS
    else:
        assert assoc.send_c_store(instance).Status == Status.SUCCESS
    assoc.release()


def test_memory_stays_flat_over_a_thousand_association_cycles(
    start_listener_process, ct_series
):
    listener = start_listener_process(quiet_period_s=0.2)
    pid = listener.process.pid
    instances = ct_series(n_slices=5)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = AE(ae_title="CYCLER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")

    def one(index: int) -> None:
        # Alternate: a store of one of five instances (a series re-sent again and again,
        # so arrivals keep being made) and a bare C-ECHO.
        cycle(ae, listener.port, instances[index % 5] if index % 2 else None)

    def run(count: int, offset: int) -> None:
        # Four peers at a time: the cycles are latency-bound, not CPU-bound.
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(one, range(offset, offset + count)))

    run(WARM_UP, 0)
    time.sleep(0.5)
    before = rss_kib(pid)
    started = time.monotonic()
    run(CYCLES, WARM_UP)
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    after = rss_kib(pid)
    print(f"RSS {before} KiB -> {after} KiB over {CYCLES} associations in {elapsed:.1f} s")
    assert after - before < SLACK_KIB
    assert "series arrived" in listener.log()
    assert listener.process.poll() is None
