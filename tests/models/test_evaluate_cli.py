"""``rtcontour evaluate --help`` explains every option."""

from __future__ import annotations

import argparse

import pytest

from rtcontour.models import evaluate


def test_every_evaluate_option_has_help_text(monkeypatch: pytest.MonkeyPatch) -> None:
    parsers: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        evaluate.main([])
    bare = [action.option_strings[-1] for action in parsers[0]._actions if not action.help]
    assert not bare, f"rtcontour evaluate options without help text: {bare}"
