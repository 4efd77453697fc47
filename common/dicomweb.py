"""DICOMweb STOW-RS (PS3.18 10.5), both ways: the client that stores our outputs at a
DICOMweb destination (``stow``), and the pieces of the server (``POST /dicomweb/studies``):
reading a ``multipart/related; type="application/dicom"`` body (``split_multipart``) and
answering with the Store Instances Response (``stow_response``).

A STOW answer is read as the standard says: 200 every instance stored; 202 some stored, some
failed (Failed SOP Sequence); 409 none stored; 4xx/5xx a refusal. Anything but "our instance
stored" raises ``DestinationUnavailable`` with a sentence naming the URL and what it said, so
the sender retries it with backoff and ends the job ``send_failed`` like a refused C-STORE.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from rtcontour.common.errors import DestinationUnavailable
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.tls import client_ssl_context

logger = logging.getLogger(__name__)

__all__ = ["StowResult", "probe", "split_multipart", "stow", "stow_response"]

DICOM_TYPE = "application/dicom"
DICOM_JSON = "application/dicom+json"
TIMEOUT_S = 60.0
# Failure Reason (0008,1197) values of PS3.18 / PS3.4 used in our answers.
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
CANNOT_UNDERSTAND = 0xC000


def _auth_header(settings: Settings) -> str | None:
    if settings.dicomweb_token is not None:
        return f"Bearer {settings.dicomweb_token.get_secret_value()}"
    if settings.dicomweb_username and settings.dicomweb_password is not None:
        pair = f"{settings.dicomweb_username}:{settings.dicomweb_password.get_secret_value()}"
        return "Basic " + base64.b64encode(pair.encode()).decode()
    return None


def _part10(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def stow(dataset: Dataset, destination: Destination, settings: Settings,
         timeout_s: float = TIMEOUT_S) -> None:
    """STOW-RS ``dataset`` to ``<destination.url>/studies``; raise ``DestinationUnavailable``
    unless the server says it stored it."""
    if destination.url is None:
        raise ValueError(f"destination {destination} is not a DICOMweb URL")
    boundary = f"rtcontour-{uuid.uuid4().hex}"
    body = b"".join([
        f"--{boundary}\r\nContent-Type: {DICOM_TYPE}\r\n\r\n".encode(), _part10(dataset),
        f"\r\n--{boundary}--\r\n".encode(),
    ])
    url = f"{destination.url}/studies"
    request = urllib.request.Request(url, data=body, method="POST")  # noqa: S310 - http(s)
    request.add_header("Content-Type",
                       f'multipart/related; type="{DICOM_TYPE}"; boundary={boundary}')
    request.add_header("Accept", DICOM_JSON)
    auth = _auth_header(settings)
    if auth is not None:
        request.add_header("Authorization", auth)
    context: ssl.SSLContext | None = None
    if destination.tls:
        context = client_ssl_context(settings.tls_ca_file, settings.tls_cert_file,
                                     settings.tls_key_file)
    uid = str(dataset.SOPInstanceUID)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s,  # noqa: S310
                                    context=context) as response:
            status, answer = int(response.status), response.read()
    except urllib.error.HTTPError as error:
        status, answer = int(error.code), error.read()
    except (urllib.error.URLError, OSError) as error:
        why = getattr(error, "reason", error)
        raise DestinationUnavailable(f"DICOMweb destination {url} was not reachable ({why})"
                                     ) from None
    failed = _failed_reasons(answer).get(uid)
    if status == 200 or (status == 202 and failed is None):
        return
    if status in (401, 403):
        raise DestinationUnavailable(
            f"DICOMweb destination {url} refused our credentials (HTTP {status}); check "
            "RTCONTOUR_DICOMWEB_TOKEN or RTCONTOUR_DICOMWEB_USERNAME/PASSWORD")
    detail = f", failure reason 0x{failed:04X}" if failed is not None else ""
    raise DestinationUnavailable(
        f"DICOMweb destination {url} did not store {uid} (HTTP {status}{detail})")


def _failed_reasons(answer: bytes) -> dict[str, int]:
    """SOP Instance UID -> Failure Reason, from a Store Instances Response in JSON."""
    try:
        document = json.loads(answer) if answer.strip() else {}
    except ValueError:
        return {}
    if isinstance(document, list):
        document = document[0] if document else {}
    failed: dict[str, int] = {}
    for item in (document.get("00081198") or {}).get("Value", []) if isinstance(
            document, dict) else []:
        uid = ((item.get("00081155") or {}).get("Value") or [""])[0]
        reason = ((item.get("00081197") or {}).get("Value") or [PROCESSING_FAILURE])[0]
        failed[str(uid)] = int(reason)
    return failed


_BOUNDARY = re.compile(r'boundary="?([^";]+)"?', re.IGNORECASE)
_TYPE = re.compile(r'type="?([^";]+)"?', re.IGNORECASE)


def split_multipart(body: bytes, content_type: str) -> list[bytes]:
    """The parts of a ``multipart/related; type="application/dicom"`` body (each a Part 10
    file). Raises ``ValueError`` with a sentence for another media type or no boundary."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "multipart/related":
        raise ValueError(f"Content-Type {media or 'none'} is not multipart/related")
    kind = _TYPE.search(content_type)
    if kind is not None and kind.group(1).strip().lower() != DICOM_TYPE:
        raise ValueError(f'multipart/related of type "{kind.group(1)}": only '
                         f'type="{DICOM_TYPE}" is taken (Part 10 instances)')
    boundary = _BOUNDARY.search(content_type)
    if boundary is None:
        raise ValueError("multipart/related without a boundary")
    delimiter = b"--" + boundary.group(1).strip().encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break  # the closing delimiter
        chunk = chunk.removeprefix(b"\r\n")
        headers, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            continue
        part_type = re.search(rb"content-type:\s*([^;\r\n]+)", headers, re.IGNORECASE)
        if part_type is not None and part_type.group(1).strip().lower() != DICOM_TYPE.encode():
            raise ValueError(f"a part of type {part_type.group(1).decode(errors='replace')} "
                             f"is not {DICOM_TYPE}")
        parts.append(content.removesuffix(b"\r\n"))
    return parts


@dataclass(frozen=True)
class StowResult:
    """One instance of a STOW request: stored, or why not (a Failure Reason code)."""

    sop_class_uid: str
    sop_instance_uid: str
    failure_reason: int | None = None  # None: stored
    why: str = ""


def stow_response(results: Sequence[StowResult], retrieve_url: str | None = None
                  ) -> tuple[int, dict[str, Any]]:
    """(HTTP status, Store Instances Response as DICOM JSON): 200 all stored, 202 some,
    409 none."""
    stored = [r for r in results if r.failure_reason is None]
    failed = [r for r in results if r.failure_reason is not None]

    def item(result: StowResult) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "00081150": {"vr": "UI", "Value": [result.sop_class_uid or "0"]},
            "00081155": {"vr": "UI", "Value": [result.sop_instance_uid or "0"]},
        }
        if result.failure_reason is not None:
            entry["00081197"] = {"vr": "US", "Value": [result.failure_reason]}
        return entry

    document: dict[str, Any] = {}
    if retrieve_url:
        document["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    if stored:
        document["00081199"] = {"vr": "SQ", "Value": [item(r) for r in stored]}
    if failed:
        document["00081198"] = {"vr": "SQ", "Value": [item(r) for r in failed]}
    status = 200 if not failed else (202 if stored else 409)
    return status, document


def probe(destination: Destination, settings: Settings, timeout_s: float = 3.0
          ) -> tuple[bool, str]:
    """The DICOMweb counterpart of a C-ECHO: QIDO-RS ``<url>/studies?limit=1`` with our
    credentials; (reachable, a short status sentence)."""
    if destination.url is None:
        raise ValueError(f"destination {destination} is not a DICOMweb URL")
    request = urllib.request.Request(f"{destination.url}/studies?limit=1")  # noqa: S310
    request.add_header("Accept", DICOM_JSON)
    auth = _auth_header(settings)
    if auth is not None:
        request.add_header("Authorization", auth)
    context = (client_ssl_context(settings.tls_ca_file, settings.tls_cert_file,
                                  settings.tls_key_file) if destination.tls else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s,  # noqa: S310
                                    context=context) as response:
            return True, f"QIDO-RS answered HTTP {response.status}"
    except urllib.error.HTTPError as error:
        return False, f"QIDO-RS answered HTTP {error.code}"
    except (urllib.error.URLError, OSError) as error:
        return False, f"unreachable ({getattr(error, 'reason', error)})"
