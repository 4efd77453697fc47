"""The first connection of every process: a database that cannot be used is one sentence."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import make_url

from rtcontour.common.db import make_engine
from rtcontour.common.errors import ConfigurationError
from rtcontour.common.schema import create_schema
from rtcontour.common.settings import Settings
from tests.conftest import free_port


def test_a_missing_postgresql_database_is_a_sentence_saying_how_to_create_it(
    postgres_base_url: str,
) -> None:
    name = f"rtc_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_base_url).set(database=name, password="s3cret-pw")
    settings = Settings(database_url=url.render_as_string(hide_password=False))
    engine = make_engine(settings)
    with pytest.raises(ConfigurationError) as raised:
        create_schema(engine)
    host, port, user = url.host, url.port or 5432, url.username
    assert str(raised.value) == (
        f"database {name} does not exist on {host}:{port}: create it with "
        f"`createdb -h {host} -p {port} -U {user} {name}` (rtcontour creates its tables itself "
        "at start), or correct RTCONTOUR_DATABASE_URL"
    )
    assert "s3cret-pw" not in str(raised.value)


def test_postgresql_not_listening_is_a_sentence_naming_the_address() -> None:
    port = free_port()
    settings = Settings(database_url=f"postgresql+psycopg://rtc:s3cret-pw@127.0.0.1:{port}/rtc")
    with pytest.raises(ConfigurationError) as raised:
        create_schema(make_engine(settings))
    message = str(raised.value)
    assert message.startswith(f"cannot reach PostgreSQL on 127.0.0.1:{port} (Connection refused)")
    assert "s3cret-pw" not in message


def test_an_unknown_postgresql_user_is_a_sentence(postgres_base_url: str) -> None:
    url = make_url(postgres_base_url).set(username=f"nobody_{uuid.uuid4().hex[:6]}")
    with pytest.raises(ConfigurationError, match=r"refused the connection to database \w+ \(role "):
        create_schema(make_engine(Settings(database_url=url.render_as_string(False))))
