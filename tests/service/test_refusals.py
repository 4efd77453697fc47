"""Refusals you can see: what the listener refused (an association, an MR series' context, an
instance answered with a failure status) is listed over the API, audited and counted; run
apart from the API, the listener serves its own DICOM counters."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from rtcontour.common.refusals import make_refusal_recorder
from rtcontour.service.dicom_status import Status
from rtcontour.service.listener import start_listener
from tests.conftest import REPO_ROOT, free_port
from tests.phantoms import ct_datasets, write_datasets
from tests.service.api_support import ApiHarness, harness_fixture
from tests.service.conftest import RecordingSink, run_echoscu, run_storescu

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture
def api(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield from harness_fixture(tmp_path)


def _send_mr_series_contexts(port: int) -> None:
    """An MR scanner proposes MR Image Storage (and Verification), stores nothing, releases."""
    ae = AE(ae_title="MRSCANNER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(MR_IMAGE_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title="RTCONTOUR")
    assert assoc.is_established
    assoc.release()


def test_refused_association_context_and_instance_are_listed_audited_and_counted(
    api: ApiHarness, tmp_path: Path
) -> None:
    from rtcontour.common.audit import make_recorder
    from rtcontour.service import metrics

    settings = api.settings.model_copy(update={
        "dicom_host": "127.0.0.1", "dicom_port": free_port(), "quiet_period_s": 0.3,
        "min_free_disk_bytes": 0})
    before = {kind: metrics.REFUSALS.labels(kind=kind)._value.get()
              for kind in ("association", "context", "instance")}
    handle = start_listener(settings, RecordingSink(),
                            audit=make_recorder(api.engine, actor="dicom-listener"),
                            refused=make_refusal_recorder(api.engine))
    port = handle.address[1]
    try:
        assert run_echoscu(port, calling_ae="PACS", called_ae="WRONG_AE").returncode != 0
        _send_mr_series_contexts(port)
        datasets = ct_datasets(np.zeros((2, 8, 8), np.float32), series_uid=generate_uid())
        datasets[1].BitsAllocated = 8
        run = run_storescu(port, write_datasets(tmp_path / "ct", datasets), calling_ae="TPS")
        assert run.status_list == [Status.SUCCESS, Status.CANNOT_UNDERSTAND]
    finally:
        handle.shutdown(timeout_s=2.0)

    page = api.client.get("/api/refusals", headers=api.headers("admin")).json()
    by_kind = {item["kind"]: item for item in page["items"]}
    assert by_kind["association"]["calling_ae"] == "PACS"
    assert by_kind["association"]["why"] == "called AE title not recognised"
    assert by_kind["association"]["address"] == "127.0.0.1"
    assert by_kind["context"]["calling_ae"] == "MRSCANNER"
    assert by_kind["context"]["what"].startswith("MR Image Storage")
    assert by_kind["instance"]["calling_ae"] == "TPS"
    assert "BitsAllocated 8 is not 16" in by_kind["instance"]["why"]
    assert by_kind["instance"]["status"] == Status.CANNOT_UNDERSTAND
    assert page["counts"] == {"association": 1, "context": 1, "instance": 1}
    events = {e["event"] for e in api.client.get(
        "/api/audit", headers=api.headers("admin")).json()["items"]}
    assert {"dicom.association_rejected", "dicom.context_refused",
            "dicom.instance_refused"} <= events
    for kind, count in before.items():
        assert metrics.REFUSALS.labels(kind=kind)._value.get() == count + 1
    assert api.client.get("/api/refusals", headers=api.headers("clinician")).status_code == 403


def _metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith(name) and not line.startswith("#")]
    return sum(values)


def test_standalone_listener_serves_its_dicom_counters_to_the_scraper(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTCONTOUR_")}
    env.update(RTCONTOUR_DATA_DIR=str(tmp_path / "var"), RTCONTOUR_MIN_FREE_DISK_BYTES="0",
               RTCONTOUR_LISTENER_METRICS_PORT=str(metrics_port), PYTHONUNBUFFERED="1")
    log = tmp_path / "listener.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "rtcontour.service.cli", "listener", "--host", "127.0.0.1", "--port",
         str(port)], env=env, cwd=REPO_ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "listening on" not in log.read_text(errors="replace"):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert run_echoscu(port, calling_ae="TPS").returncode == 0
        assert run_echoscu(port, calling_ae="TPS", called_ae="WRONG").returncode != 0
        datasets = ct_datasets(np.zeros((2, 8, 8), np.float32), series_uid=generate_uid())
        run_storescu(port, write_datasets(tmp_path / "ct", datasets), calling_ae="TPS")
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        assert _metric(text, "rtcontour_dicom_associations_total") >= 2
        assert _metric(text, "rtcontour_dicom_associations_rejected_total") == 1
        assert _metric(text, 'rtcontour_dicom_instances_received_total{outcome="stored"}') == 2
        assert _metric(text, 'rtcontour_dicom_refusals_total{kind="association"}') == 1
    finally:
        process.terminate()
        process.wait(20)


def _mr_series(folder: Path, series_uid: str, n_slices: int) -> list[Path]:
    """A real MR-like series on disk: phantom CT files turned into MR Image Storage by DCMTK's
    dcmodify (SOP Class, with the file meta following, and Modality)."""
    files = write_datasets(folder, ct_datasets(np.zeros((n_slices, 8, 8), np.float32),
                                               series_uid=series_uid))
    subprocess.run(["dcmodify", "-nb", "-m", f"(0008,0016)={MR_IMAGE_STORAGE}",
                    "-m", "(0008,0060)=MR", *map(str, files)], check=True, capture_output=True)
    return files


def test_an_mr_series_sent_by_storescu_is_refused_naming_mr_image_storage_modality_and_series(
    api: ApiHarness, tmp_path: Path
) -> None:
    settings = api.settings.model_copy(update={
        "dicom_host": "127.0.0.1", "dicom_port": free_port(), "quiet_period_s": 0.3,
        "min_free_disk_bytes": 0})
    sink = RecordingSink()
    handle = start_listener(settings, sink, refused=make_refusal_recorder(api.engine))
    series_uid = generate_uid()
    try:
        # storescu proposes every storage class it knows, alphabetically (ECG first)
        run = run_storescu(handle.address[1], _mr_series(tmp_path / "mr", series_uid, 3),
                           calling_ae="MRSCANNER")
        assert run.status_list == [Status.SOP_CLASS_NOT_SUPPORTED] * 3, run.output
    finally:
        handle.shutdown(timeout_s=2.0)

    assert sink.arrivals == []  # no job, and nothing of it on disk
    assert list((settings.spool_dir / "incoming").glob("*/*")) == []
    assert list((settings.spool_dir / "journal").glob("*/*")) == []
    page = api.client.get("/api/refusals", headers=api.headers("admin")).json()
    assert len(page["items"]) == 1, page  # one per series, not one per slice
    refusal = page["items"][0]
    assert refusal["kind"] == "series" and refusal["calling_ae"] == "MRSCANNER"
    assert refusal["what"] == f"MR Image Storage, modality MR, series {series_uid}: 3 instances"
    assert refusal["series_instance_uid"] == series_uid
    assert refusal["status"] == Status.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert "ECG" not in refusal["what"] + refusal["why"]
    assert "CT Image Storage and RT Structure Set Storage only" in refusal["why"]
