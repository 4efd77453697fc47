"""The options of ``rtcontour train``, without torch.

The parser lives apart from :mod:`models.train` (which needs the 'train' extra) so that
``rtcontour train --help`` lists the options on an install without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rtcontour.models.data import REPO_ROOT
from rtcontour.models.train_config import TrainConfig

__all__ = ["RECIPE_FLAGS", "build_parser", "parse_pair", "parse_triple", "recipe_changes"]

DESCRIPTION = (
    "Train the organ-at-risk residual U-Net on OpenKBP. Checkpoints go to "
    "RUNS_DIR/RUN/last.pt (every few minutes and at each validation) and best.pt (best "
    "validation mean Dice); --resume continues exactly where last.pt stopped."
)


def parse_triple(text: str, kind: type = int) -> tuple[Any, ...]:
    """``64,96,96`` or ``64x96x96`` as three values of ``kind``."""
    parts = tuple(kind(v) for v in text.replace("x", ",").split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three values like 64,96,96, got {text!r}")
    return parts


def parse_pair(text: str) -> tuple[float, float]:
    """``0.85,1.2`` as two floats."""
    parts = tuple(float(v) for v in text.split(","))
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two values like 0.85,1.2, got {text!r}")
    return parts[0], parts[1]


# CLI flag -> TrainConfig field of the recipe options; on --resume they may change only with
# --restart-schedule (a new recipe from the checkpoint's weights).
RECIPE_FLAGS: dict[str, str] = {
    "--spatial-aug": "spatial_aug_p",
    "--rotation-deg": "rotation_deg",
    "--tilt-deg": "tilt_deg",
    "--scale-range": "scale_range",
    "--intensity-aug": "intensity_aug",
    "--ema-decay": "ema_decay",
    "--deep-supervision": "deep_supervision",
    "--batch": "batch_size",
}


def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(prog="rtcontour train", description=DESCRIPTION)
    parser.add_argument("--run", default=defaults.run,
                        help="run name, the folder under --runs-dir (default: %(default)s)")
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs",
                        help="folder holding one folder per run (default: %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="OpenKBP folder with train/ and validation/ (default: "
                             "RTCONTOUR_OPENKBP_DIR, else ../shared/data/openkbp)")
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache",
                        help="where the resampled cases are cached (default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<run>/last.pt")
    parser.add_argument("--arch", choices=("unet", "deep"), default=defaults.arch,
                        help="unet: --levels levels of at most --max-channels channels; deep: "
                             "6 levels of up to 320 channels (default: %(default)s)")
    parser.add_argument("--base-channels", type=int, default=defaults.base_channels,
                        help="channels of the first level (default: %(default)s)")
    parser.add_argument("--levels", type=int, default=defaults.levels,
                        help="resolution levels of the unet (default: %(default)s)")
    parser.add_argument("--max-channels", type=int, default=defaults.max_channels,
                        help="most channels of a unet level (default: %(default)s)")
    parser.add_argument("--patch", type=parse_triple, default=defaults.patch_size,
                        metavar="S,R,C",
                        help="patch size in voxels, slices,rows,columns (default: "
                             + ",".join(str(n) for n in defaults.patch_size) + ")")
    parser.add_argument("--batch", type=int, default=defaults.batch_size,
                        help="patches per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="total steps; the learning rate decays to 0 at the last one "
                             "(default: %(default)s)")
    parser.add_argument("--lr", type=float, default=defaults.lr,
                        help="learning rate after the warm-up (default: %(default)s)")
    parser.add_argument("--val-every", type=int, default=defaults.val_every,
                        help="validate every N steps (default: %(default)s)")
    parser.add_argument("--val-cases", type=int, default=defaults.val_cases,
                        help="validation patients that judge best.pt (default: %(default)s)")
    parser.add_argument("--checkpoint-minutes", type=float, default=defaults.checkpoint_minutes,
                        help="save last.pt at least this often (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="seed of the weights and the patch sampling (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="CPU threads of torch (default: %(default)s)")
    parser.add_argument("--no-bf16", action="store_true",
                        help="train in float32 (bfloat16 autocast is slow on CPUs without "
                             "AVX-512 BF16)")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="use only the first N train cases (default: all)")
    parser.add_argument("--stop-after", type=int, default=None, metavar="STEP",
                        help="stop with a checkpoint after this step, the schedule still "
                             "running to --steps (continue with --resume)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-reference-qa", action="store_true",
                        help="train on every reference contour, even those failing the "
                             "plausibility check of models.reference_qa (new runs and "
                             "--restart-schedule only)")
    parser.add_argument("--rebalance", action="store_true",
                        help="on --resume, switch to the current structure_weights/pos_weight")
    parser.add_argument("--restart-schedule", action="store_true",
                        help="on --resume, a warm restart: new warm-up and decay from --lr at "
                             "the checkpoint's step to --steps (weights and Adam moments kept)")
    recipe = parser.add_argument_group(
        "recipe options", "off by default; on --resume they may change only with "
                          "--restart-schedule")
    recipe.add_argument("--spatial-aug", type=float, default=defaults.spatial_aug_p,
                        metavar="P", help="probability per sample of a random rotation and "
                                          "scale (0: none)")
    recipe.add_argument("--rotation-deg", type=float, default=defaults.rotation_deg,
                        help="maximum rotation in the axial plane (default: %(default)s)")
    recipe.add_argument("--tilt-deg", type=float, default=defaults.tilt_deg,
                        help="maximum tilt out of the axial plane (default: %(default)s)")
    recipe.add_argument("--scale-range", type=parse_pair, default=defaults.scale_range,
                        metavar="MIN,MAX",
                        help="min,max isotropic scale (default: "
                             + ",".join(f"{v:g}" for v in defaults.scale_range) + ")")
    recipe.add_argument("--intensity-aug", action="store_true",
                        help="Gaussian noise, blur, simulated low resolution and gamma")
    recipe.add_argument("--ema-decay", type=float, default=defaults.ema_decay,
                        help="keep an exponential moving average of the weights with this "
                             "decay (e.g. 0.999; 0: none); validation and export use it")
    recipe.add_argument("--soft-targets", action="store_true",
                        help="train on each reference's occupancy of the training voxels "
                             "(partial volume) instead of masks thresholded at 0.5; may be "
                             "switched on at a --resume (the schedule continues)")
    recipe.add_argument("--deep-supervision", type=int, default=defaults.deep_supervision,
                        metavar="N", help="auxiliary heads on the N decoder levels below full "
                                          "resolution (training only)")
    return parser


def recipe_changes(argv: Sequence[str], args: argparse.Namespace,
                   stored: TrainConfig) -> dict[str, Any]:
    """Recipe fields given on the command line that differ from ``stored``."""
    given = {arg.split("=")[0] for arg in argv}
    changes = {}
    for flag, name in RECIPE_FLAGS.items():
        if flag in given:
            value = getattr(args, flag[2:].replace("-", "_") if flag != "--batch" else "batch")
            if getattr(stored, name) != value:
                changes[name] = value
    return changes
