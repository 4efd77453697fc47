"""Ablation queue: short warm restarts of the committed checkpoint, evaluated alike.

    python -m rtcontour.models.ablations run [--steps 60] [--lr 3e-4] [--only NAME ...]
    python -m rtcontour.models.ablations table            # markdown rows from runs/abl-*/

Each row copies ``models/checkpoints/resume.pt`` to ``runs/<name>/last.pt`` and continues it
with ``rtcontour train --resume --restart-schedule`` and the row's recipe flags, one thread,
float32, no in-training validation; exports ``last.pt`` (``models.export``; EMA weights where
the row keeps them) and evaluates the package with ``models.evaluate`` on a fixed subset of
validation and training patients (the same for every row, including the shipped package).
The queue runs from a snapshot of the code taken when it starts (``runs/ablations/code``),
so edits made while it runs do not change later rows. Logs: ``runs/<name>/train.log``,
``runs/<name>/eval-*.log``; results ``runs/<name>/{validation,train}.json``; progress in
``runs/ablations/queue.log``. A row with ``runs/<name>/done`` is skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rtcontour.models.data import REPO_ROOT, default_data_dir
from rtcontour.models.labels import ORGANS

__all__ = ["Row", "ROWS", "EVALUATION", "main"]

log = logging.getLogger(__name__)

RESUME_CHECKPOINT = REPO_ROOT / "models" / "checkpoints" / "resume.pt"
SHIPPED_PACKAGE = REPO_ROOT / "models" / "packages" / "rtcontour-hn-oar-1.2.0"
RESUME_STEP = 12500


@dataclass(frozen=True)
class Row:
    """One ablation: a name (``runs/<name>``) and the recipe flags of its warm restart
    (``None``: no training, evaluate the shipped package)."""

    name: str
    flags: tuple[str, ...] | None
    note: str = ""


# In the order they run: the two that answer most first, the shipped package's evaluation
# (no training) next, then the single-option row.
ROWS: tuple[Row, ...] = (
    Row("abl-baseline", (), "warm restart, recipe unchanged"),
    Row("abl-aug-ema", ("--spatial-aug", "0.5", "--intensity-aug", "--ema-decay", "0.98"),
        "+ spatial (p 0.5) and intensity augmentation + EMA of the weights"),
    Row("abl-shipped", None, "package 1.2.0 as shipped (step 12500)"),
    Row("abl-aug", ("--spatial-aug", "0.5", "--intensity-aug"),
        "+ spatial (p 0.5) and intensity augmentation"),
)


@dataclass(frozen=True)
class Evaluation:
    """The fixed patient subsets every row is judged on (``models.evaluate`` arguments)."""

    validation: tuple[str, ...] = ("--split", "validation", "--offset", "5", "--limit", "8")
    train: tuple[str, ...] = ("--split", "train", "--limit", "4")
    common: tuple[str, ...] = field(
        default=("--overlap", "0.25", "--threads", "1", "--provider", "openvino"))


EVALUATION = Evaluation()


def _snapshot_code(target: Path) -> Path:
    """Copy the Python code the queue runs (``models`` without packages and checkpoints,
    ``common``) to ``target``."""
    if target.exists():
        shutil.rmtree(target)
    ignore = shutil.ignore_patterns("packages", "checkpoints", "dose*", "__pycache__")
    shutil.copytree(REPO_ROOT / "models", target / "models", ignore=ignore)
    if (REPO_ROOT / "common").is_dir():
        shutil.copytree(REPO_ROOT / "common", target / "common",
                        ignore=shutil.ignore_patterns("__pycache__"))
    return target


def _run(command: list[str], log_path: Path, code: Path) -> None:
    # run in the snapshot folder: ``python -m`` puts the working directory first on sys.path
    env = dict(os.environ, PYTHONPATH=str(code), OMP_NUM_THREADS="1")
    log.info("%s > %s", " ".join(command), log_path)
    with open(log_path, "a", encoding="utf-8") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        subprocess.run(command, stdout=stream, stderr=subprocess.STDOUT, env=env, check=True,
                       cwd=code)


def train_command(row: Row, runs_dir: Path, steps: int, lr: float, data_dir: Path,
                  cache_dir: Path) -> list[str]:
    """The ``rtcontour train`` command line of a row (as ``python -m rtcontour.models.train``)."""
    return [sys.executable, "-m", "rtcontour.models.train", "--run", row.name, "--runs-dir",
            str(runs_dir), "--data-dir", str(data_dir), "--cache-dir", str(cache_dir),
            "--resume", "--restart-schedule", "--steps", str(RESUME_STEP + steps), "--lr",
            f"{lr:g}", "--threads", "1", "--no-bf16", "--val-cases", "0", "--no-progress",
            *(row.flags or ())]


def run_row(row: Row, runs_dir: Path, code: Path, steps: int, lr: float, data_dir: Path,
            cache_dir: Path) -> None:
    """Train (unless the row is the shipped package), export and evaluate one row."""
    run_dir = runs_dir / row.name
    run_dir.mkdir(parents=True, exist_ok=True)
    if row.flags is None:
        package = SHIPPED_PACKAGE
    else:
        shutil.copy(RESUME_CHECKPOINT, run_dir / "last.pt")
        (run_dir / "train.log").unlink(missing_ok=True)
        _run(train_command(row, runs_dir, steps, lr, data_dir, cache_dir),
             run_dir / "train.log", code)
        out_root = run_dir / "package"
        _run([sys.executable, "-m", "rtcontour.models.export", "--checkpoint",
              str(run_dir / "last.pt"), "--name", row.name, "--version", "0.0.1", "--out-root",
              str(out_root), "--force"],
             run_dir / "export.log", code)
        package = out_root / f"{row.name}-0.0.1"
    for kind, subset in (("validation", EVALUATION.validation), ("train", EVALUATION.train)):
        _run([sys.executable, "-m", "rtcontour.models.evaluate", "--package", str(package),
              "--data-dir", str(data_dir), *subset, *EVALUATION.common, "--json-out",
              str(run_dir / f"{kind}.json")], run_dir / f"eval-{kind}.log", code)
    (run_dir / "done").write_text(time.strftime("%Y-%m-%d %H:%M:%S\n"), encoding="utf-8")


def seconds_per_step(train_log: Path) -> float | None:
    """Mean of the ``s/step`` figures a training log reports (None without any)."""
    if not train_log.exists():
        return None
    values = [float(v) for v in re.findall(r"([\d.]+) s/step",
                                           train_log.read_text(encoding="utf-8"))]
    return sum(values) / len(values) if values else None


def table(runs_dir: Path, rows: Sequence[Row] = ROWS, steps: int | None = None,
          lr: float | None = None) -> str:
    """Markdown table of the rows that have results (validation Dice per structure and mean,
    training-patient mean beside it)."""
    names = [organ.roi_name for organ in ORGANS]
    header = ("| row | command | s/step | " + " | ".join(names)
              + " | **val mean** | train mean |")
    lines = [header, "|" + " --- |" * (len(names) + 5)]
    for row in rows:
        run_dir = runs_dir / row.name
        results: dict[str, dict[str, Any]] = {}
        for kind in ("validation", "train"):
            path = run_dir / f"{kind}.json"
            if path.exists():
                results[kind] = json.loads(path.read_text(encoding="utf-8"))
        if "validation" not in results:
            continue
        per = results["validation"]["per_structure"]
        cells = [f"{per[name]['dice']:.3f}" if name in per else "-" for name in names]
        command = ("`python -m rtcontour.models.evaluate --package models/packages/"
                   "rtcontour-hn-oar-1.2.0`" if row.flags is None else
                   f"`rtcontour train --resume --restart-schedule"
                   f"{'' if steps is None else f' --steps {RESUME_STEP + steps}'}"
                   f"{'' if lr is None else f' --lr {lr:g}'} --threads 1 --no-bf16 "
                   f"--val-cases 0 {' '.join(row.flags)}`".replace(" `", "`"))
        speed = seconds_per_step(run_dir / "train.log")
        train_mean = (f"{results['train']['mean_dice']:.3f}" if "train" in results else "-")
        lines.append(f"| {row.name}: {row.note} | {command} | "
                     f"{'-' if speed is None else f'{speed:.1f}'} | " + " | ".join(cells)
                     + f" | **{results['validation']['mean_dice']:.3f}** | {train_mean} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rtcontour.models.ablations",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--runs-dir", type=Path, default=REPO_ROOT / "runs")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=REPO_ROOT / "var" / "cache")
    parser.add_argument("--steps", type=int, default=60, help="steps per warm restart")
    parser.add_argument("--lr", type=float, default=3e-4, help="peak LR of the restart")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    args = parser.parse_args(argv)
    args.runs_dir, args.cache_dir = args.runs_dir.resolve(), args.cache_dir.resolve()
    if args.action == "table":
        print(table(args.runs_dir, steps=args.steps, lr=args.lr))  # noqa: T201
        return 0
    queue_dir = args.runs_dir / "ablations"
    queue_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, filename=queue_dir / "queue.log",
                        format="%(asctime)s %(levelname)s %(message)s")
    code = _snapshot_code(queue_dir / "code")
    data_dir = (args.data_dir or default_data_dir()).resolve()
    for row in ROWS:
        if args.only is not None and row.name not in args.only:
            continue
        if (args.runs_dir / row.name / "done").exists():
            log.info("%s done already, skipped", row.name)
            continue
        started = time.monotonic()
        try:
            run_row(row, args.runs_dir, code, args.steps, args.lr, data_dir, args.cache_dir)
        except subprocess.CalledProcessError as error:
            log.error("%s failed: %s", row.name, error)
            continue
        log.info("%s finished in %.1f min", row.name, (time.monotonic() - started) / 60)
    log.info("queue finished\n%s", table(args.runs_dir, steps=args.steps, lr=args.lr))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
