"""Router placeholder; filled in by issue 5."""

from fastapi import APIRouter

router = APIRouter()
