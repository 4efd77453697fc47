"""Train in one short burst on a GPU: packed data in, a resumable checkpoint out.

    python -m rtcontour.models.gpu_burst --pack-only                     # here: write the pack
    python -m rtcontour.models.gpu_burst --minutes 9 --out runs/burst-1  # there: 9 minutes

The pack (default ``var/burst/openkbp-pack.npz``, ~28 MiB for the 202 OpenKBP patients) holds
every preprocessed case of the training cache (``models.data.load_split``, reference check
on): the normalised CT quantised to uint8 (``round((x + 1) * 127.5)``: ~2 HU steps inside the
[-200, 300] HU window), the label bits (uint8), the ``known`` flags, shapes (int16) and
case ids, concatenated and compressed, so that the repository and data travel to a GPU
machine in seconds. Without the pack, the command builds it from the OpenKBP data first.

The burst trains with :func:`models.train.train` on CUDA when available (else the CPU, as in
the tests) for ``--minutes`` of wall clock, data loading included: after a few timed steps
the LR schedule is fitted to the time left. It writes ``<out>/last.pt``, an ordinary
checkpoint that ``rtcontour train --runs-dir <parent of out> --run <name of out> --resume``
continues (add ``--threads 1 --no-bf16`` here, and ``--restart-schedule --steps N --batch 2``
to go on with CPU-sized batches) and ``rtcontour export --checkpoint <out>/last.pt``
exports. With ``--init CHECKPOINT`` it is a warm restart of that checkpoint (its network),
else a new network of the given width.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from rtcontour.models.data import (
    REPO_ROOT,
    TARGET_SPACING_MM,
    CaseArrays,
    default_data_dir,
    load_split,
)
from rtcontour.models.train import TrainConfig, load_checkpoint, train
from rtcontour.models.train_cli import parse_triple

__all__ = ["pack_cases", "write_pack", "read_pack", "burst_config", "main"]

log = logging.getLogger(__name__)

PACK_VERSION = 1
DEFAULT_PACK = REPO_ROOT / "var" / "burst" / "openkbp-pack.npz"


def pack_cases(cases: Sequence[CaseArrays], splits: Sequence[str]) -> dict[str, np.ndarray]:
    """Arrays of a pack (see the module docstring) for ``cases`` (``splits``: one per case)."""
    if len(cases) != len(splits):
        raise ValueError(f"one split per case: {len(cases)} cases, {len(splits)} splits")
    images = [np.round((np.clip(c.image.astype(np.float32), -1.0, 1.0) + 1.0) * 127.5)
              .astype(np.uint8).ravel() for c in cases]
    return {
        "version": np.array(PACK_VERSION),
        "case_ids": np.array([c.case_id for c in cases]),
        "splits": np.array(list(splits)),
        "shapes": np.array([c.image.shape for c in cases], dtype=np.int16),
        "known": np.stack([c.known.astype(bool) for c in cases]),
        "spacing_mm": np.array(cases[0].spacing_mm if cases else TARGET_SPACING_MM),
        "images": np.concatenate(images) if images else np.zeros(0, np.uint8),
        "labels": (np.concatenate([c.labels.ravel() for c in cases]) if cases
                   else np.zeros(0, np.uint8)),
    }


def write_pack(path: Path, cases: Sequence[CaseArrays], splits: Sequence[str]) -> Path:
    """Write a compressed pack atomically; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.stem + ".partial.npz")
    np.savez_compressed(partial, **pack_cases(cases, splits))  # type: ignore[arg-type]
    partial.replace(path)
    log.info("packed %d cases into %s (%.1f MiB)", len(cases), path, path.stat().st_size / 2**20)
    return path


def read_pack(path: Path) -> dict[str, list[CaseArrays]]:
    """split -> cases of a pack (images back to float16 in [-1, 1])."""
    with np.load(path) as npz:
        if int(npz["version"]) != PACK_VERSION:
            raise ValueError(f"{path} is pack version {int(npz['version'])}, "
                             f"expected {PACK_VERSION}")
        images, labels = npz["images"], npz["labels"]
        shapes, known = npz["shapes"].astype(np.int64), npz["known"]
        case_ids, splits = npz["case_ids"], npz["splits"]
        spacing = tuple(float(s) for s in npz["spacing_mm"])
    result: dict[str, list[CaseArrays]] = {}
    offset = 0
    for index, shape in enumerate(shapes):
        size = int(np.prod(shape))
        image = (images[offset:offset + size].astype(np.float32) / 127.5 - 1.0).astype(
            np.float16).reshape(shape)
        case = CaseArrays(str(case_ids[index]), image,
                          labels[offset:offset + size].reshape(shape).copy(),
                          known[index].copy(), spacing)  # type: ignore[arg-type]
        result.setdefault(str(splits[index]), []).append(case)
        offset += size
    return result


def build_pack(path: Path, data_dir: Path, cache_dir: Path) -> Path:
    """The pack of the train and validation splits (cache built first if needed)."""
    cases: list[CaseArrays] = []
    splits: list[str] = []
    for split in ("train", "validation"):
        loaded = load_split(data_dir, split, cache_dir, reference_qa=True)
        cases += loaded
        splits += [split] * len(loaded)
    return write_pack(path, cases, splits)


def burst_config(args: argparse.Namespace, command: str) -> tuple[TrainConfig, bool]:
    """The run's config and whether it is a warm restart of ``--init``."""
    if args.init is not None:
        config = TrainConfig.from_dict(load_checkpoint(args.init)["config"])
        config.lr = args.lr
        warm = True
    else:
        config = TrainConfig(arch=args.arch, base_channels=args.base_channels,
                             levels=args.levels, max_channels=args.max_channels,
                             patch_size=args.patch, lr=args.lr, warmup_steps=args.warmup_steps)
        warm = False
    config.run = args.out.name
    config.batch_size = args.batch
    config.val_cases = args.val_cases
    config.val_every = 10**9  # validate once, at the end
    config.checkpoint_minutes = 2.0
    config.bf16 = not args.no_bf16
    config.threads = args.threads
    config.reference_qa = True
    config.spatial_aug_p = args.spatial_aug
    config.intensity_aug = args.intensity_aug
    config.ema_decay = args.ema_decay
    levels = 6 if config.arch == "deep" else config.levels
    config.deep_supervision = min(args.deep_supervision, levels - 2)
    if config.deep_supervision != args.deep_supervision:
        log.warning("deep supervision: %d heads asked, a %d-level network has room for %d",
                    args.deep_supervision, levels, config.deep_supervision)
    config.data_dir = str(args.pack)
    config.command = list(config.command) + [command]
    return config, warm


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.gpu_burst",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.0,
                        help="wall-clock budget of the whole command, data loading included")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "burst",
                        help="run folder: last.pt (and best.pt) land here")
    parser.add_argument("--pack", type=Path, default=DEFAULT_PACK,
                        help="packed data (built from --data-dir when missing)")
    parser.add_argument("--pack-only", action="store_true", help="write the pack and stop")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache")
    parser.add_argument("--init", type=Path, default=None,
                        help="warm restart of this checkpoint (e.g. models/checkpoints/resume.pt)"
                             " instead of a new network")
    parser.add_argument("--include-validation", action="store_true",
                        help="train on train + validation (202 patients); validation figures "
                             "then come from an earlier split run")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--arch", choices=("unet", "deep"), default="unet")
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--levels", type=int, default=5)
    parser.add_argument("--max-channels", type=int, default=320)
    parser.add_argument("--patch", type=parse_triple, default=(48, 80, 80))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--val-cases", type=int, default=5,
                        help="validation patients judged at the end (0: none)")
    parser.add_argument("--spatial-aug", type=float, default=0.5)
    parser.add_argument("--intensity-aug", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--deep-supervision", type=int, default=2)
    parser.add_argument("--no-bf16", action="store_true")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads of torch")
    parser.add_argument("--sampler-threads", type=int, default=None,
                        help="threads drawing batches (default: 8 on CUDA, 0 on the CPU)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.pack.exists():
        build_pack(args.pack, args.data_dir or default_data_dir(), args.cache_dir)
    if args.pack_only:
        print(args.pack)  # noqa: T201
        return 0
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":
            log.warning("CUDA is not available: the burst trains on the CPU")
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    splits = read_pack(args.pack)
    train_cases = list(splits.get("train", []))
    validation = list(splits.get("validation", []))
    if args.include_validation:
        train_cases += validation
    val_cases = validation[:args.val_cases]
    command = " ".join(["python -m rtcontour.models.gpu_burst", *argv])
    config, warm = burst_config(args, command)
    args.out.mkdir(parents=True, exist_ok=True)
    if warm:
        shutil.copy(args.init, args.out / "last.pt")
        config.steps = int(load_checkpoint(args.init)["step"]) + 10**6  # refitted to the budget
    else:
        config.steps = 10**6
    sampler_threads = (args.sampler_threads if args.sampler_threads is not None
                       else (8 if device == "cuda" else 0))
    # what is left after loading, less a slack for the final validation and save
    slack = min(20.0, 0.1 * args.minutes * 60.0)
    budget = args.minutes * 60.0 - (time.monotonic() - started) - slack
    log.info("burst on %s: %d train / %d val cases, %.0f s of training, batch %d", device,
             len(train_cases), len(val_cases), budget, config.batch_size)
    final = train(config, train_cases, val_cases, args.out, resume=warm,
                  restart_schedule=warm, device=device, time_budget_s=max(1.0, budget),
                  sampler_threads=sampler_threads)
    print(f"step {final['step']} of {config.steps}; checkpoint {args.out / 'last.pt'}; "  # noqa: T201
          f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
