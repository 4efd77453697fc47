"""The C-STORE SCU: delivers a job's RTSTRUCT to each configured destination (a DICOMweb
destination by STOW-RS, ``common.dicomweb.stow``, with the same retries).

``Sender.send_file`` makes one association per attempt and retries with exponential backoff
(``send_attempts`` attempts, waiting ``send_backoff_s * 2**k`` between them); when every
attempt failed it raises ``DestinationUnavailable`` naming the destination and the last error.
``deliver`` sends one file to many destinations idempotently: a destination that already
acknowledged this SOP Instance UID for this job (recorded in the job store) is skipped, so a
re-run job never sends a duplicate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RTStructureSetStorage
from pynetdicom import AE

from rtcontour.common.dicomweb import stow
from rtcontour.common.errors import DestinationUnavailable
from rtcontour.common.jobstore import JobStore
from rtcontour.common.settings import Destination, Settings
from rtcontour.common.tls import associate

logger = logging.getLogger(__name__)

JOB_SENT_EVENT = "job.sent"

# C-STORE statuses that mean "stored": success and the warnings of PS3.4 B.2.3.
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


@dataclass(frozen=True)
class Delivery:
    """What ``deliver`` did for one destination."""

    destination: str
    sent: bool  # False: skipped, it already had this instance


class Sender:
    """Sends DICOM files by C-STORE with retries (see the module docstring).

    ``sleep`` is injectable so tests need not wait for real backoff.
    """

    def __init__(self, settings: Settings, sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._sleep = sleep

    def send_file(self, path: Path, destination: Destination) -> None:
        """C-STORE ``path`` to ``destination``; raise ``DestinationUnavailable`` when all
        ``send_attempts`` attempts failed."""
        dataset = pydicom.dcmread(path)
        attempts = self.settings.send_attempts
        last_error = "no attempt made"
        for attempt in range(1, attempts + 1):
            try:
                self._store_once(dataset, destination)
                logger.info(
                    "stored %s at %s (attempt %d)", dataset.SOPInstanceUID, destination, attempt
                )
                return
            except DestinationUnavailable as exc:
                last_error = str(exc)
                if attempt < attempts:
                    wait_s = self.settings.send_backoff_s * 2 ** (attempt - 1)
                    logger.warning(
                        "%s; attempt %d of %d, retrying in %.1f s",
                        last_error,
                        attempt,
                        attempts,
                        wait_s,
                    )
                    self._sleep(wait_s)
        raise DestinationUnavailable(
            f"Destination {destination} did not store the {dataset.get('Modality', 'object')} "
            f"after {attempts} attempts "
            f"(last error: {last_error})."
        )

    def _store_once(self, dataset: Any, destination: Destination) -> None:
        if destination.is_dicomweb:
            stow(dataset, destination, self.settings)
            return
        ae = AE(ae_title=self.settings.ae_title)
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.dimse_timeout_s
        ae.network_timeout = self.settings.network_timeout_s
        # Implicit VR only for RTSTRUCTs: in Explicit VR a Contour Data over 64 KB becomes UN
        # bytes a reader cannot parse (tested); every SCP must accept Implicit VR LE.
        syntaxes = (
            [ImplicitVRLittleEndian]
            if dataset.SOPClassUID == RTStructureSetStorage
            else [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        )
        ae.add_requested_context(dataset.SOPClassUID, syntaxes)
        assoc = associate(ae, destination, self.settings)
        if not assoc.is_established:
            if assoc.is_rejected:
                reason = "rejected the association"
            elif destination.tls:
                reason = "was not reachable or the TLS handshake failed"
            else:
                reason = "was not reachable"
            raise DestinationUnavailable(f"destination {destination} {reason}")
        try:
            status = assoc.send_c_store(dataset)
        finally:
            assoc.release()
        code = getattr(status, "Status", None)
        if code is None:
            raise DestinationUnavailable(
                f"destination {destination} gave no C-STORE response (timeout or abort)"
            )
        if int(code) not in _STORED:
            raise DestinationUnavailable(
                f"destination {destination} refused the C-STORE with status 0x{int(code):04X}"
            )


def deliver(
    *,
    job_id: str,
    path: Path,
    sop_instance_uid: str,
    destinations: Sequence[Destination],
    store: JobStore,
    sender: Sender,
    on_sent: Callable[[str], None] | None = None,
) -> list[Delivery]:
    """Send ``path`` to every destination that does not have it yet for this job.

    Each success is recorded in the job store before the next destination. Raises
    ``DestinationUnavailable`` listing every destination that failed (after the others
    were tried).
    """
    deliveries: list[Delivery] = []
    failures: list[str] = []
    for destination in destinations:
        name = str(destination)
        if store.was_sent(job_id, name, sop_instance_uid):
            logger.info("job %s: %s already has %s, skipped", job_id, name, sop_instance_uid)
            deliveries.append(Delivery(name, sent=False))
            continue
        try:
            sender.send_file(path, destination)
        except DestinationUnavailable as exc:
            failures.append(str(exc))
            continue
        store.record_sent(job_id, name, sop_instance_uid)
        deliveries.append(Delivery(name, sent=True))
        if on_sent is not None:
            on_sent(name)
    if failures:
        raise DestinationUnavailable(" ".join(failures))
    return deliveries
