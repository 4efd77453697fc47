"""The options of ``rtcontour finetune``, without torch (``--help`` works without the extra)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

__all__ = ["DEFAULT_HOLDOUT", "SITE_NAME", "build_parser"]

DEFAULT_HOLDOUT = 0.2
SITE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")

DESCRIPTION = (
    "Fine-tune a model package on the structure sets this site's clinicians approved (the "
    "site data set, kept by routes with keep_for_training: true). A fixed part of the patients "
    "(--holdout, by patient) is held back; the new package NAME-VERSION+SITE.N is written "
    "beside the base, never over a package, with a model card comparing base and new model "
    "per structure on the held-back sets and on OpenKBP validation patients."
)


def _site(text: str) -> str:
    if not SITE_NAME.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a site name (1-24 lower-case letters, digits or '-')")
    return text


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtcontour finetune", description=DESCRIPTION)
    parser.add_argument("--package", required=True,
                        help="base package: a folder, or NAME / NAME-VERSION under "
                             "--packages-dir")
    parser.add_argument("--site", required=True, type=_site,
                        help="the site's short name, written into the version (e.g. 'clinic')")
    budget = parser.add_mutually_exclusive_group(required=True)
    budget.add_argument("--steps", type=int, help="training steps")
    budget.add_argument("--minutes", type=float, help="wall-clock training budget in minutes")
    parser.add_argument("--site-dataset", type=Path, default=None,
                        help="kept sets (default: RTCONTOUR_SITE_DATASET_DIR or "
                             "<RTCONTOUR_DATA_DIR>/site-dataset)")
    parser.add_argument("--packages-dir", type=Path, default=None,
                        help="where packages are found and the new one is written (default: "
                             "RTCONTOUR_MODEL_PACKAGES_DIR or the installed packages)")
    parser.add_argument("--holdout", type=_fraction, default=DEFAULT_HOLDOUT,
                        help="share of patients held back to compare base and new (default "
                             "0.2, fixed per patient)")
    parser.add_argument("--min-sets", type=int, default=None,
                        help="refuse when a structure has fewer kept sets (default "
                             "RTCONTOUR_FINETUNE_MIN_SETS, 10)")
    parser.add_argument("--exclude", action="append", default=[], metavar="STRUCTURE",
                        help="train without this structure's kept contours (it is not "
                             "counted by the guard); repeatable")
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=2,
                        help="patches per step (the campaign's recipe uses 2)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for training")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: the GPU when torch sees one (logged), else the CPU")
    parser.add_argument("--openkbp-dir", type=Path, default=None,
                        help="OpenKBP data (default ../shared/data/openkbp); skipped with a "
                             "note when absent")
    parser.add_argument("--openkbp-limit", type=int, default=8,
                        help="OpenKBP validation patients to compare on (0: skip)")
    parser.add_argument("--openkbp-offset", type=int, default=0,
                        help="skip this many OpenKBP validation patients first (e.g. those a "
                             "simulated clinic used)")
    parser.add_argument("--worse-margin", type=float, default=0.01,
                        help="a structure whose held-back Dice drops by more than this is "
                             "'worse' (default 0.01)")
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="where the run's checkpoint goes (default: a temporary folder)")
    parser.add_argument("--seed", type=int, default=20261,
                        help="seed of the sampling and augmentation (the held-back split is "
                             "fixed by patient, not by this)")
    return parser
