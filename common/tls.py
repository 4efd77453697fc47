"""DICOM TLS: the listener's server context and handshake, and the client context with which
the sender and the C-ECHO check reach ``+tls`` destinations.

Listener: with ``tls_ca_file`` set, clients must present a certificate signed by that CA
(mutual TLS). The handshake runs in the connection's own thread with a timeout, never in the
accept loop, so a silent or slow client cannot hold up other peers.

Destinations (``AE@host:port+tls``): the peer's certificate must chain to ``tls_ca_file`` (the
system's CAs when unset) and name the host; rtcontour presents ``tls_cert_file`` when set.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from pynetdicom import AE
from pynetdicom.association import Association

from rtcontour.common.settings import Destination, Settings


def server_ssl_context(
    cert_file: Path, key_file: Path, ca_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ server context with our certificate; client certificates required and
    verified against ``ca_file`` when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_ssl_context(
    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A TLS 1.2+ client context that verifies the peer (certificate and host name) against
    ``ca_file`` (default: the system's CAs) and presents our certificate when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if cert_file is not None and key_file is not None:
        context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    return context


def accept_tls(
    connection: socket.socket, context: ssl.SSLContext, timeout_s: float
) -> ssl.SSLSocket:
    """Run the server side of the TLS handshake on an accepted connection (blocking, bounded
    by ``timeout_s``); raises ``OSError`` (``ssl.SSLError``, ``TimeoutError``) on failure."""
    connection.settimeout(timeout_s)
    tls_connection = context.wrap_socket(connection, server_side=True)
    tls_connection.settimeout(None)  # pynetdicom's transport polls with select()
    return tls_connection


def associate(ae: AE, destination: Destination, settings: Settings) -> Association:
    """Request an association with ``destination`` from ``ae``; over DICOM TLS (peer verified
    against ``tls_ca_file``, our ``tls_cert_file`` presented) for ``+tls`` destinations."""
    tls_args = None
    if destination.tls:
        context = client_ssl_context(
            settings.tls_ca_file, settings.tls_cert_file, settings.tls_key_file
        )
        tls_args = (context, destination.host)
    return ae.associate(
        destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args
    )
