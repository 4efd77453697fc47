"""Command-line parsing that names a misspelled option instead of a missing one.

argparse checks required options before it looks at unknown ones, so ``rtcontour segment CT
--otu RS.dcm`` says only "the following arguments are required: --out". ``parse_args`` reads
the known options first and reports an unrecognised one (with the nearest real option) before
any missing required option.
"""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence

__all__ = ["parse_args"]


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """``parser.parse_args(argv)``, but an unrecognised option is the error named first
    (exit status 2, as argparse), with "did you mean --out?" where one is close."""
    required = [action for action in parser._actions  # argparse has no public accessor
                if action.required and action.option_strings]
    for action in required:
        action.required = False
    try:
        args, unknown = parser.parse_known_args(None if argv is None else list(argv))
    finally:
        for action in required:
            action.required = True
    if unknown:
        options = [option for action in parser._actions for option in action.option_strings]
        hints = []
        for text in unknown:
            if text.startswith("-"):
                close = difflib.get_close_matches(text.split("=", 1)[0], options, n=1)
                if close:
                    hints.append(f"{text}: did you mean {close[0]}?")
        message = "unrecognized arguments: " + " ".join(unknown)
        parser.error(message + (" (" + "; ".join(hints) + ")" if hints else ""))
    missing = [action for action in required if getattr(args, action.dest, None) is None]
    if missing:
        parser.error("the following arguments are required: "
                     + ", ".join("/".join(action.option_strings) for action in missing))
    return args
