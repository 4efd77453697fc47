"""Router placeholder; filled in by issue 5."""

from fastapi import APIRouter, FastAPI

router = APIRouter()


def mount_static(app: FastAPI) -> None:
    """Mount the dashboard's static files (placeholder)."""
