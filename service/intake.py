"""The seam between the DICOM listener and the job queue: a complete series becomes a job."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SeriesArrival:
    """A series the listener received completely, spooled in ``folder``.

    ``folder`` holds one ``<SOPInstanceUID>.dcm`` per instance; the identifiers are DICOM UIDs
    and AE titles only (no patient identifiers, so this value may be logged).
    """

    series_instance_uid: str
    study_instance_uid: str
    calling_ae: str
    modality: str
    series_description: str
    folder: Path
    n_instances: int


class SeriesSink(Protocol):
    """Receives complete series from the listener; must return quickly (no inference here)."""

    def series_complete(self, arrival: SeriesArrival) -> None: ...
