"""Settings: what production mode refuses (so a template's placeholder never goes live)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from rtcontour.common.settings import Settings

REAL_SECRET = "3f9c" * 16  # as long as `openssl rand -hex 32`


@pytest.mark.parametrize(
    "token",
    ["development-admin-token", "replace-with-openssl-rand-hex-32",
     "REPLACE-WITH-openssl-rand-hex-32", "please-replace-this-with-a-long-random-secret",
     "short-secret"],
    ids=["development-default", "example-env", "secret-template", "any-placeholder", "short"],
)
def test_production_refuses_a_public_or_short_admin_token(token: str) -> None:
    with pytest.raises(ValidationError, match="openssl rand -hex 32"):
        Settings(mode="production", admin_token=token)


def test_production_takes_a_real_secret_and_development_takes_anything() -> None:
    assert Settings(mode="production", admin_token=REAL_SECRET).admin_token is not None
    assert Settings(mode="development", admin_token="short").admin_token is not None
    with pytest.raises(ValidationError, match="RTCONTOUR_ADMIN_TOKEN is required"):
        Settings(mode="production")
