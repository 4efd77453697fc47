"""In-process Prometheus counters of the DICOM listener (exposed by the API's /metrics)."""

from prometheus_client import Counter

ASSOCIATIONS = Counter(
    "rtcontour_dicom_associations", "DICOM associations accepted by the listener"
)
ASSOCIATIONS_REJECTED = Counter(
    "rtcontour_dicom_associations_rejected",
    "DICOM associations the listener rejected, by reason",
    ["reason"],
)
INSTANCES_RECEIVED = Counter(
    "rtcontour_dicom_instances_received",
    "C-STORE requests received, by outcome (stored, refused, failed)",
    ["outcome"],
)
