"""Instances that reach the listener's spool another way than a C-STORE to it: a STOW-RS
request (``POST /dicomweb/studies``) or a C-GET from the PACS on rtcontour's own association.

They are taken exactly as the C-STORE handler takes them (``service.handlers``): the same
checks (``read_instance_header``: SOP class, UIDs, modality, CT geometry and pixel module,
size), the same transfer syntaxes (``listener.SUPPORTED_TRANSFER_SYNTAXES``, compressed CT
included), written as received into the same spool, reported to the same ``SeriesTracker``
(and so the same series journal, quiet period and intake), refusals into the same list. One
STOW request or one C-GET association is one "association" of the tracker: its serial comes
from the listener's counter, and it is released when the request or the retrieve ends.

Needs the listener's ``Edge`` in this process (``rtcontour serve``); ``InstanceReceiver`` is
built from the running listener and handed to the API by ``service.serve``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.filereader import read_dataset
from pydicom.uid import UID, CTImageStorage, RTStructureSetStorage

from rtcontour.common.dicomweb import StowResult
from rtcontour.common.errors import InvalidInstance, RtcontourError
from rtcontour.service import metrics
from rtcontour.service.dicom_status import Status, store_status
from rtcontour.service.handlers import (
    _PREAMBLE,
    INSTANCE_REFUSED,
    Edge,
    encode_file_meta,
    read_instance_header,
)
from rtcontour.service.listener import (
    STRUCTURE_SET_TRANSFER_SYNTAXES,
    SUPPORTED_TRANSFER_SYNTAXES,
    ListenerHandle,
)
from rtcontour.service.spool import InstanceHeader, checked_uid

logger = logging.getLogger(__name__)

__all__ = ["InstanceReceiver", "Part10", "Sender", "read_part10"]

ACCEPTED_TRANSFER_SYNTAXES: dict[str, list[UID]] = {
    CTImageStorage: SUPPORTED_TRANSFER_SYNTAXES,
    RTStructureSetStorage: STRUCTURE_SET_TRANSFER_SYNTAXES,
}
NOT_ACCEPTED = ("rtcontour accepts CT Image Storage and RT Structure Set Storage only")


@dataclass(frozen=True)
class Part10:
    """A DICOM file's identity from its File Meta Information, and where its dataset starts."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int


def read_part10(data: bytes | memoryview) -> Part10:
    """Read the File Meta Information of a Part 10 file (PS3.10 7.1: preamble, ``DICM``, group
    0002 led by its group length); raise ``InvalidInstance`` with a sentence otherwise."""
    view = memoryview(data)
    if len(view) < 144 or bytes(view[128:132]) != b"DICM":
        raise InvalidInstance("not a DICOM Part 10 file (no DICM prefix after the preamble)")
    group, element, vr, length = struct.unpack("<HH2sH", view[132:140])
    if (group, element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise InvalidInstance("File Meta Information does not begin with its group length "
                              "(0002,0000)")
    (group_length,) = struct.unpack("<I", view[140:144])
    end = 144 + group_length
    if end > len(view):
        raise InvalidInstance("File Meta Information is longer than the file")
    try:
        meta = read_dataset(BytesIO(bytes(view[144:end])), is_implicit_VR=False,
                            is_little_endian=True)
        values = [str(meta.get(keyword, "") or "").strip("\x00 ") for keyword in
                  ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                   "TransferSyntaxUID")]
    except Exception as exc:  # pydicom raises many types on malformed input
        raise InvalidInstance(f"File Meta Information cannot be parsed: {type(exc).__name__}"
                              ) from exc
    if not all(values):
        raise InvalidInstance("File Meta Information lacks the SOP Class, SOP Instance or "
                              "Transfer Syntax UID")
    return Part10(values[0], checked_uid(values[1], "MediaStorageSOPInstanceUID"),
                  values[2], end)


@dataclass(frozen=True)
class Sender:
    """Who sent instances in place of a calling AE: an API user (STOW-RS) or the PACS (C-GET).

    ``calling_ae``: what routes match as ``calling_ae`` and the job records (the user's name,
    or the PACS's AE title); ``address``: the client's address; ``origin``: "dicomweb" for
    STOW-RS, "" for a C-GET (its job says who pulled it through ``common.pulls``).
    """

    calling_ae: str
    address: str
    origin: str
    actor: str  # who the audit names


class _Request:
    """A weak-referenceable token: one STOW request or C-GET association (its serial)."""


class InstanceReceiver:
    """Stores instances into the listener's spool and tracker (module docstring)."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    @classmethod
    def from_listener(cls, listener: ListenerHandle) -> InstanceReceiver:
        return cls(listener.edge)

    @contextmanager
    def association(self) -> Iterator[int]:
        """A serial for one request's instances; released (its series may become jobs after
        the quiet period) when the block ends, aborted if it raises."""
        token = _Request()
        serial = self.edge.serials.of(token)
        try:
            yield serial
        except BaseException:
            self.edge.tracker.association_aborted(serial)
            raise
        self.edge.tracker.association_released(serial)

    def store(self, serial: int, dataset: bytes | memoryview | BytesIO, *, sop_class_uid: str,
              sop_instance_uid: str, transfer_syntax: str, sender: Sender) -> InstanceHeader:
        """Check one encoded dataset (no file meta) and spool it as the C-STORE handler does;
        raise ``RtcontourError`` (nothing stored) for what the listener would refuse."""
        syntaxes = ACCEPTED_TRANSFER_SYNTAXES.get(sop_class_uid)
        if syntaxes is None:
            raise _NotAccepted(f"{_name(sop_class_uid)}: {NOT_ACCEPTED}")
        if transfer_syntax not in syntaxes:
            raise InvalidInstance(
                f"transfer syntax {_name(transfer_syntax)} is not accepted for "
                f"{_name(sop_class_uid)} (uncompressed, deflate, or lossless JPEG, JPEG-LS, "
                "JPEG 2000 or RLE)")
        stream = dataset if isinstance(dataset, BytesIO) else BytesIO(dataset)
        header = read_instance_header(
            stream, UID(transfer_syntax), context_sop_class=sop_class_uid,
            request_sop_class=sop_class_uid, request_sop_instance=sop_instance_uid,
            max_instance_bytes=self.edge.max_instance_bytes)
        file_meta = encode_file_meta(sop_class_uid, header.sop_instance_uid, transfer_syntax,
                                     "")
        with stream.getbuffer() as dataset_bytes:
            self.edge.spool.write(header.series_instance_uid, header.sop_instance_uid,
                                  [_PREAMBLE, file_meta, dataset_bytes])
        self.edge.tracker.instance_stored(serial, header, sender.calling_ae, "",
                                          origin=sender.origin)
        metrics.INSTANCES_RECEIVED.labels(outcome="stored").inc()
        return header

    def store_part10(self, serial: int, data: bytes, sender: Sender) -> StowResult:
        """One part of a STOW request: stored, or the Failure Reason and why (recorded in the
        refusals list and the audit as the listener records a refused instance)."""
        sop_class = sop_instance = ""
        try:
            part = read_part10(data)
            sop_class, sop_instance = part.sop_class_uid, part.sop_instance_uid
            self.store(serial, memoryview(data)[part.dataset_offset:], sop_class_uid=sop_class,
                       sop_instance_uid=sop_instance, transfer_syntax=part.transfer_syntax,
                       sender=sender)
        except RtcontourError as exc:
            status = (Status.SOP_CLASS_NOT_SUPPORTED if isinstance(exc, _NotAccepted)
                      else store_status(exc))
            self.refused(sender, status, sop_class, sop_instance, str(exc))
            return StowResult(sop_class, sop_instance, int(status), str(exc))
        except Exception:
            logger.exception("STOW-RS request #%d: instance could not be stored", serial)
            metrics.INSTANCES_RECEIVED.labels(outcome="failed").inc()
            return StowResult(sop_class, sop_instance, int(Status.PROCESSING_FAILURE),
                              "processing failure")
        return StowResult(sop_class, sop_instance)

    def refused(self, sender: Sender, status: int, sop_class: str, sop_instance: str,
                why: str) -> None:
        """Count, audit and list one refused instance (never raises)."""
        logger.warning("%s: instance refused with status 0x%04X: %s",
                       "STOW-RS" if sender.origin == "dicomweb" else "C-GET", status, why)
        metrics.INSTANCES_RECEIVED.labels(outcome="refused").inc()
        metrics.REFUSALS.labels(kind="instance").inc()
        detail: dict[str, Any] = {
            "kind": "instance", "calling_ae": sender.calling_ae[:16], "called_ae": "",
            "address": sender.address[:64], "status": int(status),
            "what": f"instance {sop_instance[:64] or '(unreadable)'} "
                    f"({_name(sop_class) if sop_class else 'no SOP Class'}"
                    f"{', by DICOMweb' if sender.origin == 'dicomweb' else ''})",
            "why": why,
        }
        for sink, args in ((self.edge.audit, (INSTANCE_REFUSED, {**detail,
                                                                 "actor": sender.actor})),
                           (self.edge.refused, (detail,))):
            if sink is None:
                continue
            try:
                sink(*args)  # type: ignore[operator]
            except Exception:
                logger.exception("refusal could not be recorded")


class _NotAccepted(InvalidInstance):
    """A SOP class rtcontour does not take (answered 0x0122, as a refused context would be)."""


def _name(uid: str) -> str:
    name = UID(uid).name
    return name if name != uid else uid[:64]
