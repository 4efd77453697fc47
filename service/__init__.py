"""rtcontour service: settings, job store, DICOM listener and sender, HTTP API, CLI."""

__version__ = "0.1.0"
