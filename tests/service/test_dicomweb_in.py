"""STOW-RS in (``POST /dicomweb/studies``): instances taken like the listener's C-STOREs, into
the same spool, tracker and intake, refusals in the same list, with the API user in place of
the calling AE; compressed CT as the listener takes it; roles; 503 without a listener."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import JPEGLSLossless, MRImageStorage

from rtcontour.common.audit import make_recorder
from rtcontour.common.refusals import make_refusal_recorder
from rtcontour.service.handlers import Edge
from rtcontour.service.ingest import InstanceReceiver
from rtcontour.service.intake import Intake
from rtcontour.service.journal import SeriesJournal
from rtcontour.service.spool import InstanceSpool, SeriesTracker
from tests.conftest import write_phantom_series
from tests.phantoms import ct_datasets, head_phantom, write_datasets
from tests.service.api_support import ApiHarness, make_harness

STORED, FAILED = "00081199", "00081198"


def multipart(files: list[Path] | list[bytes]) -> tuple[bytes, dict[str, str]]:
    """A STOW-RS body of Part 10 files and its Content-Type."""
    boundary = f"test-{uuid.uuid4().hex}"
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
        + (item.read_bytes() if isinstance(item, Path) else item) + b"\r\n"
        for item in files) + b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type":
                  f'multipart/related; type="application/dicom"; boundary={boundary}'}


class Wired:
    """An API whose receiver feeds a real spool, tracker (with journal) and intake."""

    def __init__(self, api: ApiHarness) -> None:
        self.api = api
        settings = api.settings
        self.spool = InstanceSpool(settings.spool_dir, min_free_disk_bytes=0, durable=False)
        self.intake = Intake(settings, api.store, api.enqueued.append)
        self.tracker = SeriesTracker(self.intake, self.spool, quiet_period_s=60.0,
                                     journal=SeriesJournal(settings.spool_dir, durable=False))
        edge = Edge(ae_title=settings.ae_title, spool=self.spool, tracker=self.tracker,
                    max_instance_bytes=settings.max_instance_bytes,
                    audit=make_recorder(api.engine), refused=make_refusal_recorder(api.engine))
        api.client.app.state.ctx.receiver = InstanceReceiver(edge)  # type: ignore[attr-defined]

    def post(self, files: list[Path] | list[bytes], role: str = "clinician"):  # type: ignore[no-untyped-def]
        body, headers = multipart(files)
        return self.api.client.post("/dicomweb/studies", content=body,
                                    headers={**headers, **self.api.headers(role)})


@pytest.fixture
def wired(tmp_path: Path) -> Iterator[Wired]:
    api = make_harness(tmp_path, settings_extra={"min_slices": 5})
    wired = Wired(api)
    yield wired
    wired.tracker.stop(flush=False)
    api.client.close()
    api.engine.dispose()


def test_stow_stores_a_ct_series_that_becomes_a_job_of_the_api_user(
    wired: Wired, tmp_path: Path
) -> None:
    files = write_phantom_series(tmp_path / "ct", (8, 32, 32))

    reply = wired.post(files)

    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("application/dicom+json")
    assert len(reply.json()[STORED]["Value"]) == len(files)
    assert FAILED not in reply.json()
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    spooled = sorted((wired.spool.incoming_dir / series_uid).glob("*.dcm"))
    assert len(spooled) == len(files)
    # Written as the listener writes a C-STORE: Part 10, dataset as sent.
    assert pydicom.dcmread(spooled[0]).file_meta.TransferSyntaxUID == pydicom.dcmread(
        files[0]).file_meta.TransferSyntaxUID
    # The request was one released "association": the series waits for its quiet period.
    (arrival,) = wired.tracker.poll(flush=True)
    assert (arrival.calling_ae, arrival.origin, arrival.n_instances) == (
        "clinician-user", "dicomweb", len(files))
    (job,) = wired.api.store.list()
    assert (job.calling_ae, job.received_via, job.requested_by) == (
        "clinician-user", "dicomweb", "clinician-user")
    assert wired.api.enqueued == [job.id]
    shown = wired.api.client.get(f"/api/jobs/{job.id}", headers=wired.api.headers("viewer"))
    assert shown.json()["received_via"] == "dicomweb"
    assert shown.json()["requested_by"] == "clinician-user"


def test_stow_takes_jpeg_ls_compressed_ct_as_the_listener_does(
    wired: Wired, tmp_path: Path
) -> None:
    phantom = head_phantom((6, 32, 32))
    files = write_datasets(tmp_path / "jls", ct_datasets(phantom.hu, phantom.spacing_mm),
                           transfer_syntax=JPEGLSLossless)

    reply = wired.post(files)

    assert reply.status_code == 200, reply.text
    wired.tracker.poll(flush=True)
    (job,) = wired.api.store.list()
    stored = sorted(Path(job.spool_dir or "").glob("*.dcm"))
    assert len(stored) == len(files)
    assert {pydicom.dcmread(path).file_meta.TransferSyntaxUID for path in stored} == {
        JPEGLSLossless}


def test_stow_refuses_what_the_listener_refuses_and_lists_it_with_the_user(
    wired: Wired, tmp_path: Path
) -> None:
    ct = write_phantom_series(tmp_path / "ct", (6, 32, 32))
    mr = pydicom.dcmread(ct[0])
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    mr.save_as(tmp_path / "mr.dcm", enforce_file_format=True)
    broken = pydicom.dcmread(ct[1])
    del broken.PixelSpacing
    broken.save_as(tmp_path / "broken.dcm", enforce_file_format=True)

    reply = wired.post([ct[2], tmp_path / "mr.dcm", tmp_path / "broken.dcm", b"not dicom"])

    assert reply.status_code == 202, reply.text
    failed = {item["00081155"]["Value"][0]: item["00081197"]["Value"][0]
              for item in reply.json()[FAILED]["Value"]}
    assert failed[str(mr.SOPInstanceUID)] == 0x0122  # SOP class not supported
    assert failed[str(broken.SOPInstanceUID)] == 0xC000  # cannot understand
    assert len(failed) == 3 and len(reply.json()[STORED]["Value"]) == 1
    refusals = wired.api.client.get("/api/refusals", headers=wired.api.headers("admin")).json()
    rows = refusals["items"]
    assert len(rows) == 3 and {row["calling_ae"] for row in rows} == {"clinician-user"}
    assert any("PixelSpacing" in row["why"] for row in rows)
    assert any("MR Image Storage" in row["what"] for row in rows)
    # Nothing stored at all: 409.
    assert wired.post([tmp_path / "mr.dcm"]).status_code == 409


def test_stow_needs_a_clinician_or_admin_token(wired: Wired, tmp_path: Path) -> None:
    files = write_phantom_series(tmp_path / "ct", (6, 32, 32))
    assert wired.post(files[:1], role="viewer").status_code == 403
    body, headers = multipart(files[:1])
    assert wired.api.client.post("/dicomweb/studies", content=body,
                                 headers=headers).status_code == 401
    assert wired.tracker.pending_series == 0


def test_stow_of_another_media_type_is_refused_with_a_sentence(wired: Wired) -> None:
    reply = wired.api.client.post(
        "/dicomweb/studies", content=b"{}",
        headers={"Content-Type": "application/json", **wired.api.headers("clinician")})
    assert reply.status_code == 415
    assert "multipart/related" in reply.json()["detail"]


def test_standalone_api_without_a_listener_answers_503(tmp_path: Path) -> None:
    api = make_harness(tmp_path)
    body, headers = multipart([b"x"])
    reply = api.client.post("/dicomweb/studies", content=body,
                            headers={**headers, **api.headers("clinician")})
    assert reply.status_code == 503
    assert "rtcontour serve" in reply.json()["detail"]
    api.client.close()
    api.engine.dispose()
