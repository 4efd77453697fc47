"""The options of ``rtcontour export``, without torch.

The parser lives apart from :mod:`models.export` (which needs the 'train' extra) so that
``rtcontour export --help`` lists the options on an install without it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rtcontour.models.data import REPO_ROOT

__all__ = ["build_parser"]

DESCRIPTION = (
    "Export a training checkpoint as a model package: OUT_ROOT/NAME-VERSION/ with model.onnx, "
    "manifest.json and MODEL_CARD.md. With --evaluate the package is first run on the OpenKBP "
    "validation split and the per-structure Dice and HD95 go into the manifest and the card."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcontour export", description=DESCRIPTION)
    parser.add_argument("--checkpoint", type=Path,
                        default=REPO_ROOT / "runs" / "hn-oar-1" / "best.pt",
                        help="training checkpoint to export (default: %(default)s)")
    parser.add_argument("--name", default="rtcontour-hn-oar",
                        help="package name (default: %(default)s)")
    parser.add_argument("--version", required=True, help="semantic version, e.g. 1.0.0")
    parser.add_argument("--out-root", type=Path, default=REPO_ROOT / "models" / "packages",
                        help="folder the package is written under (default: %(default)s)")
    parser.add_argument("--evaluate", action="store_true",
                        help="evaluate on the validation split and record the metrics")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="OpenKBP folder for --evaluate (default: RTCONTOUR_OPENKBP_DIR, "
                             "else ../shared/data/openkbp)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N patients only")
    parser.add_argument("--overlap", type=float, default=0.5,
                        help="sliding-window overlap of --evaluate, 0-0.9 (default: %(default)s)")
    parser.add_argument("--mirror-tta", action="store_true",
                        help="--evaluate also predicts the left/right mirrored CT and averages")
    parser.add_argument("--force", action="store_true", help="overwrite an existing package")
    return parser
