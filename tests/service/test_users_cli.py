"""``rtcontour users`` says which database it uses and never silently creates an empty one."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import make_url

from rtcontour.service.cli import main as rtcontour


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder that is not the service's, with no RTCONTOUR_* database setting."""
    monkeypatch.delenv("RTCONTOUR_DATA_DIR", raising=False)
    monkeypatch.delenv("RTCONTOUR_DATABASE_URL", raising=False)
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize(
    "args", [["list"], ["add", "dr-smith", "--role", "clinician"]], ids=["list", "add"]
)
def test_users_from_another_folder_refuses_to_create_a_database_and_names_it(
    elsewhere: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    assert rtcontour(["users", *args]) == 2
    err = capsys.readouterr().err
    database = elsewhere / "var" / "rtcontour.db"
    assert f"rtcontour users: using the database {database}" in err
    assert f"there is no rtcontour database at {database}" in err
    assert "--create" in err and "Traceback" not in err
    assert list(elsewhere.iterdir()) == []  # no ./var, no database file


def test_users_create_makes_the_database_and_later_commands_use_it(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert rtcontour(["users", "add", "dr-smith", "--role", "clinician", "--create"]) == 0
    assert (elsewhere / "var" / "rtcontour.db").is_file()
    capsys.readouterr()
    assert rtcontour(["users", "list"]) == 0
    out, err = capsys.readouterr()
    assert "dr-smith" in out
    assert f"using the database {elsewhere / 'var' / 'rtcontour.db'}" in err


def test_users_on_a_postgresql_database_without_tables_is_refused_and_hides_the_password(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # trust authentication ignores the password; it must never be printed all the same
    url = make_url(postgres_url).set(password="s3cret-pw").render_as_string(hide_password=False)
    monkeypatch.setenv("RTCONTOUR_DATABASE_URL", url)
    assert rtcontour(["users", "list"]) == 2
    err = capsys.readouterr().err
    assert "there is no rtcontour database at postgresql+psycopg://postgres:***@" in err
    assert rtcontour(["users", "add", "dr-smith", "--role", "viewer", "--create"]) == 0
    assert rtcontour(["users", "list"]) == 0
    out, err = capsys.readouterr()
    assert "dr-smith" in out
    assert "s3cret-pw" not in out + err
