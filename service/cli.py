"""The ``rtcontour`` command: one entry point that hands each sub-command to its module.

Each sub-command's module owns its own argument parser (``main(argv) -> int``), so options of
a sub-command never have to pass through this parser. A command whose module needs an extra
that is not installed answers ``--help`` with its options all the same where its parser lives
in a module without that extra (``OPTIONS_WITHOUT_EXTRA``), and a real run with one sentence
naming the extra.
"""

from __future__ import annotations

import importlib
import sys

from rtcontour.common.errors import ConfigurationError

# top-level module -> the pip extra of rtcontour that installs it (pyproject's optional deps)
EXTRA_OF_MODULE: dict[str, str] = {"torch": "train", "onnx": "train"}

# command -> (module exposing main(argv), relative to the rtcontour package; one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "serve": (".service.serve", "run everything on one node: DICOM listener, API and a worker"),
    "listener": (".service.listener", "run the DICOM C-STORE listener only"),
    "api": (".service.api.app", "run the HTTP API and dashboard only"),
    "worker": (".worker.celery_app", "run a Celery worker (scaled-out deployments)"),
    "segment": (".worker.segment", "offline: a CT folder in, an RTSTRUCT file out"),
    "mask2rtstruct": (".worker.mask2rtstruct",
                      "write an RTSTRUCT from a NIfTI/NRRD label map"),
    "dose": (".worker.dose_offline", "offline: CT + structure set in, predicted RTDOSE out"),
    "users": (".service.users_cli", "manage API users and tokens"),
    "routes": (".service.routes_cli", "test the routing rules: which route a CT series takes"),
    "pull": (".service.pull_cli", "pull a CT series from the PACS (RTCONTOUR_PACS) and contour it"),
    "train": (".models.train", "train the residual U-Net (extra 'train')"),
    "export": (".models.export", "export a checkpoint as a model package (extra 'train')"),
    "evaluate": (".models.evaluate", "Dice and HD95 of a model package on the validation split"),
    "finetune": (".models.finetune",
                 "fine-tune a package on the site's approved structure sets (extra 'train')"),
}

# command whose module needs an extra -> module with its build_parser() that does not
OPTIONS_WITHOUT_EXTRA: dict[str, str] = {
    "train": ".models.train_cli", "export": ".models.export_cli",
    "finetune": ".models.finetune_cli",
}


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: rtcontour COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'rtcontour COMMAND --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if args[0] in {"--version", "-V"}:
        from rtcontour.common import __version__

        print(f"rtcontour {__version__}")
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"rtcontour: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[command][0], "rtcontour")
        result: int | None = module.main(rest)
    except ModuleNotFoundError as error:
        extra = _extra_for(error)
        if extra is None:
            raise
        return _missing_extra(command, rest, error, extra)
    except ConfigurationError as error:  # settings that cannot work: one sentence, no trace
        print(f"rtcontour {command}: {error}", file=sys.stderr)
        return 2
    return int(result or 0)


def _extra_for(error: ModuleNotFoundError) -> str | None:
    """The extra that installs the module ``error`` found missing, or None if none does."""
    return EXTRA_OF_MODULE.get((error.name or "").split(".")[0])


def _missing_extra(command: str, rest: list[str], error: ModuleNotFoundError, extra: str) -> int:
    """Help (exit 0) or the sentence naming the extra to install (exit 2), never a trace."""
    needs = (
        f"needs the '{extra}' extra ({error.name} is not installed): "
        f"pip install 'rtcontour[{extra}]'"
    )
    if any(arg in {"-h", "--help"} for arg in rest):
        if command in OPTIONS_WITHOUT_EXTRA:
            module = importlib.import_module(OPTIONS_WITHOUT_EXTRA[command], "rtcontour")
            parser = module.build_parser()
            print(f"{parser.format_help()}\nThis command {needs}.")
            return 0
        print(f"usage: rtcontour {command} [options]\n\n{COMMANDS[command][1]}\n\n"
              f"This command {needs}.\nIts options are listed here once the extra is installed.")
        return 0
    print(f"rtcontour {command}: {needs}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
