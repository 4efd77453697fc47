"""The domain exceptions of rtcontour.

Each edge (DICOM listener, HTTP API, Celery task) translates these into its own status in
exactly one place; code below the edges raises these and nothing else for domain failures.
"""


class RtcontourError(Exception):
    """Base class of every domain error rtcontour raises on purpose."""


class InvalidSeries(RtcontourError):  # noqa: N818 - domain name
    """A series that must not be contoured; the message is shown to users as the reason."""


class UnsupportedGeometry(InvalidSeries):
    """A series whose geometry the contouring path cannot handle (tilt, oblique, gaps)."""


class IncompleteSeries(UnsupportedGeometry):
    """A series that lacks instances (a gap where a slice is missing, too few slices): its
    missing instances sent later, or the whole series sent again, complete it."""


class InvalidInstance(RtcontourError):  # noqa: N818 - domain name
    """One DICOM instance that cannot be accepted (unparseable, missing attributes)."""


class DestinationUnavailable(RtcontourError):  # noqa: N818 - domain name
    """A DICOM destination that refused or could not be reached."""


class ModelPackageError(RtcontourError):
    """A model package that is missing, malformed or fails its checksum."""


class ConfigurationError(RtcontourError):
    """Settings that cannot work together (told at start-up, not at first use)."""


class SopClassMismatch(InvalidInstance):
    """An instance whose SOP Class differs from its presentation context or is not CT."""


class InsufficientStorage(RtcontourError):  # noqa: N818 - domain name
    """The spool cannot take an instance (free disk below the configured minimum, or full)."""


class InstanceTooLarge(InsufficientStorage):
    """An instance larger than ``max_instance_bytes``."""
