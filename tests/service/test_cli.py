"""``rtcontour`` dispatcher: help always works, a missing extra is one sentence naming it."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest
from sqlalchemy import make_url

from rtcontour.service.cli import EXTRA_OF_MODULE, OPTIONS_WITHOUT_EXTRA
from tests.conftest import REPO_ROOT, serve_env

# Runs ``rtcontour ARGS`` with the train extra's modules unimportable, whether installed or not.
WITHOUT_TRAIN_EXTRA = """
import sys

class HideTrainExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "onnx"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideTrainExtra())
from rtcontour.service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _rtcontour_without_train_extra(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_TRAIN_EXTRA, *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )


@pytest.mark.parametrize(
    ("command", "options"),
    [("train", ["--resume", "--steps", "--restart-schedule", "--ema-decay"]),
     ("export", ["--checkpoint", "--version", "--evaluate", "--force"])],
    ids=["train", "export"],
)
def test_help_of_a_train_extra_command_lists_its_options_without_torch_and_names_the_extra(
    command: str, options: list[str]
) -> None:
    result = _rtcontour_without_train_extra(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout.startswith(f"usage: rtcontour {command} [-h]"), result.stdout
    assert [option for option in options if option not in result.stdout] == []
    assert result.stdout.rstrip().endswith(
        "This command needs the 'train' extra (torch is not installed): "
        "pip install 'rtcontour[train]'."
    )


@pytest.mark.parametrize(
    "command", sorted(OPTIONS_WITHOUT_EXTRA), ids=sorted(OPTIONS_WITHOUT_EXTRA)
)
def test_help_without_the_extra_lists_every_option_with_its_help_text(command: str) -> None:
    parser = importlib.import_module(OPTIONS_WITHOUT_EXTRA[command], "rtcontour").build_parser()
    bare = [action.option_strings[-1] for action in parser._actions if not action.help]
    assert not bare, f"options without help text: {bare}"
    result = _rtcontour_without_train_extra(command, "--help")
    assert result.returncode == 0, result.stderr
    missing = [action.option_strings[-1] for action in parser._actions
               if action.option_strings[-1] not in result.stdout]
    assert not missing, result.stdout


@pytest.mark.parametrize(
    "args", [["train", "--steps", "1"], ["export", "--version", "9.9.9"]], ids=["train", "export"]
)
def test_running_a_train_extra_command_without_torch_says_which_extra_to_install(
    args: list[str],
) -> None:
    result = _rtcontour_without_train_extra(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"rtcontour {args[0]}: needs the 'train' extra (torch is not installed): "
        "pip install 'rtcontour[train]'"
    )


def test_evaluate_help_works_without_torch() -> None:
    result = _rtcontour_without_train_extra("evaluate", "--help")
    assert result.returncode == 0, result.stderr
    assert "--package" in result.stdout


def test_every_module_mapped_to_an_extra_is_a_requirement_of_that_extra() -> None:
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for module, extra in EXTRA_OF_MODULE.items():
        names = {req.split(";")[0].split("[")[0].split("=")[0].split(">")[0].split("<")[0]
                 .strip() for req in extras[extra]}
        assert module in names, f"{module} is not a requirement of the extra {extra!r}"


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="train extra absent")
@pytest.mark.parametrize(
    ("command", "option"), [("train", "--steps"), ("export", "--checkpoint")],
    ids=["train", "export"],
)
def test_help_with_the_extra_lists_its_options(command: str, option: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rtcontour.service.cli", command, "--help"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert option in result.stdout
    assert "pip install" not in result.stdout


# what a developer reads in a module docstring, not what the person running the command needs
DEVELOPER_NOTES = ("create_app", "deps.py", "RecoverySweeper", "make_celery", "``",
                   "rtcontour.worker.tasks")


@pytest.mark.parametrize(
    "module",
    ["rtcontour.service.serve", "rtcontour.service.api.app", "rtcontour.worker.celery_app"],
    ids=["serve", "api", "worker"],
)
def test_help_of_a_service_command_is_written_for_the_person_running_it(
    module: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert not [note for note in DEVELOPER_NOTES if note in help_text], help_text
    assert "RTCONTOUR_" in help_text  # names the settings it runs with

    parsers: list[argparse.ArgumentParser] = []

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        main([])
    bare = [action.option_strings[-1] for action in parsers[0]._actions if not action.help]
    assert not bare, f"options without help text: {bare}"


@pytest.mark.parametrize(
    "command", ["api", "listener", "worker"], ids=["api", "listener", "worker"]
)
def test_a_process_on_a_missing_database_stops_with_one_sentence(
    command: str, postgres_base_url: str, tmp_path: Path
) -> None:
    name = f"rtc_missing_{uuid.uuid4().hex[:8]}"
    url = make_url(postgres_base_url).set(database=name, password="s3cret-pw")
    env = serve_env(tmp_path / "var", database_url=url.render_as_string(hide_password=False))
    result = subprocess.run(
        [sys.executable, "-m", "rtcontour.service.cli", command], env=env, cwd=REPO_ROOT,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rtcontour {command}: database {name} does not exist on "), last
    assert "createdb" in last and "s3cret-pw" not in result.stderr + result.stdout
