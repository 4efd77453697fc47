"""The README is the operator's manual: every setting and the two first commands are in it."""

from pathlib import Path

from common.settings import Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_setting() -> None:
    text = README.read_text(encoding="utf-8")
    missing = [
        f"RTCONTOUR_{name.upper()}"
        for name in Settings.model_fields
        if f"RTCONTOUR_{name.upper()}" not in text
    ]
    assert not missing, f"settings not documented in README.md: {', '.join(missing)}"


def test_readme_opens_with_the_serve_and_test_commands() -> None:
    opening = "\n".join(README.read_text(encoding="utf-8").splitlines()[:10])
    assert "make serve" in opening
    assert "make test" in opening
