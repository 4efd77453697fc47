"""Pull a CT series from the PACS and contour it as if the TPS had pushed it.

``POST /api/pull`` and ``rtcontour pull`` (``service.pull_cli``) share ``Puller``:

1. C-FIND the configured PACS (``RTCONTOUR_PACS=AET@host:port``, Study Root): the studies of
   the patient ID / accession number / study UID given, then their series (or the one series
   UID given).
2. Pick the CT series a route would take: each CT series is decided by the routing rules as
   its arrival will be (calling AE: the PACS's AE title, which sends it; the attributes the
   C-FIND returned). Exactly one contoured series is pulled; none, or several that no route
   decides between, is a ``PullError`` whose sentence says so (and lists the candidates).
3. Write a pull row (``common.pulls``: who asked, which series), then retrieve: C-MOVE to our
   own AE title (the PACS sends the instances to the listener like any C-STORE), or C-GET
   (``RTCONTOUR_PACS_RETRIEVE=get``: the instances come back on our association and go into
   the in-process listener's spool through ``service.ingest``). The intake makes the series a
   job after the quiet period and, finding the pull row, records that it was pulled and by
   whom.

Logs name pull ids and UIDs, never the patient ID or accession number a user typed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, RTStructureSetStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy import Engine

from rtcontour.common import audit
from rtcontour.common.errors import RtcontourError, SopClassMismatch
from rtcontour.common.pulls import Pull, PullStore
from rtcontour.common.routes import (
    RouteDecision,
    RoutingTable,
    match_keywords,
    series_attributes,
)
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.tls import client_ssl_context
from rtcontour.service.dicom_status import Status, store_status
from rtcontour.service.ingest import InstanceReceiver, Sender
from rtcontour.service.listener import STRUCTURE_SET_TRANSFER_SYNTAXES, SUPPORTED_TRANSFER_SYNTAXES
from rtcontour.service.spool import checked_uid

logger = logging.getLogger(__name__)

__all__ = [
    "Ambiguous", "NothingMatches", "PacsUnavailable", "PullError", "PullQuery", "Puller",
    "SeriesMatch", "choose_series",
]

PULL_REQUESTED = "pull.requested"
PULL_RETRIEVED = "pull.retrieved"
PULL_FAILED = "pull.failed"
MAX_STUDIES = 100  # a patient ID matching more is answered with a sentence, not 100 C-FINDs
_PENDING = (0xFF00, 0xFF01)
_WILDCARDS = set("*?\\")


class PullError(RtcontourError):
    """A pull that cannot go on; the sentence is shown to the user who asked."""


class PullNotConfigured(PullError):  # noqa: N818 - domain name
    """No PACS configured (or C-GET without an in-process listener)."""


class InvalidQuery(PullError):  # noqa: N818
    """The query names nothing, or holds a wildcard or an invalid UID."""


class NothingMatches(PullError):  # noqa: N818
    """The PACS holds no CT series a route would contour for the query."""


class Ambiguous(PullError):  # noqa: N818
    """Several CT series match and the routes would contour each: the user must pick one."""


class PacsUnavailable(PullError):  # noqa: N818
    """The PACS could not be reached, refused us, or failed the query or retrieve."""


@dataclass(frozen=True)
class PullQuery:
    """What a user asks for: a patient ID and/or an accession number, or a study / series UID
    (each given one must match)."""

    patient_id: str | None = None
    accession_number: str | None = None
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None

    def __post_init__(self) -> None:
        for name in ("patient_id", "accession_number", "study_instance_uid",
                     "series_instance_uid"):
            value = getattr(self, name)
            object.__setattr__(self, name, value.strip() if value and value.strip() else None)
        if not any(self.keys()):
            raise InvalidQuery("say what to pull: a patient ID, an accession number, a study "
                               "UID or a series UID")
        for name, limit in (("patient_id", 64), ("accession_number", 16)):
            value = getattr(self, name)
            if value is not None and (len(value) > limit or _WILDCARDS & set(value)):
                raise InvalidQuery(f"{name.replace('_', ' ')} must be at most {limit} "
                                   "characters without wildcards (* ? \\)")
        for name in ("study_instance_uid", "series_instance_uid"):
            value = getattr(self, name)
            if value is not None:
                try:
                    checked_uid(value, name)
                except RtcontourError:
                    raise InvalidQuery(f"{name.replace('_', ' ')} {value[:80]!r} is not a "
                                       "valid UID") from None

    def keys(self) -> list[str]:
        """The names of the keys given (what the audit keeps: never their values)."""
        return [name for name, value in self.as_dict().items() if value is not None]

    def as_dict(self) -> dict[str, str | None]:
        return {"patient_id": self.patient_id, "accession_number": self.accession_number,
                "study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid}

    def describe(self) -> str:
        """The query in words, for the user who typed it (it may hold a patient ID: never
        logged)."""
        words = {"patient_id": "patient ID", "accession_number": "accession number",
                 "study_instance_uid": "study", "series_instance_uid": "series"}
        return " and ".join(f"{words[k]} {v}" for k, v in self.as_dict().items() if v)


@dataclass(frozen=True)
class SeriesMatch:
    """A series the PACS holds for the query: its identifiers, what routes see of it (the
    study and series attributes the C-FIND returned) and, for CT, the routing decision."""

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    n_instances: int | None
    study_date: str
    attributes: Dataset = field(repr=False, compare=False)
    decision: RouteDecision | None = None

    def describe(self) -> str:
        images = f"{self.n_instances} images" if self.n_instances is not None else "images ?"
        date = f", {self.study_date}" if self.study_date else ""
        return (f"'{self.series_description or 'no description'}' ({images}{date}, series "
                f"{self.series_instance_uid})")


@dataclass(frozen=True)
class RetrieveResult:
    """How a C-MOVE / C-GET ended: sub-operations completed and failed, and a sentence when
    it did not bring the whole series (None: it did)."""

    completed: int
    failed: int
    problem: str | None


# -- the PACS ---------------------------------------------------------------------------
class PacsClient:
    """C-FIND, C-MOVE and C-GET (Study Root) with the PACS of ``settings`` as rtcontour's AE."""

    def __init__(self, settings: Settings, pacs: Destination) -> None:
        self.settings = settings
        self.pacs = pacs

    def _ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        ae.connection_timeout = min(30.0, self.settings.acse_timeout_s)
        ae.dimse_timeout = self.settings.pacs_timeout_s
        return ae

    def _associate(self, ae: AE, **kwargs: Any) -> Association:
        tls_args = None
        if self.pacs.tls:
            tls_args = (client_ssl_context(self.settings.tls_ca_file, self.settings.tls_cert_file,
                                           self.settings.tls_key_file), self.pacs.host)
        assoc = ae.associate(self.pacs.host, self.pacs.port, ae_title=self.pacs.ae_title,
                             tls_args=tls_args, **kwargs)
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise PacsUnavailable(f"the PACS {self.pacs} {why} (calling AE title "
                                  f"{self.settings.ae_title}: is it among the PACS's known DICOM "
                                  "nodes?)")
        return assoc

    def find(self, query: PullQuery, keywords: list[str]) -> list[SeriesMatch]:
        """Every series of the studies matching ``query`` (or the one series it names)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae)
        try:
            if query.series_instance_uid and not (query.study_instance_uid or query.patient_id
                                                  or query.accession_number):
                studies = [Dataset()]  # one series by its UID: a series-level query alone
            else:
                studies = list(self._c_find(assoc, self._study_query(query)))
                if len(studies) > MAX_STUDIES:
                    raise PacsUnavailable(f"{len(studies)} studies match {query.describe()}; "
                                          "narrow the query (an accession number or study UID)")
            matches: list[SeriesMatch] = []
            for study in studies:
                series_query = self._series_query(query, study, keywords)
                for found in self._c_find(assoc, series_query):
                    merged = Dataset()
                    merged.update(study)
                    merged.update(found)
                    matches.append(_match(merged))
            return matches
        finally:
            assoc.release()

    @staticmethod
    def _study_query(query: PullQuery) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = query.patient_id or ""
        ds.AccessionNumber = query.accession_number or ""
        ds.StudyInstanceUID = query.study_instance_uid or ""
        ds.StudyDescription = ""
        ds.StudyDate = ""
        return ds

    @staticmethod
    def _series_query(query: PullQuery, study: Dataset, keywords: list[str]) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = str(study.get("StudyInstanceUID", "") or "")
        ds.SeriesInstanceUID = query.series_instance_uid or ""
        for keyword in ("Modality", "SeriesDescription", "SeriesNumber",
                        "NumberOfSeriesRelatedInstances", "BodyPartExamined", "ProtocolName",
                        *keywords):
            if keyword not in ds and tag_for_keyword(keyword) is not None:
                setattr(ds, keyword, None)  # a return key: empty, the PACS fills it in
        return ds

    def _c_find(self, assoc: Association, identifier: Dataset) -> Iterator[Dataset]:
        for status, found in assoc.send_c_find(identifier,
                                               StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise PacsUnavailable(f"the PACS {self.pacs} did not answer the C-FIND "
                                      "(timeout or aborted)")
            if code in _PENDING and found is not None:
                yield found
            elif code not in _PENDING and code != 0x0000:
                raise PacsUnavailable(f"the PACS {self.pacs} failed the C-FIND (status "
                                      f"0x{code:04X})")

    def move(self, match: SeriesMatch) -> RetrieveResult:
        """C-MOVE the series to our own AE title (the listener receives it)."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = self._associate(ae)
        try:
            responses = assoc.send_c_move(_retrieve_identifier(match), self.settings.ae_title,
                                          StudyRootQueryRetrieveInformationModelMove)
            return self._outcome(responses, "C-MOVE")
        finally:
            assoc.release()

    def get(self, match: SeriesMatch, receiver: InstanceReceiver, actor: str) -> RetrieveResult:
        """C-GET the series: the PACS C-STOREs each instance back on our association, into the
        listener's spool (``service.ingest``) as if it had been pushed."""
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(CTImageStorage, SUPPORTED_TRANSFER_SYNTAXES)
        ae.add_requested_context(RTStructureSetStorage, STRUCTURE_SET_TRANSFER_SYNTAXES)
        roles = [build_role(CTImageStorage, scp_role=True),
                 build_role(RTStructureSetStorage, scp_role=True)]
        sender = Sender(self.pacs.ae_title, self.pacs.host, "", actor)
        with receiver.association() as serial:

            def store(event: Any) -> int:
                request, context = event.request, event.context
                sop_class = str(request.AffectedSOPClassUID or "")
                sop_instance = str(request.AffectedSOPInstanceUID or "")
                try:
                    if sop_class != str(context.abstract_syntax):
                        raise SopClassMismatch(f"SOP Class {sop_class} does not match the "
                                               f"context {context.abstract_syntax}")
                    receiver.store(serial, request.DataSet, sop_class_uid=sop_class,
                                   sop_instance_uid=sop_instance,
                                   transfer_syntax=str(context.transfer_syntax), sender=sender)
                except RtcontourError as exc:
                    status = store_status(exc)
                    receiver.refused(sender, status, sop_class, sop_instance, str(exc))
                    return int(status)
                except Exception:
                    logger.exception("C-GET: an instance could not be stored")
                    return int(Status.PROCESSING_FAILURE)
                return int(Status.SUCCESS)

            assoc = self._associate(ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, store)])
            try:
                responses = assoc.send_c_get(_retrieve_identifier(match),
                                             StudyRootQueryRetrieveInformationModelGet)
                return self._outcome(responses, "C-GET")
            finally:
                assoc.release()

    def _outcome(self, responses: Iterator[tuple[Dataset, Dataset | None]], what: str
                 ) -> RetrieveResult:
        completed = failed = 0
        code: int | None = None
        for status, _identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                break
            completed = int(status.get("NumberOfCompletedSuboperations", completed) or 0)
            failed = int(status.get("NumberOfFailedSuboperations", failed) or 0)
            if code not in _PENDING:
                break
        if code is None:
            return RetrieveResult(completed, failed, f"the PACS {self.pacs} did not finish the "
                                  f"{what} (timeout or aborted)")
        if code == 0x0000 and failed == 0:
            return RetrieveResult(completed, failed, None)
        if code == 0xA801:
            return RetrieveResult(completed, failed, (
                f"the PACS {self.pacs} does not know rtcontour's AE title "
                f"{self.settings.ae_title} as a move destination: add it to the PACS's DICOM "
                f"nodes with rtcontour's host and port {self.settings.dicom_port}"))
        if code == 0xB000 or (code == 0x0000 and failed):
            return RetrieveResult(completed, failed, (
                f"the PACS sent {completed} instances but {failed} failed (is rtcontour's "
                "listener running and reachable from the PACS? see GET /api/refusals)"))
        return RetrieveResult(completed, failed, f"the PACS {self.pacs} failed the {what} "
                              f"(status 0x{code:04X}) after {completed} instances")


def _match(merged: Dataset) -> SeriesMatch:
    count = merged.get("NumberOfSeriesRelatedInstances")
    try:
        n_instances = int(count) if count not in (None, "") else None
    except (TypeError, ValueError):
        n_instances = None
    return SeriesMatch(
        study_instance_uid=str(merged.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(merged.get("SeriesInstanceUID", "") or ""),
        modality=str(merged.get("Modality", "") or "").strip(),
        series_description=str(merged.get("SeriesDescription", "") or "")[:64],
        n_instances=n_instances,
        study_date=str(merged.get("StudyDate", "") or ""),
        attributes=merged,
    )


def _retrieve_identifier(match: SeriesMatch) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = match.study_instance_uid
    ds.SeriesInstanceUID = match.series_instance_uid
    return ds


def choose_series(matches: list[SeriesMatch], query: PullQuery, routing: RoutingTable, *,
                  pacs_ae: str, our_ae: str) -> SeriesMatch:
    """The one CT series a route would contour, or a ``PullError`` saying why there is none
    or which to choose from."""
    keywords = match_keywords(routing)
    ct = []
    for match in matches:
        if match.modality != "CT" or not match.series_instance_uid:
            continue
        attributes = series_attributes(match.attributes, calling_ae=pacs_ae, called_ae=our_ae,
                                       keywords=keywords)
        ct.append(replace(match, decision=routing.decide(attributes)))
    if not matches:
        raise NothingMatches(f"nothing matches {query.describe()} on the PACS")
    if not ct:
        modalities = sorted({m.modality or "?" for m in matches})
        raise NothingMatches(f"no CT series matches {query.describe()} on the PACS ("
                             f"{len(matches)} series found, of modality {', '.join(modalities)})")
    taken = [m for m in ct if m.decision is not None and m.decision.action == "contour"]
    if not taken:
        reasons = "; ".join(f"{m.describe()}: {m.decision.reason if m.decision else '?'}"
                            for m in ct[:5])
        raise NothingMatches(f"{len(ct)} CT series match {query.describe()} but no route "
                             f"contours them ({reasons})")
    if len(taken) > 1:
        listed = "; ".join(m.describe() for m in taken[:10])
        raise Ambiguous(f"{len(taken)} CT series match {query.describe()} and the routes would "
                        f"contour each of them: {listed}. Pull one by its series UID")
    return taken[0]


# -- orchestration ------------------------------------------------------------------------
class Puller:
    """Find, choose, record, retrieve (module docstring). ``receiver``: the in-process
    listener's (needed for C-GET only); ``client``: the PACS client (tests inject one)."""

    def __init__(self, settings: Settings, engine: Engine, routing: RoutingTable, *,
                 receiver: InstanceReceiver | None = None,
                 client: PacsClient | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.routing = routing
        self.receiver = receiver
        self.store = PullStore(engine)
        self._client = client

    def client(self) -> PacsClient:
        if self._client is not None:
            return self._client
        if self.settings.pacs is None:
            raise PullNotConfigured("no PACS is configured: set RTCONTOUR_PACS=AET@host:port "
                                    "(the PACS's AE title, host and DICOM port)")
        if self.settings.pacs_retrieve == "get" and self.receiver is None:
            raise PullNotConfigured(
                "RTCONTOUR_PACS_RETRIEVE=get brings the instances back into the DICOM listener "
                "of this process, and none runs here: pull through `rtcontour serve` (its API), "
                "or use C-MOVE (RTCONTOUR_PACS_RETRIEVE=move, the default)")
        return PacsClient(self.settings, self.settings.pacs)

    def pull(self, query: PullQuery, requested_by: str, *, wait: bool,
             on_done: Callable[[Pull], None] | None = None) -> Pull:
        """Find and choose the series, record the pull, retrieve it (in a background thread
        unless ``wait``); return the pull row as it stands."""
        client = self.client()
        matches = client.find(query, match_keywords(self.routing))
        chosen = choose_series(matches, query, self.routing, pacs_ae=client.pacs.ae_title,
                               our_ae=self.settings.ae_title)
        pull = self.store.create(
            requested_by=requested_by, query=query.as_dict(), pacs=str(client.pacs),
            retrieve=self.settings.pacs_retrieve, study_instance_uid=chosen.study_instance_uid,
            series_instance_uid=chosen.series_instance_uid,
            series_description=chosen.series_description,
            expected_instances=chosen.n_instances)
        audit.record(self.engine, PULL_REQUESTED, requested_by, {
            "pull_id": pull.id, "query_keys": ",".join(query.keys()), "pacs": str(client.pacs),
            "retrieve": self.settings.pacs_retrieve,
            "study_instance_uid": chosen.study_instance_uid,
            "series_instance_uid": chosen.series_instance_uid,
            "route": chosen.decision.route_name if chosen.decision else None})
        logger.info("pull %s by %s: series %s from %s by C-%s", pull.id, requested_by,
                    chosen.series_instance_uid, client.pacs, self.settings.pacs_retrieve.upper())
        if wait:
            self._retrieve(client, pull, chosen, on_done)
            return self.store.get(pull.id) or pull
        threading.Thread(target=self._retrieve, args=(client, pull, chosen, on_done),
                         name=f"rtcontour-pull-{pull.id[:8]}", daemon=True).start()
        return pull

    def _retrieve(self, client: PacsClient, pull: Pull, chosen: SeriesMatch,
                  on_done: Callable[[Pull], None] | None) -> None:
        try:
            if self.settings.pacs_retrieve == "get":
                if self.receiver is None:  # checked in client(); a clear failure all the same
                    raise PullNotConfigured("C-GET needs the in-process DICOM listener")
                result = client.get(chosen, self.receiver, pull.requested_by)
            else:
                result = client.move(chosen)
        except PullError as exc:
            result = RetrieveResult(0, 0, str(exc))
        except Exception as exc:
            logger.exception("pull %s: the retrieve failed", pull.id)
            result = RetrieveResult(0, 0, f"the retrieve failed: {type(exc).__name__}")
        self.store.finish(pull.id, retrieved=result.completed, failed=result.failed,
                          reason=result.problem)
        event = PULL_RETRIEVED if result.problem is None else PULL_FAILED
        audit.record(self.engine, event, pull.requested_by, {
            "pull_id": pull.id, "series_instance_uid": pull.series_instance_uid,
            "retrieved": result.completed, "failed": result.failed,
            "reason": result.problem})
        if result.problem is None:
            logger.info("pull %s: %d instances of series %s retrieved", pull.id,
                        result.completed, pull.series_instance_uid)
        else:
            logger.warning("pull %s of series %s: %s", pull.id, pull.series_instance_uid,
                           result.problem)
        if on_done is not None:
            finished = self.store.get(pull.id)
            if finished is not None:
                on_done(finished)
