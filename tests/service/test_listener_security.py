"""Known peers, association limits and timeouts of the listener (issue 6, DICOM edge)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from rtcontour.service.dicom_status import Status
from rtcontour.service.handlers import KnownPeer
from tests.phantoms import ct_datasets
from tests.service.conftest import (
    requires_dcmtk,
    run_echoscu,
    run_storescu,
    send_files_with_pynetdicom,
)

pytestmark = requires_dcmtk
REJECTED = "dicom.association_rejected"


def test_store_rejects_association_from_unknown_calling_ae(listener_factory, ct_series):
    listener = listener_factory(known_peers=["TPS_A", "TPS_B"])
    run = run_storescu(listener.port, ct_series(n_slices=1), calling_ae="INTRUDER")
    assert "Association Rejected" in run.output, run.output
    assert "Rejected Permanent" in run.output and "Service User" in run.output
    assert "Calling AE Title Not Recognized" in run.output
    assert listener.spooled_files() == []
    [(event, detail)] = listener.audit_events
    assert event == REJECTED
    assert detail["calling_ae"] == "INTRUDER" and detail["address"] == "127.0.0.1"
    assert detail["reason"] == "calling AE title not recognised"


def test_known_calling_ae_is_accepted(listener_factory, ct_series):
    listener = listener_factory(known_peers=["TPS_A", "TPS_B@127.0.0.1"])
    assert run_echoscu(listener.port, calling_ae="TPS_A").returncode == 0
    run = run_storescu(listener.port, ct_series(n_slices=2), calling_ae="TPS_B")
    assert run.status_list == [Status.SUCCESS] * 2, run.output
    assert listener.audit_events == []


def test_known_ae_title_from_another_address_is_rejected(listener_factory):
    listener = listener_factory(known_peers=["TPS_A@10.1.2.3"])
    run = run_echoscu(listener.port, calling_ae="TPS_A")
    assert "Calling AE Title Not Recognized" in run.output, run.output
    assert listener.audit_events[0][1]["address"] == "127.0.0.1"


def test_wrong_called_ae_title_is_rejected(listener_factory):
    listener = listener_factory(known_peers=["TPS_A"])
    run = run_echoscu(listener.port, calling_ae="TPS_A", called_ae="SOMEONE_ELSE")
    assert "Called AE Title Not Recognized" in run.output, run.output
    [(event, detail)] = listener.audit_events
    assert detail["called_ae"] == "SOMEONE_ELSE"
    assert detail["reason"] == "called AE title not recognised"


def test_wrong_called_ae_title_is_rejected_without_known_peers_too(listener_factory):
    listener = listener_factory()
    run = run_echoscu(listener.port, calling_ae="ANY", called_ae="SOMEONE_ELSE")
    assert "Called AE Title Not Recognized" in run.output, run.output
    [(event, detail)] = listener.audit_events
    assert event == "dicom.association_rejected" and detail["called_ae"] == "SOMEONE_ELSE"
    assert run_echoscu(listener.port, calling_ae="ANY").returncode == 0  # our own title


def test_any_called_ae_title_only_when_explicitly_allowed(listener_factory):
    listener = listener_factory(accept_any_called_ae=True)
    run = run_echoscu(listener.port, calling_ae="ANY", called_ae="SOMEONE_ELSE")
    assert run.returncode == 0, run.output
    assert listener.audit_events == []


def test_only_verification_ct_and_structure_set_storage_are_accepted(listener_factory):
    listener = listener_factory()
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.4")  # MR Image Storage
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.3")  # RT Structure Set Storage
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="RTCONTOUR")
    try:
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        # Structure sets come back approved from the TPS (dose prediction, QA); MR is
        # accepted as a context only so that its C-STOREs are refused naming what they are.
        assert accepted == {str(Verification), "1.2.840.10008.5.1.4.1.1.481.3",
                            "1.2.840.10008.5.1.4.1.1.4"}
        assert assoc.send_c_store(_mr_instance()).Status == 0x0122  # SOP Class not supported
    finally:
        assoc.release()
    assert listener.spooled_files() == []


def _mr_instance() -> Dataset:
    dataset = ct_datasets(np.zeros((1, 8, 8), np.float32), series_uid=generate_uid())[0]
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    dataset.Modality = "MR"
    return dataset


def test_associations_beyond_the_maximum_are_rejected_and_audited(listener_factory):
    listener = listener_factory(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    holder = ae.associate("127.0.0.1", listener.port, ae_title="RTCONTOUR")
    assert holder.is_established
    try:
        run = run_echoscu(listener.port)
        assert "Association Rejected" in run.output and "Transient" in run.output, run.output
    finally:
        holder.release()
    assert run_echoscu(listener.port).returncode == 0
    assert [d["reason"] for _, d in listener.audit_events] == [
        "local limit exceeded (maximum associations)"
    ]


def test_peer_that_connects_and_says_nothing_is_dropped_within_the_timeout(listener_factory):
    listener = listener_factory(acse_timeout_s=1.0, network_timeout_s=1.0)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=10) as silent:
        assert silent.recv(1024) == b""  # the listener closed the connection
    assert time.monotonic() - started < 3.0
    assert run_echoscu(listener.port).returncode == 0


def test_idle_established_association_is_aborted_after_the_network_timeout(listener_factory):
    listener = listener_factory(network_timeout_s=1.0)
    ae = AE(ae_title="IDLER")
    ae.add_requested_context(Verification)
    ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="RTCONTOUR")
    assert assoc.is_established
    deadline = time.monotonic() + 5
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.05)
    assert assoc.is_aborted


def test_silent_peers_do_not_block_others(listener_factory):
    listener = listener_factory(acse_timeout_s=2.0, max_associations=20)
    silent = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(5)]
    try:
        result: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: result.update(code=run_echoscu(listener.port).returncode)
        )
        thread.start()
        thread.join(5)
        assert result == {"code": 0}
    finally:
        for connection in silent:
            connection.close()


def test_message_far_beyond_the_size_cap_is_cut_off_before_it_is_buffered(
    listener_factory, ct_series, caplog
):
    listener = listener_factory(max_instance_bytes=4000)
    huge = ct_series(n_slices=1, rows=1024, columns=1024)  # 2 MiB: beyond cap + 1 MiB margin
    statuses = send_files_with_pynetdicom(listener.port, huge)
    assert statuses == [None]  # no response: the association was aborted mid-message
    assert "without completing a message" in caplog.text
    assert listener.spooled_files() == []
    assert run_echoscu(listener.port).returncode == 0
    small = ct_series(n_slices=1, rows=8, columns=8)
    assert send_files_with_pynetdicom(listener.port, small) == [Status.SUCCESS]


@pytest.mark.parametrize(
    "peer, calling_ae, address, expected",
    [
        ("TPS", "TPS", "10.1.1.1", True),
        ("TPS@127.0.0.1", "TPS", "::ffff:127.0.0.1", True),
        ("TPS@::1", "TPS", "0:0:0:0:0:0:0:1", True),
        ("TPS@127.0.0.1", "TPS", "10.0.0.1", False),
        ("TPS@127.0.0.1", "TPX", "127.0.0.1", False),
    ],
    ids=["any-address", "ipv4-mapped", "ipv6-forms", "other-address", "other-title"],
)
def test_known_peer_matching(peer, calling_ae, address, expected):
    assert KnownPeer.parse(peer).matches(calling_ae, address) is expected
