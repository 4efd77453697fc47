"""pynetdicom event handlers of the listener: small typed functions that check, spool, return.

Every handler takes the pynetdicom ``Event`` and the listener's ``Edge`` (what the handlers
share: spool, series tracker, association serials, limits, known peers, audit). A C-STORE
handler never decodes pixel data: it reads the dozen attributes it checks from the encoded
dataset, writes the bytes as received (preamble, file meta, dataset) and returns a status.
Domain errors become DICOM statuses in ``service.dicom_status.store_status`` only.
"""

from __future__ import annotations

import ipaddress
import itertools
import logging
import struct
import threading
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RTStructureSetStorage,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_RELEASE

from rtcontour.common.errors import (
    InstanceTooLarge,
    InvalidInstance,
    RtcontourError,
    SopClassMismatch,
)
from rtcontour.service import metrics
from rtcontour.service.dicom_status import (
    REJECT_REASON_TEXT,
    RejectReason,
    RejectResult,
    RejectSource,
    Status,
    store_status,
)
from rtcontour.service.spool import InstanceHeader, InstanceSpool, SeriesTracker, checked_uid

logger = logging.getLogger(__name__)

AuditCallable = Callable[[str, dict[str, Any]], None]
ASSOCIATION_REJECTED = "dicom.association_rejected"  # common.audit.ASSOCIATION_REJECTED
CONTEXT_REFUSED = "dicom.context_refused"  # common.audit.CONTEXT_REFUSED
INSTANCE_REFUSED = "dicom.instance_refused"  # common.audit.INSTANCE_REFUSED
SERIES_REFUSED = "dicom.series_refused"  # common.audit.SERIES_REFUSED


def _note_refusal(
    edge: Edge, event_name: str, detail: dict[str, Any],
    audit_detail: dict[str, Any] | None = None,
) -> None:
    """Audit a refusal (``audit_detail``, default ``detail``) and keep it in the refusals list
    (never raises into the association)."""
    metrics.REFUSALS.labels(kind=detail["kind"]).inc()
    audited = {**(audit_detail if audit_detail is not None else detail),
               "actor": "dicom-listener"}  # common.audit.make_recorder: who did it
    for sink, args in ((edge.audit, (event_name, audited)), (edge.refused, (detail,))):
        if sink is None:
            continue
        try:
            sink(*args)  # type: ignore[operator]
        except Exception:
            logger.exception("refusal %s could not be recorded", event_name)


def _peer(event: Event) -> dict[str, Any]:
    primitive = event.assoc.requestor.primitive
    return {
        "calling_ae": str(getattr(primitive, "calling_ae_title", "") or "").strip(),
        "called_ae": str(getattr(primitive, "called_ae_title", "") or "").strip(),
        "address": str(event.assoc.requestor.address),
    }

MAX_IMAGE_DIMENSION = 4096  # rows or columns; CT images are at most 1024 in practice
_PREAMBLE = b"\x00" * 128 + b"DICM"

_REQUIRED = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "FrameOfReferenceUID",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "PixelData",
)
# What a structure set must carry to be accepted (its contours are read by the worker).
_REQUIRED_STRUCTURE_SET = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "ReferencedFrameOfReferenceSequence",
    "StructureSetROISequence",
)
_READ_STRUCTURE_SET_TAGS: list[BaseTag | int] = [
    Tag(keyword)
    for keyword in ("SpecificCharacterSet", *_REQUIRED_STRUCTURE_SET, "SeriesDescription")
]
ACCEPTED_SOP_CLASSES = (CTImageStorage, RTStructureSetStorage)
# Storage classes a TPS or PACS commonly sends that rtcontour does not process. Their contexts
# are accepted only so that each C-STORE can be refused with 0x0122 naming what was sent (SOP
# Class, Modality, Series UID read from the dataset, never stored): a refused context tells
# nothing, since storescu proposes every class it knows, alphabetically.
EXPLAINED_SOP_CLASSES = tuple(UID(uid) for uid in (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.128",  # Positron Emission Tomography Image Storage
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image Storage
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image Storage
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image Storage
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose Storage
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan Storage
    "1.2.840.10008.5.1.4.1.1.481.8",  # RT Ion Plan Storage
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration Storage
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation Storage
))
_READ_REFUSED_TAGS: list[BaseTag | int] = [
    Tag(keyword) for keyword in ("SOPClassUID", "SOPInstanceUID", "Modality",
                                 "SeriesInstanceUID")
]

_READ_TAGS: list[BaseTag | int] = [
    Tag(keyword)
    for keyword in (
        "SpecificCharacterSet",
        *_REQUIRED,
        "SeriesDescription",
        "SamplesPerPixel",
        "BitsAllocated",
    )
]


@dataclass(frozen=True)
class KnownPeer:
    """An allowed calling AE title, optionally bound to one IP address."""

    ae_title: str
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> KnownPeer:
        ae_title, _, address = text.partition("@")
        return cls(ae_title.strip(), address.strip() or None)

    def matches(self, ae_title: str, address: str) -> bool:
        if self.ae_title != ae_title.strip():
            return False
        return self.address is None or _normalised_ip(self.address) == _normalised_ip(address)


def _normalised_ip(text: str) -> str:
    """An IP address in canonical form (IPv4-mapped IPv6 as IPv4); other text unchanged."""
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return text.strip()
    mapped = getattr(address, "ipv4_mapped", None)
    return str(mapped or address)


class AssociationSerials:
    """Serial numbers for associations (``id()`` values are reused; these never are)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self._serials: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()

    def of(self, assoc: object) -> int:
        with self._lock:
            serial = self._serials.get(assoc)
            if serial is None:
                serial = self._serials[assoc] = next(self._counter)
            return serial


@dataclass(frozen=True)
class RefusedSeries:
    """What an instance refused for its SOP Class was, as read from its dataset (UIDs and the
    modality: nothing that identifies the patient)."""

    sop_class_uid: str
    modality: str
    series_instance_uid: str | None

    @property
    def sop_class_name(self) -> str:
        name = UID(self.sop_class_uid).name if self.sop_class_uid else ""
        return name or f"SOP Class {self.sop_class_uid or 'unknown'}"


@dataclass
class Edge:
    """What the listener's handlers share."""

    ae_title: str
    spool: InstanceSpool
    tracker: SeriesTracker
    max_instance_bytes: int
    known_peers: Sequence[KnownPeer] = ()
    audit: AuditCallable | None = None
    accept_any_called_ae: bool = False  # RTCONTOUR_ACCEPT_ANY_CALLED_AE
    refused: Callable[[dict[str, Any]], None] | None = None  # common.refusals recorder
    # Per association serial: the storage contexts refused, and whether anything was stored;
    # an association that stored nothing after refusing contexts becomes one refusal.
    refused_contexts: dict[int, list[str]] = field(default_factory=dict)
    # Per association serial: instances refused for their SOP Class, counted per series
    # (one refusal row per series when the association ends, not one per slice).
    refused_series: dict[int, dict[RefusedSeries, int]] = field(default_factory=dict)
    serials: AssociationSerials = field(default_factory=AssociationSerials)
    rejected: weakref.WeakSet[object] = field(default_factory=weakref.WeakSet)


# -- instance checks ------------------------------------------------------------------------
def _decode_stream(dataset: BytesIO, transfer_syntax: UID, limit: int) -> BytesIO:
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        try:
            inflated = inflater.decompress(dataset.getvalue(), limit + 1)
        except zlib.error as exc:
            raise InvalidInstance(f"deflated dataset cannot be inflated: {exc}") from exc
        if len(inflated) > limit:
            raise InstanceTooLarge(f"inflated dataset exceeds {limit} bytes")
        return BytesIO(inflated)
    dataset.seek(0)
    return dataset


def _is_empty(ds: Dataset, keyword: str) -> bool:
    """Absent, or present with no value (read without converting the raw element)."""
    tag = Tag(keyword)
    if tag not in ds:
        return True
    raw = ds.get_item(tag)
    value = getattr(raw, "value", None)
    return value is None or len(value) == 0


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element with a 2-byte length (even-padded value)."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The File Meta Information group (PS3.10 7.1) as bytes, encoded directly (pydicom's
    writer costs more than the rest of the store handler); the values are validated UIDs and
    an AE title."""
    body = b"".join(
        (
            struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
            _element(0x00020002, b"UI", _padded(sop_class_uid, b"\x00")),
            _element(0x00020003, b"UI", _padded(sop_instance_uid, b"\x00")),
            _element(0x00020010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(0x00020012, b"UI", _padded(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _element(0x00020013, b"SH", _padded(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
            _element(0x00020016, b"AE", _padded(source_ae, b" ")) if source_ae else b"",
        )
    )
    return struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _number_list(ds: Dataset, keyword: str, count: int) -> list[float]:
    value = ds[keyword].value
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError) as exc:
        raise InvalidInstance(f"{keyword} is not numeric") from exc
    if len(numbers) != count or not all(abs(n) < 1e9 for n in numbers):
        raise InvalidInstance(f"{keyword} must hold {count} finite numbers")
    return numbers


def _positive_int(ds: Dataset, keyword: str, maximum: int) -> int:
    value = ds[keyword].value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise InvalidInstance(f"{keyword} {value!r} is not an integer in 1..{maximum}")
    return value


def read_instance_header(
    dataset: bytes | BytesIO,
    transfer_syntax: UID,
    *,
    context_sop_class: str,
    request_sop_class: str,
    request_sop_instance: str,
    max_instance_bytes: int,
) -> InstanceHeader:
    """Check an encoded C-STORE dataset and return the attributes the listener needs.

    Raises ``InstanceTooLarge``, ``SopClassMismatch`` or ``InvalidInstance`` (a sentence
    naming the attribute) for anything that must not be accepted.
    """
    if isinstance(dataset, bytes):
        dataset = BytesIO(dataset)
    size = dataset.getbuffer().nbytes
    if size > max_instance_bytes:
        raise InstanceTooLarge(f"instance of {size} bytes exceeds {max_instance_bytes}")
    if context_sop_class not in ACCEPTED_SOP_CLASSES or request_sop_class != context_sop_class:
        raise SopClassMismatch(
            f"SOP Class {request_sop_class} does not match the context {context_sop_class}"
        )
    stream = _decode_stream(dataset, transfer_syntax, max_instance_bytes)
    # A structure set's contours are read (tolerantly) by the worker: here only its identity.
    modality, tags, required = (
        ("RTSTRUCT", _READ_STRUCTURE_SET_TAGS, _REQUIRED_STRUCTURE_SET)
        if context_sop_class == RTStructureSetStorage else ("CT", _READ_TAGS, _REQUIRED)
    )
    try:
        ds = read_dataset(
            stream,
            is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != ExplicitVRBigEndian,
            specific_tags=tags,
        )
        missing = [kw for kw in required if _is_empty(ds, kw)]
        if missing:
            raise InvalidInstance(f"required attributes missing or empty: {', '.join(missing)}")
        if str(ds.SOPClassUID) != request_sop_class:
            raise SopClassMismatch(f"dataset SOP Class {ds.SOPClassUID} differs from the request")
        sop_instance_uid = checked_uid(ds.SOPInstanceUID, "SOPInstanceUID")
        if sop_instance_uid != request_sop_instance.strip("\x00 "):
            raise InvalidInstance("SOPInstanceUID differs from the request's")
        if str(ds.Modality).strip() != modality:
            raise InvalidInstance(f"Modality {str(ds.Modality)[:16]!r} is not {modality}")
        if modality == "CT":
            _check_ct_image(ds, transfer_syntax)
        description = ds.get("SeriesDescription", "") or ""
        return InstanceHeader(
            sop_instance_uid=sop_instance_uid,
            series_instance_uid=checked_uid(ds.SeriesInstanceUID, "SeriesInstanceUID"),
            study_instance_uid=checked_uid(ds.StudyInstanceUID, "StudyInstanceUID"),
            modality=modality,
            series_description=str(description)[:64],
        )
    except RtcontourError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input
        logger.debug("parse failure", exc_info=True)
        raise InvalidInstance(f"dataset cannot be parsed: {type(exc).__name__}") from exc


def read_refused_identity(
    dataset: BytesIO, transfer_syntax: UID, *, context_sop_class: str, max_instance_bytes: int
) -> RefusedSeries:
    """SOP Class, Modality and Series UID of an instance refused for its class, from its
    encoded dataset (four attributes, never the pixels); what cannot be read is left out
    (the context's class, no modality, no series) rather than raised."""
    sop_class, modality, series_uid = context_sop_class, "", None
    try:
        ds = read_dataset(
            _decode_stream(dataset, transfer_syntax, max_instance_bytes),
            is_implicit_VR=transfer_syntax == ImplicitVRLittleEndian,
            is_little_endian=transfer_syntax != ExplicitVRBigEndian,
            specific_tags=_READ_REFUSED_TAGS,
        )
        sop_class = checked_uid(ds.get("SOPClassUID", "") or context_sop_class, "SOPClassUID")
        modality = str(ds.get("Modality", "") or "").strip()[:16]
        if ds.get("SeriesInstanceUID"):
            series_uid = checked_uid(ds.SeriesInstanceUID, "SeriesInstanceUID")
    except Exception:  # pydicom raises many types on malformed input; the refusal stands
        logger.debug("refused instance unreadable", exc_info=True)
    return RefusedSeries(sop_class, modality, series_uid)


def _check_ct_image(ds: Dataset, transfer_syntax: UID) -> None:
    """The geometry and pixel module of a CT image (PS3.3 C.8.2.1: one sample, 16 bits)."""
    checked_uid(ds.FrameOfReferenceUID, "FrameOfReferenceUID")
    _number_list(ds, "ImagePositionPatient", 3)
    _number_list(ds, "ImageOrientationPatient", 6)
    if any(s <= 0 for s in _number_list(ds, "PixelSpacing", 2)):
        raise InvalidInstance("PixelSpacing must be positive")
    rows = _positive_int(ds, "Rows", MAX_IMAGE_DIMENSION)
    columns = _positive_int(ds, "Columns", MAX_IMAGE_DIMENSION)
    pixel_data = ds["PixelData"]
    samples = ds.get("SamplesPerPixel", 1)
    if samples != 1:
        raise InvalidInstance(f"SamplesPerPixel {samples!r} is not 1, as a CT image has")
    bits = ds.get("BitsAllocated", 16)
    if bits != 16:
        raise InvalidInstance(f"BitsAllocated {bits!r} is not 16, as a CT image has")
    if not UID(transfer_syntax).is_encapsulated:
        expected = rows * columns * 2
        length = len(pixel_data.value)
        # One frame; a native value is padded to even length (odd byte counts cannot occur
        # for 16-bit pixels, so the length must be exact).
        if length != expected:
            raise InvalidInstance(
                f"PixelData holds {length} bytes; Rows x Columns x BitsAllocated / 8 is "
                f"{expected}"
            )


# -- handlers ---------------------------------------------------------------------------------
def handle_echo(event: Event, edge: Edge) -> int:
    """C-ECHO: always success."""
    return Status.SUCCESS


def handle_store(event: Event, edge: Edge) -> int:
    """C-STORE: check the instance, spool it atomically, tell the tracker; return a status."""
    serial = edge.serials.of(event.assoc)
    request = cast(C_STORE, event.request)
    context = event.context
    try:
        dataset = request.DataSet
        if not isinstance(dataset, BytesIO):
            raise InvalidInstance("C-STORE request without a dataset")
        transfer_syntax = UID(context.transfer_syntax)
        if str(context.abstract_syntax) in EXPLAINED_SOP_CLASSES:
            return _refuse_unprocessed_class(event, edge, serial, dataset, transfer_syntax)
        header = read_instance_header(
            dataset,
            transfer_syntax,
            context_sop_class=str(context.abstract_syntax),
            request_sop_class=str(request.AffectedSOPClassUID),
            request_sop_instance=str(request.AffectedSOPInstanceUID),
            max_instance_bytes=edge.max_instance_bytes,
        )
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        file_meta = encode_file_meta(
            str(context.abstract_syntax), header.sop_instance_uid, transfer_syntax, calling_ae
        )
        with dataset.getbuffer() as dataset_bytes:
            edge.spool.write(
                header.series_instance_uid,
                header.sop_instance_uid,
                [_PREAMBLE, file_meta, dataset_bytes],
            )
        called_ae = str(
            getattr(event.assoc.requestor.primitive, "called_ae_title", "") or ""
        ).strip()
        edge.tracker.instance_stored(serial, header, calling_ae, called_ae)
    except RtcontourError as exc:
        status = store_status(exc)
        logger.warning(
            "association #%d: instance refused with status 0x%04X: %s", serial, status, exc
        )
        metrics.INSTANCES_RECEIVED.labels(outcome="refused").inc()
        sop_class = str(request.AffectedSOPClassUID or "")
        _note_refusal(edge, INSTANCE_REFUSED, {
            **_peer(event), "kind": "instance", "status": int(status),
            "what": f"instance {str(request.AffectedSOPInstanceUID or '')[:64]} "
                    f"({UID(sop_class).name if sop_class else 'no SOP Class'})",
            "why": str(exc),
        })
        return status
    except Exception:
        logger.exception("association #%d: instance could not be stored", serial)
        metrics.INSTANCES_RECEIVED.labels(outcome="failed").inc()
        return Status.PROCESSING_FAILURE
    metrics.INSTANCES_RECEIVED.labels(outcome="stored").inc()
    edge.refused_contexts.pop(serial, None)  # something was stored: not an unused association
    return Status.SUCCESS


def _refuse_unprocessed_class(
    event: Event, edge: Edge, serial: int, dataset: BytesIO, transfer_syntax: UID
) -> int:
    """An instance of a class we accept only to explain the refusal (an MR image, say):
    nothing is written; counted per series for the refusal noted when the association ends."""
    refused = read_refused_identity(
        dataset, transfer_syntax, context_sop_class=str(event.context.abstract_syntax),
        max_instance_bytes=edge.max_instance_bytes)
    series = edge.refused_series.setdefault(serial, {})
    if refused not in series:
        logger.warning("association #%d: %s (modality %s, series %s) refused with 0x%04X: "
                       "not contoured", serial, refused.sop_class_name,
                       refused.modality or "unknown", refused.series_instance_uid or "unknown",
                       Status.SOP_CLASS_NOT_SUPPORTED)
    series[refused] = series.get(refused, 0) + 1
    edge.refused_contexts.pop(serial, None)  # explained by the series refused
    metrics.INSTANCES_RECEIVED.labels(outcome="refused").inc()
    return Status.SOP_CLASS_NOT_SUPPORTED


def _note_refused_series(event: Event, edge: Edge) -> None:
    """One refusal per series whose instances were refused for their SOP Class."""
    refused_series = edge.refused_series.pop(edge.serials.of(event.assoc), None)
    for refused, count in (refused_series or {}).items():
        described = ", ".join(part for part in (
            refused.sop_class_name,
            f"modality {refused.modality}" if refused.modality else "",
            f"series {refused.series_instance_uid}" if refused.series_instance_uid else "",
        ) if part)
        _note_refusal(edge, SERIES_REFUSED, {
            **_peer(event), "kind": "series", "status": int(Status.SOP_CLASS_NOT_SUPPORTED),
            "series_instance_uid": refused.series_instance_uid,
            "what": f"{described}: {count} instance{'s' if count != 1 else ''}",
            "why": f"{refused.sop_class_name} is not contoured: rtcontour takes CT Image "
                   "Storage and RT Structure Set Storage only; each instance was answered "
                   "0x0122 (SOP Class not supported) and nothing was stored",
        })


def _reject(event: Event, edge: Edge, reason: RejectReason) -> None:
    assoc = event.assoc
    _audit_rejection(event, edge, REJECT_REASON_TEXT[reason])
    edge.rejected.add(assoc)
    assoc.acse.send_reject(RejectResult.PERMANENT, RejectSource.SERVICE_USER, reason)
    assoc.kill()


def _audit_rejection(event: Event, edge: Edge, reason: str) -> None:
    requestor = event.assoc.requestor
    primitive = requestor.primitive
    detail = {
        "calling_ae": str(getattr(primitive, "calling_ae_title", "")).strip(),
        "called_ae": str(getattr(primitive, "called_ae_title", "")).strip(),
        "address": str(requestor.address),
        "reason": reason,
    }
    logger.warning("association rejected: %s", detail)
    metrics.ASSOCIATIONS_REJECTED.labels(reason=reason).inc()
    _note_refusal(edge, ASSOCIATION_REJECTED, {
        "kind": "association", "calling_ae": detail["calling_ae"],
        "called_ae": detail["called_ae"], "address": detail["address"],
        "what": "association", "why": reason,
    }, audit_detail=detail)


def handle_requested(event: Event, edge: Edge) -> None:
    """A-ASSOCIATE-RQ: refuse a called AE title other than ours (unless explicitly allowed)
    and, with known peers configured, unknown calling AE titles; each refusal audited."""
    primitive = cast(A_ASSOCIATE, event.assoc.requestor.primitive)
    calling = str(primitive.calling_ae_title).strip()
    called = str(primitive.called_ae_title).strip()
    address = str(event.assoc.requestor.address)
    if edge.known_peers and not any(peer.matches(calling, address) for peer in edge.known_peers):
        _reject(event, edge, RejectReason.CALLING_AE_NOT_RECOGNISED)
    elif called != edge.ae_title and not edge.accept_any_called_ae:
        _reject(event, edge, RejectReason.CALLED_AE_NOT_RECOGNISED)


def handle_rejected(event: Event, edge: Edge) -> None:
    """A rejection pynetdicom made itself (e.g. too many associations): audit it."""
    if event.assoc in edge.rejected:
        return
    primitive = event.assoc.acceptor.primitive
    source = getattr(primitive, "result_source", None)
    diagnostic = getattr(primitive, "diagnostic", None)
    if source == RejectSource.SERVICE_PROVIDER_PRESENTATION and diagnostic == 0x02:
        reason = "local limit exceeded (maximum associations)"
    else:
        reason = f"rejected (source {source}, diagnostic {diagnostic})"
    _audit_rejection(event, edge, reason)


def handle_established(event: Event, edge: Edge) -> None:
    edge.serials.of(event.assoc)
    metrics.ASSOCIATIONS.inc()
    # Contexts we do not accept leave no C-STORE to refuse, nor do those accepted only to
    # explain a refusal if nothing is sent on them: remember them (the explained ones first:
    # storescu proposes every class it knows, alphabetically), and if the association ends
    # having stored nothing, that is a refusal to show.
    explained = sorted({UID(str(context.abstract_syntax)).name
                        for context in getattr(event.assoc, "accepted_contexts", []) or []
                        if str(context.abstract_syntax) in EXPLAINED_SOP_CLASSES})
    rejected = sorted({UID(str(context.abstract_syntax)).name
                       for context in getattr(event.assoc, "rejected_contexts", []) or []}
                      - set(explained))
    if explained or rejected:
        edge.refused_contexts[edge.serials.of(event.assoc)] = explained + rejected


def _note_unused_association(event: Event, edge: Edge) -> None:
    names = edge.refused_contexts.pop(edge.serials.of(event.assoc), None)
    if names is None:
        return
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    _note_refusal(edge, CONTEXT_REFUSED, {
        **_peer(event), "kind": "context", "what": shown,
        "why": "nothing stored: rtcontour takes CT Image Storage and RT Structure Set "
               "Storage only (the classes the sender proposed are listed, not what it holds)",
    })


def handle_acse_received(event: Event, edge: Edge) -> None:
    """A-RELEASE-RQ received: the sender has every answer it wanted. Journalled as released
    now, before pynetdicom sends the reply (EVT_RELEASED comes only after it), so that no
    crash can forget a release the TPS saw; a crash before the reply at worst makes the TPS
    send again (a merge), never a loss."""
    primitive = getattr(event, "primitive", None)
    if isinstance(primitive, A_RELEASE) and primitive.result is None:
        edge.tracker.association_released(edge.serials.of(event.assoc))


def handle_released(event: Event, edge: Edge) -> None:
    _note_refused_series(event, edge)
    _note_unused_association(event, edge)
    edge.tracker.association_released(edge.serials.of(event.assoc))  # already, as a rule


def handle_aborted(event: Event, edge: Edge) -> None:
    _note_refused_series(event, edge)
    _note_unused_association(event, edge)
    serial = edge.serials.of(event.assoc)
    logger.info("association #%d aborted", serial)
    edge.tracker.association_aborted(serial)


def handle_conn_close(event: Event, edge: Edge) -> None:
    edge.tracker.connection_closed(edge.serials.of(event.assoc))


def handle_dimse_received(event: Event, edge: Edge) -> None:
    """A complete DIMSE message arrived: the connection's receive budget starts again."""
    transport = event.assoc.dul.socket
    reset = getattr(getattr(transport, "socket", None), "reset_budget", None)
    if reset is not None:
        reset()
