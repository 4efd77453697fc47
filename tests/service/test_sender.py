"""The C-STORE SCU against DCMTK storescp: delivery, retries with backoff, idempotence."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest

from rtcontour.common.db import make_engine
from rtcontour.common.errors import DestinationUnavailable
from rtcontour.common.jobstore import JobStore
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Destination, Settings
from rtcontour.worker.sender import Sender, deliver
from tests.conftest import StoreScp, free_port


@pytest.fixture
def rtstruct_file(tmp_path: Path) -> Path:
    """An RTSTRUCT built by worker.rtstruct from a small phantom."""
    import numpy as np

    from rtcontour.common.volume import load_series
    from rtcontour.worker.rtstruct import RoiSpec, build_rtstruct, save_rtstruct
    from tests.conftest import write_phantom_series

    series = load_series(write_phantom_series(tmp_path / "ct", (12, 32, 32)), min_slices=5)
    mask = series.volume.array > 500
    dataset = build_rtstruct(
        series, {"Bone": mask}, [RoiSpec("Bone", (255, 255, 0))],
        model_name="test", model_version="0.0.1",
    )
    assert np.any(mask)
    return save_rtstruct(dataset, tmp_path / "RS.dcm")


def _store(settings: Settings) -> JobStore:
    engine = make_engine(settings)
    create_schema(engine)
    return JobStore(engine)


def test_send_file_stores_at_destination(
    settings: Settings, tps: StoreScp, rtstruct_file: Path
) -> None:
    Sender(settings).send_file(rtstruct_file, Destination.parse(tps.destination))
    (received,) = tps.received()
    assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(rtstruct_file).SOPInstanceUID


def test_unreachable_destination_raises_after_attempts_with_backoff(
    settings: Settings, rtstruct_file: Path
) -> None:
    settings = settings.model_copy(update={"send_attempts": 4, "send_backoff_s": 0.1})
    sleeps: list[float] = []
    destination = Destination.parse(f"TPS@127.0.0.1:{free_port()}")
    with pytest.raises(DestinationUnavailable, match=r"after 4 attempts.*not reachable"):
        Sender(settings, sleep=sleeps.append).send_file(rtstruct_file, destination)
    assert sleeps == [0.1, 0.2, 0.4]


def test_wrong_called_ae_is_reported_as_rejected(
    settings: Settings, tps: StoreScp, rtstruct_file: Path
) -> None:
    settings = settings.model_copy(update={"send_attempts": 1})
    wrong = Destination.parse(f"NOT_TPS@127.0.0.1:{tps.port}")
    # storescp accepts any called AE by default; whichever it does, the message names it.
    try:
        Sender(settings).send_file(rtstruct_file, wrong)
    except DestinationUnavailable as exc:
        assert "NOT_TPS" in str(exc)


def test_destination_back_during_backoff_gets_the_file(
    settings: Settings, tmp_path: Path, rtstruct_file: Path
) -> None:
    settings = settings.model_copy(update={"send_attempts": 6, "send_backoff_s": 0.3})
    peer = StoreScp(tmp_path / "late")
    starter = threading.Timer(0.5, peer.start)
    starter.start()
    try:
        Sender(settings).send_file(rtstruct_file, Destination.parse(peer.destination))
        assert len(peer.received()) == 1
    finally:
        starter.join()
        peer.stop()


def test_deliver_skips_destination_that_already_has_the_instance(
    settings: Settings, tps: StoreScp, rtstruct_file: Path
) -> None:
    store = _store(settings)
    job_id = store.create_or_merge_for_series(series_instance_uid="1.2.3").job.id
    uid = str(pydicom.dcmread(rtstruct_file).SOPInstanceUID)
    destination = Destination.parse(tps.destination)
    first = deliver(job_id=job_id, path=rtstruct_file, sop_instance_uid=uid,
                    destinations=[destination], store=store, sender=Sender(settings))
    second = deliver(job_id=job_id, path=rtstruct_file, sop_instance_uid=uid,
                     destinations=[destination], store=store, sender=Sender(settings))
    assert [d.sent for d in first] == [True] and [d.sent for d in second] == [False]
    time.sleep(0.3)
    assert len(tps.received()) == 1


def test_deliver_tries_every_destination_and_reports_the_failed_one(
    settings: Settings, tps: StoreScp, rtstruct_file: Path
) -> None:
    settings = settings.model_copy(update={"send_attempts": 2, "send_backoff_s": 0.05})
    store = _store(settings)
    job_id = store.create_or_merge_for_series(series_instance_uid="1.2.3").job.id
    uid = str(pydicom.dcmread(rtstruct_file).SOPInstanceUID)
    down = Destination.parse(f"DOWN@127.0.0.1:{free_port()}")
    with pytest.raises(DestinationUnavailable, match="DOWN@"):
        deliver(job_id=job_id, path=rtstruct_file, sop_instance_uid=uid,
                destinations=[down, Destination.parse(tps.destination)],
                store=store, sender=Sender(settings))
    assert store.get(job_id).sent_destinations == [f"{tps.destination}|{uid}"]
