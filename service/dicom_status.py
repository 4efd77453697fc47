"""DICOM status codes and association-rejection reasons used by rtcontour, named once.

``store_status(exc)`` is the one place where domain errors become C-STORE statuses
(PS3.4 Annex B.2.3, PS3.7 Annex C).
"""

from __future__ import annotations

from enum import IntEnum

from rtcontour.common.errors import (
    InsufficientStorage,
    InvalidInstance,
    RtcontourError,
    SopClassMismatch,
)


class Status(IntEnum):
    """DIMSE status codes (C-ECHO, C-STORE) that the listener answers."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # refused: SOP Class not supported
    PROCESSING_FAILURE = 0x0110
    OUT_OF_RESOURCES = 0xA700  # refused: out of resources
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900  # error
    CANNOT_UNDERSTAND = 0xC000  # error: cannot understand


class RejectResult(IntEnum):
    """A-ASSOCIATE-RJ Result."""

    PERMANENT = 0x01
    TRANSIENT = 0x02


class RejectSource(IntEnum):
    """A-ASSOCIATE-RJ Source."""

    SERVICE_USER = 0x01
    SERVICE_PROVIDER_ACSE = 0x02
    SERVICE_PROVIDER_PRESENTATION = 0x03


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ Reason/Diag. when the source is the service user."""

    NO_REASON_GIVEN = 0x01
    CALLING_AE_NOT_RECOGNISED = 0x03
    CALLED_AE_NOT_RECOGNISED = 0x07


REJECT_REASON_TEXT: dict[int, str] = {
    RejectReason.NO_REASON_GIVEN: "no reason given",
    RejectReason.CALLING_AE_NOT_RECOGNISED: "calling AE title not recognised",
    RejectReason.CALLED_AE_NOT_RECOGNISED: "called AE title not recognised",
}


def store_status(exc: RtcontourError) -> Status:
    """The C-STORE failure status for a domain error raised while storing an instance."""
    if isinstance(exc, InsufficientStorage):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, SopClassMismatch):
        return Status.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidInstance):
        return Status.CANNOT_UNDERSTAND
    return Status.PROCESSING_FAILURE
