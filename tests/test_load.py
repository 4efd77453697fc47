"""Load: 10 series of 10 different patients on 10 concurrent associations -> 10 RTSTRUCTs,
each referencing its own CT and patient, none mixed up. Prints the throughput."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom

from tests.conftest import (
    StoreScp,
    api_job,
    referenced_ct_uids,
    serve_env,
    sop_uids,
    storescu,
    wait_for_jobs,
    wait_until,
    write_phantom_series,
)

logger = logging.getLogger(__name__)

N_SERIES = 10
SHAPE = (24, 96, 96)


def test_ten_concurrent_series_give_ten_rtstructs_none_mixed_up(
    tmp_path: Path, tps: StoreScp, serve_factory, test_package: Path
) -> None:
    # RTCONTOUR_TEST_LOAD_PACKAGE: measure with another package (e.g. the trained one).
    package = Path(os.environ.get("RTCONTOUR_TEST_LOAD_PACKAGE") or test_package)
    serve = serve_factory(
        serve_env(tmp_path / "var", destinations=tps.destination, model_package=package)
    )
    series = {
        f"RTC-LOAD-{index:02d}": write_phantom_series(
            tmp_path / f"ct{index}", SHAPE, patient_id=f"RTC-LOAD-{index:02d}", seed=index
        )
        for index in range(N_SERIES)
    }
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=N_SERIES) as pool:
        sends = [
            pool.submit(storescu, serve.dicom_port, files, calling_ae=f"TPS{i}")
            for i, files in enumerate(series.values())
        ]
        for send in sends:
            send.result()
    sent = time.monotonic()
    jobs = wait_for_jobs(serve, N_SERIES, timeout_s=300)
    finished = time.monotonic()

    assert {j["state"] for j in jobs} == {"done"}
    received = wait_until(
        lambda: len(tps.received()) >= N_SERIES and tps.received(), 20, "10 RTSTRUCTs"
    )
    assert len(received) == N_SERIES
    by_patient = {str(pydicom.dcmread(r).PatientID): r for r in received}
    assert set(by_patient) == set(series)
    for patient_id, files in series.items():
        rtstruct = pydicom.dcmread(by_patient[patient_id])
        ct = pydicom.dcmread(files[0], stop_before_pixels=True)
        assert rtstruct.StudyInstanceUID == ct.StudyInstanceUID
        assert referenced_ct_uids(by_patient[patient_id]) == sop_uids(files)
    inference = [api_job(serve, j["id"])["timings"]["inference_s"] for j in jobs]
    total_s = finished - started
    summary = (
        f"load: {N_SERIES} series of {SHAPE[0]}x{SHAPE[1]}x{SHAPE[2]} on {N_SERIES} concurrent "
        f"associations: all sent in {sent - started:.1f} s, all done in {total_s:.1f} s -> "
        f"{N_SERIES / total_s * 60:.1f} series/min (model {package.name}, mean inference "
        f"{sum(inference) / len(inference):.2f} s)"
    )
    logger.warning(summary)
    print(summary)
