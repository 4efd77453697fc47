"""The dashboard: a static page (HTML + plain JS + CSS) that calls the API with a token.

The page and its assets are public (they hold no data: the login form is part of them);
every piece of data comes from the authenticated API. The token typed into the login form
is kept in the browser tab's sessionStorage only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"

router = APIRouter(tags=["dashboard"])

# A strict policy: scripts and styles from this origin only, no inline script.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; "
        "style-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard", include_in_schema=False)
def dashboard() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html", headers=_SECURITY_HEADERS
    )


def mount_static(app: FastAPI) -> None:
    """Serve the dashboard's JS and CSS under ``/static`` (no authentication: no data)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
