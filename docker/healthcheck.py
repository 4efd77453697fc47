"""Container health check for the rtcontour images (stdlib only, no project import).

``healthcheck.py api`` (default) GETs ``/health`` on the API port; ``healthcheck.py dicom``
opens a TCP connection to the DICOM port. Ports come from the same ``RTCONTOUR_*`` variables
the service reads, so a changed port does not silently break the check. Exit 0 healthy, 1 not.
"""

import os
import socket
import sys
import urllib.request


def main(argv: list[str]) -> int:
    target = argv[0] if argv else "api"
    try:
        if target == "dicom":
            port = int(os.environ.get("RTCONTOUR_DICOM_PORT", "11112"))
            with socket.create_connection(("127.0.0.1", port), timeout=4):
                return 0
        port = int(os.environ.get("RTCONTOUR_API_PORT", "8000"))
        url = f"http://127.0.0.1:{port}/health"
        with urllib.request.urlopen(url, timeout=4) as response:  # noqa: S310 - fixed http URL
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"unhealthy ({target}): {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
