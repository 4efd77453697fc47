"""rtcontour's ground floor: what every package shares (settings, errors, the job store,
the queue client). It imports none of ``service``, ``worker`` or ``models``."""

__version__ = "0.1.0"
