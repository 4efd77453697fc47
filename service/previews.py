"""Preview rendering (placeholder; filled in by issue 5)."""


class PreviewCache:
    """Loaded CT volumes and rasterised contours per job."""
