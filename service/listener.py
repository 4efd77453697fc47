"""The DICOM listener: rtcontour's Storage SCP (C-ECHO, CT Image Storage C-STORE).

Public API (stable; ``service/serve.py`` builds the listener with it)
---------------------------------------------------------------------
``start_listener(settings, sink, *, audit=None) -> ListenerHandle``
    Start accepting associations on ``settings.dicom_host:dicom_port`` in background threads
    and return at once; first, every series an earlier run had acknowledged completely (the
    journal, ``service.journal``) is re-armed to arrive after the quiet period. Every complete
    series becomes one ``SeriesArrival`` passed to
    ``sink.series_complete`` (from the tracker's thread). ``audit(event, detail)`` is called
    for every rejected association / refused TLS handshake with ``event ==
    "dicom.association_rejected"`` and ``detail`` holding ``calling_ae``, ``called_ae``,
    ``address``, ``reason`` (and ``actor: "dicom-listener"`` for ``common.audit``). With
    ``settings.known_peers`` empty every calling AE title is accepted; otherwise only those
    peers (``AE`` or ``AE@ip``), and the called AE title must be ``settings.ae_title``.
``ListenerHandle.shutdown(timeout_s=10.0) -> list[SeriesArrival]``
    Stop accepting, let running associations finish for up to ``timeout_s`` (then abort them),
    hand every series already complete to the sink without waiting for its quiet period, stop
    the tracker; return those arrivals. Idempotent.
``ListenerHandle.address``  ``(host, port)`` actually bound.
``SUPPORTED_TRANSFER_SYNTAXES``  what the listener accepts for CT Image Storage.
``main(argv) -> int``  ``rtcontour listener``: runs until SIGTERM/SIGINT, then shuts down.

Settings used: ae_title, dicom_host, dicom_port, known_peers, quiet_period_s,
release_ends_quiet_period,
max_associations, acse_timeout_s, dimse_timeout_s, network_timeout_s, max_pdu_bytes,
max_instance_bytes, min_free_disk_bytes, incoming_retention_s, tls_cert_file, tls_key_file,
tls_ca_file, data_dir.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from prometheus_client import start_http_server
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    RTStructureSetStorage,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from rtcontour.common.audit import make_recorder
from rtcontour.common.db import make_engine
from rtcontour.common.jobstore import JobStore
from rtcontour.common.notify import refusal_notifier
from rtcontour.common.queue import make_enqueue, publisher
from rtcontour.common.refusals import make_refusal_recorder
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from rtcontour.common.tls import accept_tls, server_ssl_context
from rtcontour.models.registry import load_checked_routing
from rtcontour.service import handlers
from rtcontour.service.handlers import AuditCallable, Edge, KnownPeer
from rtcontour.service.intake import Intake, SeriesArrival, SeriesSink
from rtcontour.service.journal import SeriesJournal
from rtcontour.service.spool import InstanceSpool, SeriesTracker

logger = logging.getLogger(__name__)

# A structure set has no pixel data: the uncompressed syntaxes (and deflate) are all there is.
STRUCTURE_SET_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
]

SUPPORTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # 1.2.840.10008.1.2.4.57
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    JPEG2000,  # 1.2.840.10008.1.2.4.91
    RLELossless,  # 1.2.840.10008.1.2.5
]


RECEIVE_MARGIN_BYTES = 1024 * 1024  # command set and PDU headers beyond max_instance_bytes


class _ReceiveBudget:
    """``recv`` that ends the connection once a peer has sent more than ``budget_bytes``
    since the last complete DIMSE message (``reset_budget``, called on EVT_DIMSE_RECV).

    pynetdicom buffers a whole PDU and a whole message in memory before any handler sees it;
    this bounds that memory by ``max_instance_bytes`` plus a margin. Returning ``b""`` looks
    like the peer closing the connection: pynetdicom aborts the association (A-P-ABORT).
    """

    budget_bytes = 0
    _received = 0

    def reset_budget(self) -> None:
        self._received = 0

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        self._received += len(data)
        if self.budget_bytes and self._received > self.budget_bytes:
            logger.warning(
                "peer sent more than %d bytes without completing a message; dropping it",
                self.budget_bytes,
            )
            return b""
        return data


class _BudgetSocket(_ReceiveBudget, socket.socket):
    pass


class _BudgetSSLSocket(_ReceiveBudget, ssl.SSLSocket):
    pass


class _AssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with the TLS handshake moved into each connection's thread
    (pynetdicom does it in the accept loop, where one silent client would block everyone), and
    a receive budget on every connection."""

    tls_context: ssl.SSLContext | None = None
    handshake_timeout_s: float = 30.0
    on_tls_failure: Any = None
    receive_budget_bytes: int = 0

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        # Small PDUs (C-STORE-RSP) must not wait for delayed ACKs.
        request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.tls_context is not None:
            try:
                if _closed_before_a_byte(request, self.handshake_timeout_s):
                    # A TCP health probe (Kubernetes, compose): no refusal to record.
                    logger.debug("connection from %s closed before sending anything",
                                 client_address)
                    self.shutdown_request(request)
                    return
                request = accept_tls(request, self.tls_context, self.handshake_timeout_s)
            except OSError as exc:
                logger.warning("TLS handshake with %s failed: %s", client_address, exc)
                if self.on_tls_failure is not None:
                    self.on_tls_failure(client_address, exc)
                self.shutdown_request(request)
                return
        else:
            request = _BudgetSocket(
                request.family, request.type, request.proto, fileno=request.detach()
            )
        request.budget_bytes = self.receive_budget_bytes
        super().process_request_thread(request, client_address)

    def shutdown(self) -> None:
        # The base class also removes itself from the AE's list, which make_server never fills.
        socketserver.TCPServer.shutdown(self)
        self.server_close()


def _closed_before_a_byte(connection: socket.socket, timeout_s: float) -> bool:
    """True if the peer closed the connection without sending anything (waits for its first
    byte, at most ``timeout_s``; a silent peer raises ``TimeoutError``)."""
    connection.settimeout(timeout_s)
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True  # reset before a byte: a probe too


@dataclass
class ListenerHandle:
    """A running listener; see the module docstring."""

    ae: AE
    server: _AssociationServer
    tracker: SeriesTracker
    spool: InstanceSpool
    edge: Edge
    _thread: threading.Thread
    _stopped: bool = field(default=False)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.server.server_address[:2]
        return str(host), int(port)

    def active_associations(self) -> int:
        return sum(1 for assoc in self.ae.active_associations if assoc.is_acceptor)

    def shutdown(self, timeout_s: float = 10.0) -> list[SeriesArrival]:
        """Stop; return the series handed to the sink while flushing."""
        if self._stopped:
            return []
        self._stopped = True
        self.server.shutdown()
        self._thread.join(timeout=5)
        deadline = time.monotonic() + timeout_s
        while self.active_associations() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            logger.warning("aborting association still open at shutdown")
            assoc.abort()
        flushed = self.tracker.stop(flush=True)
        logger.info("listener stopped; %d series handed over at shutdown", len(flushed))
        return flushed


def build_ae(settings: Settings) -> AE:
    """The Application Entity with rtcontour's contexts, limits and timeouts."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, SUPPORTED_TRANSFER_SYNTAXES)
    # Approved structure sets come back from the TPS (dose prediction, QA of our contours).
    ae.add_supported_context(RTStructureSetStorage, STRUCTURE_SET_TRANSFER_SYNTAXES)
    # Accepted only to refuse each C-STORE naming what it was (handlers: nothing is stored).
    for sop_class in handlers.EXPLAINED_SOP_CLASSES:
        ae.add_supported_context(sop_class, SUPPORTED_TRANSFER_SYNTAXES)
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = settings.acse_timeout_s
    ae.dimse_timeout = settings.dimse_timeout_s
    ae.network_timeout = settings.network_timeout_s
    ae.maximum_pdu_size = settings.max_pdu_bytes
    return ae


def _event_handlers(edge: Edge) -> list[Any]:
    return [
        (evt.EVT_C_ECHO, handlers.handle_echo, [edge]),
        (evt.EVT_C_STORE, handlers.handle_store, [edge]),
        (evt.EVT_REQUESTED, handlers.handle_requested, [edge]),
        (evt.EVT_REJECTED, handlers.handle_rejected, [edge]),
        (evt.EVT_ESTABLISHED, handlers.handle_established, [edge]),
        (evt.EVT_ACSE_RECV, handlers.handle_acse_received, [edge]),
        (evt.EVT_RELEASED, handlers.handle_released, [edge]),
        (evt.EVT_ABORTED, handlers.handle_aborted, [edge]),
        (evt.EVT_CONN_CLOSE, handlers.handle_conn_close, [edge]),
        (evt.EVT_DIMSE_RECV, handlers.handle_dimse_received, [edge]),
    ]


def start_listener(
    settings: Settings,
    sink: SeriesSink,
    *,
    audit: AuditCallable | None = None,
    refused: Callable[[dict[str, Any]], None] | None = None,
) -> ListenerHandle:
    """Start the listener in background threads; see the module docstring."""
    spool = InstanceSpool(settings.spool_dir, min_free_disk_bytes=settings.min_free_disk_bytes)
    spool.sweep_partials()
    tracker = SeriesTracker(
        sink,
        spool,
        quiet_period_s=settings.quiet_period_s,
        retention_s=settings.incoming_retention_s,
        journal=SeriesJournal(settings.spool_dir),
        release_ends_quiet=frozenset(settings.release_ends_quiet_period),
    )
    # What an earlier run acknowledged becomes jobs (before any new association is accepted).
    recovered = tracker.recover()
    if recovered:
        logger.warning("%d series acknowledged before the restart will become jobs", recovered)
    edge = Edge(
        ae_title=settings.ae_title,
        spool=spool,
        tracker=tracker,
        max_instance_bytes=settings.max_instance_bytes,
        known_peers=[KnownPeer.parse(peer) for peer in settings.known_peers],
        audit=audit,
        accept_any_called_ae=settings.accept_any_called_ae,
        refused=refused,
    )
    if not settings.known_peers:
        logger.warning(
            "DICOM listener accepts any calling AE title from any address on %s (no "
            "RTCONTOUR_KNOWN_PEERS): set it to the planning systems and scanners that may send",
            settings.dicom_host)
    if settings.release_ends_quiet_period:
        logger.warning(
            "series from %s become jobs when their association is released, without the %g s "
            "quiet period (RTCONTOUR_RELEASE_ENDS_QUIET_PERIOD): a sender that splits a series "
            "across associations gets a job per part", ", ".join(
                settings.release_ends_quiet_period), settings.quiet_period_s)
    if settings.accept_any_called_ae:
        logger.warning("DICOM listener accepts any called AE title "
                       "(RTCONTOUR_ACCEPT_ANY_CALLED_AE), not only %s", settings.ae_title)
    ae = build_ae(settings)
    server = cast(
        _AssociationServer,
        ae.make_server(
            (settings.dicom_host, settings.dicom_port),
            evt_handlers=_event_handlers(edge),
            server_class=_AssociationServer,
        ),
    )
    if settings.tls_cert_file is not None and settings.tls_key_file is not None:
        server.tls_context = server_ssl_context(
            settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file
        )
        server.tls_context.sslsocket_class = _BudgetSSLSocket
        server.handshake_timeout_s = settings.acse_timeout_s

        def on_tls_failure(client_address: Any, exc: OSError) -> None:
            detail = {
                "calling_ae": "",
                "called_ae": "",
                "address": str(client_address[0]),
                "reason": f"TLS handshake failed: {type(exc).__name__}",
            }
            handlers.metrics.ASSOCIATIONS_REJECTED.labels(reason="TLS handshake failed").inc()
            handlers.metrics.REFUSALS.labels(kind="association").inc()
            if audit is not None:
                audit(handlers.ASSOCIATION_REJECTED, detail)
            if refused is not None:
                refused({"kind": "association", "address": detail["address"],
                         "what": "association (DICOM TLS)", "why": detail["reason"]})

        server.on_tls_failure = on_tls_failure
    server.receive_budget_bytes = settings.max_instance_bytes + RECEIVE_MARGIN_BYTES
    tracker.start()
    thread = threading.Thread(
        target=server.serve_forever, name="rtcontour-dicom-listener", daemon=True
    )
    thread.start()
    handle = ListenerHandle(ae, server, tracker, spool, edge, thread)
    logger.info(
        "DICOM listener %s on %s:%d (TLS %s, %d known peers)",
        settings.ae_title,
        *handle.address,
        "on" if server.tls_context is not None else "off",
        len(edge.known_peers),
    )
    return handle


class LoggingSink:
    """A sink that only logs arrivals (``rtcontour listener --log-only``: no job store)."""

    def series_complete(self, arrival: SeriesArrival) -> None:
        logger.info("series arrived: %s", arrival)


def _build_intake(
    settings: Settings,
) -> tuple[SeriesSink, AuditCallable, Callable[[dict[str, Any]], None]]:
    """The job-store intake (jobs enqueued on ``settings``' broker), the audit recorder and
    the refusals recorder."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings)
    create_schema(engine)
    intake = Intake(settings, JobStore(engine), make_enqueue(publisher(settings)),
                    routing=load_checked_routing(settings))
    return (intake, make_recorder(engine, actor="dicom-listener"),
            make_refusal_recorder(engine, refusal_notifier(settings, engine)))


def main(argv: list[str] | None = None) -> int:
    """``rtcontour listener``: run the DICOM listener until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="rtcontour listener", description="Run rtcontour's DICOM C-STORE listener."
    )
    parser.add_argument("--host", help="address to bind (RTCONTOUR_DICOM_HOST)")
    parser.add_argument("--port", type=int, help="port (RTCONTOUR_DICOM_PORT)")
    parser.add_argument("--ae-title", help="our AE title (RTCONTOUR_AE_TITLE)")
    parser.add_argument(
        "--log-only",
        action="store_true",
        help="log complete series instead of creating jobs (no database or broker needed)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.log_level.upper() != "DEBUG":  # pynetdicom logs every request at INFO
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    overrides = {
        key: value
        for key, value in {
            "dicom_host": args.host,
            "dicom_port": args.port,
            "ae_title": args.ae_title,
        }.items()
        if value is not None
    }
    settings = Settings(**overrides)
    sink: SeriesSink
    audit: AuditCallable | None
    refused: Callable[[dict[str, Any]], None] | None
    sink, audit, refused = (
        (LoggingSink(), None, None) if args.log_only else _build_intake(settings)
    )
    if settings.listener_metrics_port is not None:
        # Scaled out, the listener's DICOM counters live in this process: serve them here.
        start_http_server(settings.listener_metrics_port, addr=settings.listener_metrics_host)
        logger.info("listener metrics on http://%s:%d/metrics", settings.listener_metrics_host,
                    settings.listener_metrics_port)
    handle = start_listener(settings, sink, audit=audit, refused=refused)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        logger.info("signal %d received; shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    logger.info("listening on %s:%d", handle.address[0], handle.address[1])
    while not stop.wait(1.0):
        pass
    handle.shutdown()
    return 0


__all__ = [
    "SUPPORTED_TRANSFER_SYNTAXES",
    "ListenerHandle",
    "LoggingSink",
    "build_ae",
    "main",
    "start_listener",
]
